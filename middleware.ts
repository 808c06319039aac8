/**
 * SharedSecretMiddleware, the origin's door. A request that reaches a moleculer-web gateway's
 * server without the `x-shared-secret` that the API gateway (Zuplo) adds gets a 401, so nobody
 * can go around the API gateway. With the secret, the caller that the API gateway names in
 * `x-consumer` reaches services as `ctx.meta.consumer`.
 *
 *     const door = SharedSecretMiddleware({ secrets: "new,old", publicPaths: "GET /health" });
 *     const broker = new ServiceBroker({ middlewares: [door] });
 *
 * Version 2.0.0 of the moleculer-shared-secret-origin template, tested with moleculer 0.15.2 +
 * moleculer-web 0.11.0 and 0.14.36 + 0.10.8, Node 22 and 24, Deno 2, Bun 1, Express 4 and 5. It
 * imports nothing of its project: copy it alone. To update a copy, compare it with the template's
 * newest middleware.ts; docs/copy-the-door.md says what each version changed.
 */
import { createHash, createHmac, createSecretKey, timingSafeEqual } from "node:crypto";
import type { IncomingMessage, Server, ServerResponse } from "node:http";
import type { ServerHttp2Stream } from "node:http2";
import type { Duplex } from "node:stream";
import type { ActionHandler, ActionSchema, Context, Service, ServiceBroker } from "moleculer";
import type { ServiceSchema } from "moleculer";
import * as MoleculerWeb from "moleculer-web";

// ==== 1. What the page promises: the options, the comparison, the 401, the check ============

export type SharedSecretOptions = {
	/** The secret, or several while you rotate ("new,old" or a list): entry 1 is current. */
	secrets: string | readonly string[] | undefined;
	/** "METHOD /exact/path" items, listed or comma-separated: plain requests need no secret. */
	publicPaths?: string | readonly string[] | undefined;
	/** How often the rotation report logs which entries are in use (60 s). */
	reportSeconds?: number | undefined;
	/** How long an entry after the first goes unused before it is called removable (600 s). */
	quietSeconds?: number | undefined;
	/** "accept" (the default): a signed request (part 2) or the header; "require": signed only. */
	signatures?: "accept" | "require" | undefined;
};

/** What the door adds to `ctx.meta`: the consumer, on requests with the secret (or signed). */
export type SharedSecretMeta = { consumer?: string };

const HEADER = "x-shared-secret";
const CONSUMER_HEADER = "x-consumer"; // Who called, as the API gateway vouches for it.
// In bytes: the comparison does the same work for any secret up to this length.
const COMPARE_WIDTH = 256;
// RFC 9110 §15.5.2: a 401 carries a challenge. It is no standard scheme: it names the header.
const CHALLENGE = `SharedSecret header="${HEADER}"`;

// moleculer-web's own error classes. ESM and esModuleInterop see its exports as `default`; a
// CommonJS build without esModuleInterop sees them as the module itself.
type WebErrors =
	& { UnAuthorizedError: new (type: string, data: unknown) => Error }
	& Record<"ERR_NO_TOKEN" | "ERR_INVALID_TOKEN", string>;
const web = MoleculerWeb as unknown as { Errors: WebErrors; default?: { Errors: WebErrors } };
const Errors = (web.default ?? web).Errors;

/** Why the door turned a request away, with its answer prebuilt for each kind of connection. */
type Refusal = ReturnType<typeof createRefusal>;

// moleculer-web's UnAuthorizedError as JSON, with the head that each kind of connection needs:
// built once, as every refusal of one kind is the same.
function createRefusal(
	reason: "missing" | "invalid",
	message: string,
	type: string,
	challenge: Record<string, string> = { "WWW-Authenticate": CHALLENGE },
) {
	const { name } = new Errors.UnAuthorizedError(type, undefined);
	const body = JSON.stringify({ name, message, code: 401, type });
	const head = {
		"Content-Type": "application/json; charset=utf-8",
		"Content-Length": String(Buffer.byteLength(body)),
		...challenge,
	};
	// A refusal whose body the door does not read closes its connection after the answer.
	const closingHead = { ...head, Connection: "close" };
	// An upgrade's socket has no response object: the 401 goes out as bytes.
	const fields = Object.entries(closingHead).map(([field, value]) => `${field}: ${value}\r\n`);
	const bytes = `HTTP/1.1 401 Unauthorized\r\n${fields.join("")}\r\n${body}`;
	const lowerCase = Object.entries(head).map(([field, value]) => [field.toLowerCase(), value]);
	const http2Head = { ":status": 401, ...Object.fromEntries(lowerCase) };
	return { reason, message, type, challenge, body, head, closingHead, bytes, http2Head };
}
const NO_SECRET = createRefusal("missing", "No secret provided", Errors.ERR_NO_TOKEN);
const WRONG_SECRET = createRefusal("invalid", "Invalid secret", Errors.ERR_INVALID_TOKEN);

/**
 * Tells, in constant time and never throwing, which of `secrets` a value is: its entry number
 * (1 for the first), or 0. timingSafeEqual compares a fixed-width zero-padded copy of the value
 * with every padded secret, and a separate length check is ANDed in, so a prefix never matches.
 * The entry is summed without a branch: the work depends on no secret's content or length.
 */
export function createSecretMatcher(secrets: readonly string[]): (presented: unknown) => number {
	const lengths = secrets.map((secret) => Buffer.byteLength(secret));
	const width = Math.max(COMPARE_WIDTH, ...lengths);
	const expected = secrets.map((secret) => Buffer.concat([Buffer.from(secret)], width));
	// One scratch buffer, reused: no other request runs until this function returns.
	const scratch = Buffer.alloc(width);
	return function whichSecret(presented: unknown): number {
		// A header value is a string (a repeated header's values joined); nothing else is.
		if (typeof presented !== "string") return 0;
		// As UTF-8, a character above 0x7F is bytes that no secret holds (they are visible ASCII).
		const length = Buffer.byteLength(presented);
		scratch.fill(0);
		scratch.write(presented);
		let entry = 0;
		for (let index = 0; index < expected.length; index++) {
			const sameBytes = timingSafeEqual(scratch, expected[index]!);
			entry += (index + 1) * (Number(sameBytes) & Number(length === lengths[index]));
		}
		return entry;
	};
}

/** What the door let in: the method and URL it checked, and the API gateway's consumer. */
type Admission = {
	method: string;
	url: string;
	consumer: string | undefined;
	routedUrl?: string; // The URL given to the gateway's httpHandler: `rest` routes it again.
};
/** A request or stream that a door may mark. Each door's mark is a Symbol of its own. */
type Marked = { [mark: symbol]: Admission | undefined };
type Headers = Record<string, unknown>;
type Tally = {
	accepted: number[];
	lastSeen: number[];
	missing: number;
	invalid: number;
	/** Requests in "require" mode that carried the header, signed or not: it still travels. */
	secretOnTheWire: number;
};
type Logger = ServiceBroker["logger"];

/** One door's state: the factory (part 6) makes it, and every edge (part 3) reads it. */
type Door = {
	mark: symbol;
	secrets: string[];
	whichSecret: (presented: unknown) => number;
	signatures: "accept" | "require";
	signingKeys: ReturnType<typeof createSigningKeys>;
	/** The nonce cache (part 2): true the first time a verified nonce is seen. */
	firstUse: (nonce: string, now: number) => boolean;
	publicPaths: Set<string>;
	/** The paths of `publicPaths`, without their methods: a first look that builds no string. */
	publicUrls: Set<string>;
	tally: Tally;
	logger: Logger | undefined;
};

/** One request, upgrade or stream as the door reads it, whichever way it came in. */
type Arrival = {
	target: object;
	headers: Headers;
	rawHeaders: string[];
	method: string;
	url: string;
	publicPathsApply: boolean;
};

// The check. It removes the door's headers first (wipeHeaders, part 3), so no code after it ever
// sees them. A signed request is decided by its signature alone (part 2); one without is decided
// by the secret, unless signatures are required. What it lets in gets this door's mark; what it
// turns away gets back the reason, for the edge it came through to write (part 3).
function check(door: Door, arrival: Arrival): Refusal | undefined {
	const { target, headers, method, url } = arrival;
	const [presented, sentConsumer] = [headers[HEADER], headers[CONSUMER_HEADER]];
	const consumer = typeof sentConsumer === "string" ? sentConsumer : undefined;
	const [signatureInput, signature] = [headers["signature-input"], headers["signature"]];
	const signed = signatureInput !== undefined || signature !== undefined;
	if (presented !== undefined || consumer !== undefined || signed) wipeHeaders(arrival);
	if (arrival.publicPathsApply && isPublic(door, method, url)) {
		(target as Marked)[door.mark] = { method, url, consumer: undefined };
		return undefined;
	}
	// With signatures required, the header only says that the secret still travels.
	const required = door.signatures === "require";
	if (required && presented !== undefined) door.tally.secretOnTheWire += 1;
	const entry = signed
		? verifySignature(door, { method, url, consumer, signatureInput, signature })
		: required
		? NO_SIGNATURE
		: whichEntry(door, presented);
	if (typeof entry !== "number") return entry;
	door.tally.accepted[entry - 1]! += 1;
	door.tally.lastSeen[entry - 1] = Date.now();
	// Only with the secret, or signed, is the consumer the API gateway's word.
	const named = consumer !== "" ? consumer : undefined;
	(target as Marked)[door.mark] = { method, url, consumer: named };
	return undefined;
}

// The page's form: the secret itself, compared in constant time.
function whichEntry(door: Door, presented: unknown): number | Refusal {
	if (!presented) return NO_SECRET;
	const entry = door.whichSecret(presented);
	return entry === 0 ? WRONG_SECRET : entry;
}

// A public path matches the method and the exact path before "?": no prefix, decoding or
// normalising, so "/health/../x", "//health" and "/health/" are not "/health". It is the path
// as the client sent it, whichever piece of the door meets the request.
function isPublic(door: Door, method: string, url: string): boolean {
	if (door.publicPaths.size === 0) return false;
	const query = url.indexOf("?");
	const path = query === -1 ? url : url.slice(0, query);
	return door.publicUrls.has(path) && door.publicPaths.has(`${method} ${path}`);
}

// ==== 2. The signed form: RFC 9421, so the secret itself never travels =======================

// The API gateway may sign each request instead of sending the secret: an HMAC-SHA256, keyed by
// the secret's UTF-8 bytes, over one fixed profile of RFC 9421 (HTTP Message Signatures):
//
//   Signature-Input: zuplo=("@method" "@path" "@query" "x-consumer");created=1796683601;
//                    nonce="uzJA6lxxEJk9oriy1Vhf8g";keyid="1xC0TdK7";alg="hmac-sha256"
//   Signature: zuplo=:<base64 of the HMAC of the signature base>:
//
// The door takes exactly these components ("x-consumer" last exactly when that header is sent):
// a verifier that trusted whatever list the signer declares would let an unsigned query through.
// Host and scheme are not covered, as a load balancer changes them; nor is the body
// (docs/zuplo.md says why). `created` may be 30 s old or 5 s ahead, and each nonce passes once.
const LABEL = "zuplo";
const COMPONENTS = ["@method", "@path", "@query"];
const COMPONENTS_WITH_CONSUMER = [...COMPONENTS, CONSUMER_HEADER];
const [WINDOW_PAST_S, WINDOW_AHEAD_S] = [30, 5];
// The parameters the profile allows, each with its type and whether it is required.
const PARAMETERS: ReadonlyMap<string, { type: "number" | "string"; required: boolean }> = new Map([
	["created", { type: "number", required: true }],
	["nonce", { type: "string", required: true }],
	["keyid", { type: "string", required: true }],
	["alg", { type: "string", required: true }],
	["expires", { type: "number", required: false }],
	["tag", { type: "string", required: false }],
]);

// A refused signature's challenge names the label, and Accept-Signature (RFC 9421 §5.1) the
// profile: never a keyid, which would name a secret.
const SIGNATURE_CHALLENGE = {
	"WWW-Authenticate": `SharedSecret signature="${LABEL}"`,
	"Accept-Signature": `${LABEL}=("@method" "@path" "@query");created;nonce;alg="hmac-sha256"`,
};
const NO_SIGNATURE = createRefusal(
	"missing",
	"No signature provided",
	Errors.ERR_NO_TOKEN,
	SIGNATURE_CHALLENGE,
);
const INVALID_SIGNATURE = createRefusal(
	"invalid",
	"Invalid signature",
	Errors.ERR_INVALID_TOKEN,
	SIGNATURE_CHALLENGE,
);

/** RFC 9421 §2.5: the signature base, a line a covered component, then @signature-params. */
export function signatureBase(
	components: readonly (readonly [string, string])[],
	signatureParams: string,
): string {
	let base = "";
	for (const [name, value] of components) base += `"${name}": ${value}\n`;
	return `${base}"@signature-params": ${signatureParams}`;
}

// A secrets entry's name in `keyid`: it names the entry without revealing it, and stays the
// same when "new,old" shifts positions, so a request costs one HMAC however many secrets.
export const keyIdOf = (secret: string) =>
	createHash("sha256").update(`keyid:${secret}`).digest("base64url").slice(0, 8);

// Each entry's keyid, with its entry number and HMAC key: built with the secrets.
function createSigningKeys(secrets: readonly string[]) {
	return new Map(secrets.map((secret, index) => {
		const key = createSecretKey(Buffer.from(secret));
		return [keyIdOf(secret), { entry: index + 1, key }] as const;
	}));
}

// Remembers each nonce of a verified signature for at least `ms`, in two generations: memory
// holds at most two windows' worth of the API gateway's requests (only verified ones count).
function createNonceCache(ms: number) {
	let [current, previous, turnAt] = [new Set<string>(), new Set<string>(), Date.now() + ms];
	return function firstUse(nonce: string, now: number): boolean {
		if (now >= turnAt) {
			previous = now >= turnAt + ms ? new Set() : current;
			[current, turnAt] = [new Set(), now + ms];
		}
		if (current.has(nonce) || previous.has(nonce)) return false;
		// A copy of its own: read out of the header, the nonce would keep the whole header's text
		// alive (V8 shares it), and the cache would hold three times the memory (npm run bench).
		current.add(Buffer.from(nonce, "latin1").toString("latin1"));
		return true;
	};
}

/** A request as the signature covers it: as the origin received it, headers unparsed. */
type Signed = {
	method: string;
	url: string;
	consumer: string | undefined;
	signatureInput: unknown;
	signature: unknown;
};

// Verifies the `zuplo` signature: the secrets entry it was signed with, or why it is refused.
// `@path` and `@query` are the URL split at the first "?", never decoded. Never throws.
function verifySignature(door: Door, signed: Signed): number | Refusal {
	// A tunnel opens no request for a signature to cover: a signed CONNECT is refused.
	if (signed.method === "CONNECT") return INVALID_SIGNATURE;
	const input = memberOf(signed.signatureInput);
	const signature = memberOf(signed.signature);
	if (input === undefined || signature === undefined) return NO_SIGNATURE;
	const params = input && readProfile(input, signed.consumer !== undefined);
	const signingKey = door.signingKeys.get(String(params?.get("keyid")));
	const bytes = signature?.value;
	if (!params || !signingKey || !(bytes instanceof Uint8Array)) return INVALID_SIGNATURE;
	const now = Date.now();
	const created = params.get("created") as number;
	const expires = (params.get("expires") ?? Infinity) as number;
	const seconds = now / 1000;
	const inWindow = created >= seconds - WINDOW_PAST_S && created <= seconds + WINDOW_AHEAD_S;
	if (!inWindow || expires < seconds) return INVALID_SIGNATURE;
	const query = signed.url.indexOf("?");
	const components: [string, string][] = [
		["@method", signed.method],
		["@path", query === -1 ? signed.url : signed.url.slice(0, query)],
		["@query", query === -1 ? "?" : signed.url.slice(query)],
	];
	if (signed.consumer !== undefined) components.push([CONSUMER_HEADER, signed.consumer]);
	const base = signatureBase(components, input.serialized ?? serialize(input));
	const expected = createHmac("sha256", signingKey.key).update(base).digest();
	if (bytes.length !== expected.length || !timingSafeEqual(bytes, expected)) {
		return INVALID_SIGNATURE;
	}
	// A replay is refused: a nonce is remembered once its signature has verified.
	return door.firstUse(String(params.get("nonce")), now) ? signingKey.entry : INVALID_SIGNATURE;
}

// The profile: exactly its components, each a string without parameters, then its parameters,
// in any order, each once and of its type; alg names the one algorithm, a nonce is 1 to 128
// characters (the nonce cache holds them).
function readProfile(member: Member, consumerSent: boolean) {
	const names = Array.isArray(member.value) ? member.value : [];
	const expected = consumerSent ? COMPONENTS_WITH_CONSUMER : COMPONENTS;
	const exact = names.length === expected.length &&
		names.every((item, index) => item.value === expected[index] && !item.params.length);
	const params = new Map(member.params);
	const typed = member.params.every(([name, value]) => {
		const type = PARAMETERS.get(name)?.type;
		return type === "string" ? typeof value === "string" : Number.isSafeInteger(value);
	});
	let complete = true;
	for (const [name, { required }] of PARAMETERS) complete &&= !required || params.has(name);
	const nonce = params.get("nonce");
	const valid = params.size === member.params.length && params.get("alg") === "hmac-sha256" &&
		typeof nonce === "string" && nonce.length >= 1 && nonce.length <= 128;
	return exact && typed && complete && valid ? params as Map<string, number | string> : undefined;
}

// ---- RFC 8941 structured fields, as far as the profile needs --------------------------------

/** A bare item. A token, a decimal and a byte sequence are objects: the profile takes none. */
type Bare = string | number | boolean | { token: string } | { decimal: number } | Uint8Array;
/** A dictionary member: an item or an inner list, with its parameters in the order received. */
type Member = {
	value: Bare | Member[];
	params: [string, Bare][];
	/** Its RFC 8941 serialization, where the text received was already that (the fast path). */
	serialized?: string;
};

// This door's member of a Signature or Signature-Input header: undefined when the header or the
// label is missing (no signature), null when the field does not parse or holds the label twice.
function memberOf(header: unknown): Member | null | undefined {
	if (typeof header !== "string") return undefined;
	const canonical = canonicalMember(header);
	if (canonical) return canonical;
	const found = parseDictionary(header);
	if (found === null) return null;
	const members = found.filter(([label]) => label === LABEL);
	return members.length > 1 ? null : members[0]?.[1];
}

// The fast path. Zuplo's policy, and most signers, write one member, already serialized as
// RFC 8941 serializes: strings without escapes, integers without a sign or leading zeros, no
// spaces but one between items. Two patterns read that form, and its text is then its own
// serialization. Anything else takes the full parser below, to the same result.
// A string that needs no escape: visible ASCII and space, but " and \.
const PLAIN_STRING = String.raw`"[\x20\x21\x23-\x5b\x5d-\x7e]*"`;
const CANONICAL_INPUT = new RegExp(
	String.raw`^${LABEL}=(\((?:${PLAIN_STRING}(?: ${PLAIN_STRING})*)?\)` +
		String.raw`(?:;[a-z*][a-z0-9_.*-]*=(?:${PLAIN_STRING}|0|[1-9]\d{0,14}))*)$`,
);
const CANONICAL_SIGNATURE = new RegExp(`^${LABEL}=:([A-Za-z0-9+/]*={0,2}):$`);

function canonicalMember(header: string): Member | undefined {
	const signature = CANONICAL_SIGNATURE.exec(header);
	if (signature) return { value: Buffer.from(signature[1]!, "base64"), params: NO_PARAMS };
	const serialized = CANONICAL_INPUT.exec(header)?.[1];
	if (serialized === undefined) return undefined;
	// The pattern has checked the form, so plain string searches read it: its strings hold no
	// quote, so the list ends at the first `")` (or is empty), and `" "` only ever separates
	// two strings. (A pattern per item cost more than the whole rest of the check.)
	const close = serialized.startsWith("()") ? 1 : serialized.indexOf('")') + 1;
	const names = close === 1 ? [] : serialized.slice(2, close - 1).split('" "');
	const items = names.map((value): Member => ({ value, params: NO_PARAMS }));
	const params: [string, Bare][] = [];
	for (let at = close + 1; at < serialized.length;) {
		const equals = serialized.indexOf("=", at);
		const name = serialized.slice(at + 1, equals);
		const quoted = serialized[equals + 1] === '"';
		const end = quoted
			? serialized.indexOf('"', equals + 2) + 1
			: serialized.indexOf(";", equals);
		const stop = end === 0 || end === -1 ? serialized.length : end;
		const text = serialized.slice(equals + 1, stop);
		params.push([name, quoted ? text.slice(1, -1) : Number(text)]);
		at = stop;
	}
	return { value: items, params, serialized };
}

// RFC 8941 §4.2.2, a sticky pattern at each step. It reads what the fast path does not, and
// no step builds a pattern or a closure per call. Any error fails the whole field.
type Cursor = { text: string; at: number };
const NOT_A_FIELD = new SyntaxError("not a structured field");
const KEY = /[a-z*][a-z0-9_.*-]*/y;
// An integer or decimal, a string, a token, a byte sequence, a boolean: one group each.
const BARE_ITEM = new RegExp(
	[
		/(-?\d{1,15})(\.\d{1,3})?/,
		/"((?:[\x20\x21\x23-\x5b\x5d-\x7e]|\\["\\])*)"/,
		/([A-Za-z*][!#$%&'*+\-.^_`|~\w:/]*)/,
		/:([A-Za-z0-9+/]*={0,2}):/,
		/\?([01])/,
	].map((pattern) => pattern.source).join("|"),
	"y",
);
const [SPACES, MEMBER_END] = [/ */y, /[ \t]*(?:,[ \t]*(?=.)|$)/y];

function parseDictionary(text: string): [string, Member][] | null {
	const cursor: Cursor = { text, at: 0 };
	const members: [string, Member][] = [];
	try {
		while (cursor.at < text.length) {
			const name = take(cursor, KEY)[0];
			// A member without "=" is the boolean true, with parameters.
			const member = skip(cursor, "=")
				? itemOrInnerList(cursor)
				: { value: true, params: params(cursor) };
			members.push([name, member]);
			take(cursor, MEMBER_END);
		}
		return members;
	} catch {
		return null;
	}
}

function take(cursor: Cursor, pattern: RegExp): RegExpExecArray {
	pattern.lastIndex = cursor.at;
	const found = pattern.exec(cursor.text);
	if (!found) throw NOT_A_FIELD;
	cursor.at = pattern.lastIndex;
	return found;
}

function skip(cursor: Cursor, char: string): boolean {
	if (cursor.text[cursor.at] !== char) return false;
	cursor.at += 1;
	return true;
}

function bareItem(cursor: Cursor): Bare {
	const found = take(cursor, BARE_ITEM);
	if (found[1] !== undefined) return found[2] ? { decimal: Number(found[0]) } : Number(found[1]);
	if (found[3] !== undefined) return found[3].replace(/\\(.)/g, "$1");
	if (found[4] !== undefined) return { token: found[4] };
	if (found[5] !== undefined) return Buffer.from(found[5], "base64");
	return found[6] === "1";
}

// Most items have no parameters: they share one empty list, never changed.
const NO_PARAMS: [string, Bare][] = [];

function params(cursor: Cursor): [string, Bare][] {
	if (cursor.text[cursor.at] !== ";") return NO_PARAMS;
	const list: [string, Bare][] = [];
	while (skip(cursor, ";")) {
		take(cursor, SPACES);
		list.push([take(cursor, KEY)[0], skip(cursor, "=") ? bareItem(cursor) : true]);
	}
	return list;
}

function itemOrInnerList(cursor: Cursor): Member {
	if (!skip(cursor, "(")) return { value: bareItem(cursor), params: params(cursor) };
	const items: Member[] = [];
	for (take(cursor, SPACES); !skip(cursor, ")"); take(cursor, SPACES)) {
		items.push({ value: bareItem(cursor), params: params(cursor) });
		if (cursor.text[cursor.at] !== " " && cursor.text[cursor.at] !== ")") throw NOT_A_FIELD;
	}
	return { value: items, params: params(cursor) };
}

// RFC 8941 §4.1, for what readProfile let through (strings without parameters, then string and
// integer parameters): @signature-params is rebuilt from what was received.
function serialize(member: Member): string {
	let text = "(";
	for (const item of member.value as Member[]) {
		text += (text === "(" ? "" : " ") + quoted(item.value as string);
	}
	text += ")";
	for (const [name, value] of member.params) {
		text += `;${name}=${typeof value === "string" ? quoted(value) : value}`;
	}
	return text;
}

const quoted = (value: string) =>
	value.includes('"') || value.includes("\\")
		? `"${value.replace(/["\\]/g, "\\$&")}"`
		: `"${value}"`;

// ==== 3. The edges: each way into the server, and why the door stands there =================

// What Express adds: `baseUrl`, the mount path taken off `url`; `originalUrl`, the client's URL.
type Request = IncomingMessage & Marked & {
	stream?: ServerHttp2Stream & Marked;
	baseUrl?: string;
	originalUrl?: string;
};
type Gateway = Service & {
	settings: { onError?: unknown; logResponse?: string | null };
	server?: Server | null;
	routes?: { path: string }[];
	sendError(req: Request, res: ServerResponse, error: Error): void;
	resolveAlias?(url: string, method: string): unknown;
	httpHandler(req: Request, res: ServerResponse, next?: unknown): unknown;
};

/** Where a refusal happens: this door, and the gateway whose server it guards, if any. */
type Edge = { door: Door; gateway: Gateway | undefined };

// A refused connection is closed this long after its 401, whatever the client does.
const LINGER_MS = 500;
const ignore = () => {};

// Every way in that Node's servers emit: what each starts, how its refusal is written, and
// whether public paths open it. Public paths open plain requests only: an upgrade (WebSocket,
// socket.io) or a tunnel needs the secret whatever its path.
//
//   event             starts                               refusal written by   public paths
//   request           an HTTP/1 request, or an HTTP/2 one   rejectRequest        yes
//                     through the compatibility API
//   checkContinue     a request with Expect: 100-continue   rejectRequest        yes
//   checkExpectation  a request with another Expect         rejectRequest        yes
//   upgrade           a WebSocket or socket.io upgrade      rejectSocket         no
//   connect           an HTTP/1 CONNECT tunnel              rejectSocket         no
//   stream            an HTTP/2 stream                      rejectStream         yes, but CONNECT
const ENTRY_POINTS = new Map(
	[
		["request", { writer: "response", publicPathsApply: true }],
		["checkContinue", { writer: "response", publicPathsApply: true }],
		["checkExpectation", { writer: "response", publicPathsApply: true }],
		["upgrade", { writer: "socket", publicPathsApply: false }],
		["connect", { writer: "socket", publicPathsApply: false }],
		["stream", { writer: "stream", publicPathsApply: true }],
	] as const,
);

// Node starts each entry point with server.emit, so the door wraps emit. A listener would not
// do: an emitter calls every listener, so one that refuses cannot keep the others (moleculer-web,
// socket.io, a WebSocket server) from answering too, and prependListener can put a later one in
// front. Wrapped, emit reaches the listeners only for what the door let in, whatever listens.
function guardServer(door: Door, server: Server, gateway: Gateway | undefined) {
	const edge: Edge = { door, gateway };
	const emit = server.emit as (this: Server, event: string, ...args: unknown[]) => boolean;
	server.emit = function emitAfterTheDoor(this: Server, event: string, ...args: unknown[]) {
		const entryPoint = ENTRY_POINTS.get(event as "request");
		if (entryPoint?.writer === "stream") {
			if (refuseStream(edge, args)) return true;
		} else if (entryPoint) {
			const req = args[0] as Request;
			// One verdict per request: an HTTP/2 request met the door as its stream, and the
			// checkContinue listener below emits `request` again for a request let in.
			if (req.stream) req[door.mark] ??= req.stream[door.mark];
			const refusal = req[door.mark] ? undefined : checkRequest(door, req, entryPoint);
			if (refusal && entryPoint.writer === "response") {
				return rejectRequest(edge, refusal, req, args[1] as ServerResponse);
			}
			if (refusal) return rejectSocket(edge, refusal, req, args[1] as Duplex);
		}
		return emit.call(this, event, ...args);
	} as Server["emit"];
	// Node answers `Expect: 100-continue` with "100 Continue" before any event, unless
	// something listens for checkContinue. This listener does what Node would, after the door.
	if (server.listenerCount("checkContinue") === 0) {
		server.on("checkContinue", (req: Request, res: ServerResponse) => {
			res.writeContinue();
			server.emit("request", req, res);
		});
	}
}

// The check, for HTTP/1 and Node's HTTP/2 compatibility API alike.
function checkRequest(
	door: Door,
	req: Request,
	entryPoint: { publicPathsApply: boolean },
	url = req.url ?? "",
) {
	const { headers, rawHeaders, method = "" } = req;
	const { publicPathsApply } = entryPoint;
	return check(door, { target: req, headers, rawHeaders, method, url, publicPathsApply });
}

// The one writer of a 401 to an HTTP/1 request, or an HTTP/2 one through Node's compatibility
// API. It returns `true`, which tells moleculer-web and Node's emit that the request is answered.
function rejectRequest(edge: Edge, refusal: Refusal, req: Request, res: ServerResponse) {
	countAndLog(edge, refusal, req.method, req.url);
	const { gateway } = edge;
	res.on("error", ignore);
	// HTTP/1 only: an HTTP/2 request's body is its own stream, and its socket carries others.
	const { "content-length": length = "0", "transfer-encoding": chunked } = req.headers;
	const hasBody = req.httpVersionMajor === 1 && (length !== "0" || chunked !== undefined);
	// Nobody makes the origin read a refused body: it stops reading it at once, and the socket
	// closes a moment after the whole 401. (Node would close a `Connection: close` answer at
	// once, and the unread body would turn that close into a reset that can overtake the 401.)
	if (hasBody) {
		req.socket?.pause();
		closeWithin(req.socket, LINGER_MS);
	}
	if (typeof gateway?.settings.onError === "function") {
		for (const [field, value] of Object.entries(refusal.challenge)) res.setHeader(field, value);
		if (hasBody) res.setHeader("Connection", "close");
		// An error of this request's own: the gateway's `onError` may change what it gets.
		const error = new Errors.UnAuthorizedError(refusal.type, undefined);
		gateway.sendError(req, res, Object.assign(error, { message: refusal.message }));
	} else {
		res.writeHead(401, hasBody ? refusal.closingHead : refusal.head);
		// Without end(), as Node would end the socket at once; closeWithin ends it instead.
		if (hasBody) res.write(refusal.body);
		else res.end(refusal.body);
	}
	return true;
}

// Node emits `stream` with (stream, headers, flags, rawHeaders): a stream has no request object,
// so its headers and raw headers are the event's. A CONNECT stream opens a tunnel.
function refuseStream(edge: Edge, args: unknown[]): boolean {
	const [stream, headers, , rawHeaders = []] = args as [ServerHttp2Stream, Headers, 0, string[]];
	const [method, url] = [String(headers[":method"]), String(headers[":path"])];
	const arrival = { target: stream, headers, rawHeaders, method, url };
	const refusal = check(edge.door, { ...arrival, publicPathsApply: method !== "CONNECT" });
	if (refusal) rejectStream(edge, refusal, stream, method, url);
	return refusal !== undefined;
}

// The one writer of a 401 to an upgrade's or a CONNECT's socket: it has no response object, so
// the 401 goes out as bytes. Node took its own error listener off the socket before the event,
// so the door adds one first: a client that resets would crash the process otherwise. Node no
// longer counts the socket as its connection, so closeAllConnections() would never end it: the
// door does, within a bound.
function rejectSocket(edge: Edge, refusal: Refusal, req: Request, socket: Duplex) {
	countAndLog(edge, refusal, req.method, req.url);
	socket.on("error", ignore);
	socket.end(refusal.bytes);
	closeWithin(socket, LINGER_MS);
	return true;
}

// The one writer of a 401 to an HTTP/2 stream. A refused stream may be reset already, or be a
// HEAD whose write side Node ended at `respond`: each write goes only where it may. A reset or a
// GOAWAY with an error code can end the stream between two lines, so an error listener comes
// first, and a throw from a stream that is gone is dropped with it.
function rejectStream(
	edge: Edge,
	refusal: Refusal,
	stream: ServerHttp2Stream,
	method: string,
	url: string,
) {
	countAndLog(edge, refusal, method, url);
	stream.on("error", ignore);
	try {
		if (!stream.destroyed && !stream.headersSent) {
			stream.respond(refusal.http2Head, { endStream: method === "HEAD" });
		}
		if (!stream.destroyed && !stream.writableEnded) stream.end(refusal.body);
	} catch {
		stream.destroy();
	}
	// The client may keep its side open for ever: the stream is closed within a bound.
	closeWithin(stream, LINGER_MS);
}

// Counts a refusal, and logs one short line, as moleculer-web logs each response: at the level
// of the gateway's `logResponse` ("info" by default; null logs none), or "info" where the door
// stands in front of no gateway (door.guard, door.express).
function countAndLog({ door, gateway }: Edge, refusal: Refusal, method: unknown, url: unknown) {
	door.tally[refusal.reason] += 1;
	const level = gateway ? gateway.settings.logResponse : "info";
	const log = (gateway?.logger ?? door.logger) as Record<string, unknown> | undefined;
	const write = level ? log?.[level] : undefined;
	if (typeof write === "function") {
		write.call(log, `<= 401 ${printable(method)} ${printable(url)}`);
	}
}

// With `server: false`, your own server or Express calls the gateway's httpHandler: the door
// stands there too, with the same rule as door.express() (below).
function guardHttpHandler(door: Door, gateway: Gateway) {
	const httpHandler = gateway.httpHandler;
	const edge: Edge = { door, gateway };
	gateway.httpHandler = function httpHandlerAfterTheDoor(req: Request, res, next) {
		const refusal = admitOnce(door, req);
		if (refusal) return rejectRequest(edge, refusal, req, res);
		// Mounted in Express, the gateway routes the URL below its mount point.
		req[door.mark]!.routedUrl = req.url ?? "";
		return httpHandler.call(this, req, res, next);
	};
}

/** For an Express app: the door in front of every route, door.express() in part 6. */
function guardExpress(door: Door) {
	return function sharedSecretDoor(req: IncomingMessage, res: ServerResponse, next: () => void) {
		const refusal = admitOnce(door, req as Request);
		if (refusal) rejectRequest({ door, gateway: undefined }, refusal, req as Request, res);
		else next();
	};
}

// A request that this door let in already (door.guard on the app's server, or door.express()
// before the gateway) is not checked again: its headers are gone. But its method and URL must be
// the ones the door checked: Express's methodOverride or a URL rewrite placed after the door would
// otherwise route what the door never saw. Public paths are matched against the URL as the client
// sent it, Express's `originalUrl`, so they mean the same whichever pieces are on.
function admitOnce(door: Door, req: Request) {
	const plain = ENTRY_POINTS.get("request")!;
	const refusal = req[door.mark] ? undefined : checkRequest(door, req, plain, req.originalUrl);
	if (refusal) return refusal;
	const { method, url } = req[door.mark]!;
	return req.method === method && isSameUrl(req, url) ? undefined : NO_SECRET;
}

// Express mounts move their path from req.url into req.baseUrl, and add a "/" where nothing is
// left: "/api?x" mounted at "/api" is "/?x".
function isSameUrl(req: Request, url: string): boolean {
	if (req.url === url) return true;
	const base = req.baseUrl;
	return !!base && (base + req.url === url || base + req.url?.slice(1) === url);
}

// moleculer-web routes each request in its private `rest` action, and a broker retryPolicy
// calls it again with the URL it has rewritten. This puts back the URL the door let in, and
// refuses a request that never met this door, or whose method changed since.
function guardRest(door: Door, next: ActionHandler): ActionHandler {
	return function restAfterTheDoor(this: Service, ctx: Context) {
		const { req, res } = ctx.params as { req: Request; res: ServerResponse };
		const admission = req[door.mark];
		if (admission === undefined || req.method !== admission.method) {
			return Promise.resolve(
				rejectRequest({ door, gateway: undefined }, NO_SECRET, req, res),
			);
		}
		req.url = admission.routedUrl ?? admission.url;
		// A meta object of its own: moleculer-web may share one (rootCallOptions.meta).
		const { consumer } = admission;
		if (consumer !== undefined) ctx.meta = { ...ctx.meta, consumer };
		return next.call(this, ctx);
	};
}

type PacketHandler = (cmd: string, packet: { payload?: { action?: string } }) => unknown;

// A gateway's addRoute and removeRoute are protected (keepRoutesLocal), yet a crafted REQUEST
// packet from the transporter could still name them: the door drops it before any action.
// Moleculer's own handler answers a packet it drops with Promise.resolve(false): so does this.
function dropRouteCalls(door: Door, routeActions: Set<string>) {
	return (next: PacketHandler): PacketHandler => (cmd, packet) => {
		const action = cmd === "REQ" ? packet?.payload?.action : undefined;
		if (action === undefined || !routeActions.has(action)) return next(cmd, packet);
		door.logger?.warn(
			`SharedSecretMiddleware: dropped a call to ${action} from the transporter.`,
		);
		return Promise.resolve(false);
	};
}

// The headers that carry the secret or its proof, and the consumer that rides on them.
const DOOR_HEADERS = new Set([HEADER, CONSUMER_HEADER, "signature", "signature-input"]);
const DOOR_HEADER_LENGTHS = new Set([...DOOR_HEADERS].map((field) => field.length));
const isDoorHeader = (field: string) => DOOR_HEADERS.has(field);

// Removes the door's headers from every form of the request's headers, so a service that
// forwards copied headers sends none of them. The raw headers are compacted in place. An HTTP/1
// request gets `headers` as a copy through Node's public setter (a `delete` would make it a
// slow dictionary), and `headersDistinct` as an own property, built on first use from the wiped
// raw headers: Node would build it from a count that no longer holds, and building it for every
// request would cost more than the whole check. An HTTP/2 stream's headers are a dictionary
// already. (A profile put this at under a microsecond a request: measure before you change it.)
function wipeHeaders({ target, headers, rawHeaders }: Arrival) {
	let kept = 0;
	for (let index = 0; index < rawHeaders.length; index += 2) {
		const field = rawHeaders[index]!;
		// Only a name that starts with "x" or "s" and has a door header's length is lowercased.
		const first = field.charCodeAt(0) | 0x20;
		const mayBeDoor = (first === 0x78 || first === 0x73) &&
			DOOR_HEADER_LENGTHS.has(field.length);
		if (mayBeDoor && isDoorHeader(field.toLowerCase())) continue;
		rawHeaders[kept] = field;
		rawHeaders[kept + 1] = rawHeaders[index + 1]!;
		kept += 2;
	}
	rawHeaders.length = kept;
	if (!("rawHeaders" in target)) {
		for (const field of DOOR_HEADERS) delete headers[field];
		return;
	}
	const copy: Headers = {};
	for (const field in headers) if (!isDoorHeader(field)) copy[field] = headers[field];
	(target as IncomingMessage).headers = copy as IncomingMessage["headers"];
	Object.defineProperty(target, "headersDistinct", DISTINCT_FROM_RAW);
}

// One descriptor for every request: the getter builds headersDistinct as Node does, once.
const WRITABLE = { writable: true, enumerable: true, configurable: true };
const ownValue = (target: object, value: unknown) =>
	Object.defineProperty(target, "headersDistinct", { value, ...WRITABLE });
const DISTINCT_FROM_RAW = {
	configurable: true,
	enumerable: true,
	get(this: IncomingMessage) {
		const [rawHeaders, distinct] = [this.rawHeaders, {} as Record<string, string[]>];
		for (let index = 0; index < rawHeaders.length; index += 2) {
			(distinct[rawHeaders[index]!.toLowerCase()] ??= []).push(rawHeaders[index + 1]!);
		}
		ownValue(this, distinct);
		return distinct;
	},
	set(this: IncomingMessage, value: unknown) {
		ownValue(this, value);
	},
};

// Ends a refused connection within a bound, whatever the client does. unref(): the timer never
// keeps a stopping process alive.
function closeWithin(connection: { destroy(): unknown } | null | undefined, ms: number) {
	if (connection) setTimeout(() => connection.destroy(), ms).unref();
}

// The caller chose the method and the URL. A refusal's line holds 120 characters of each, and
// escapes every control character (C0, DEL and C1, Unicode's Cc): a terminal obeys some of them.
function printable(value: unknown, length = 120): string {
	const text = String(value);
	const cut = text.length <= length
		? text
		: `${text.slice(0, length)}... (${text.length} characters)`;
	return cut.replace(
		/\p{Cc}/gu,
		(control) => `\\x${control.charCodeAt(0).toString(16).padStart(2, "0")}`,
	);
}

// A moleculer-web gateway, whatever it is called, has these two methods.
function isGateway(schema: ServiceSchema | undefined): schema is ServiceSchema {
	const methods = schema?.methods as Partial<Gateway> | undefined;
	return typeof methods?.sendError === "function" && typeof methods.httpHandler === "function";
}

// A gateway's addRoute and removeRoute answer every node of a cluster by default, so a node that
// joins could take the routes away. "protected" leaves them to services on this node, and the
// door drops a packet that calls them anyway. listAliases stays published, for HTTP.
function keepRoutesLocal(schema: ServiceSchema) {
	const actions = (schema.actions ?? {}) as Record<string, object>;
	for (const name of ["addRoute", "removeRoute"]) {
		if (actions[name]) actions[name] = { ...actions[name], visibility: "protected" };
	}
}

// Warnings, not errors: a route can come later (addRoute, autoAliases), and then match. A public
// path is the full path the client sends. On a gateway with a server of its own, it must match
// an alias. A gateway without one is mounted (in Express): there, an item that matches an alias
// as it stands is likely written below the mount point, where it opens nothing.
function warnOfPublicPaths(logger: Logger, publicPaths: Set<string>, gateways: Gateway[]) {
	const served = gateways.filter((gateway) => gateway.server && gateway.resolveAlias);
	const mounted = gateways.filter((gateway) => !gateway.server && gateway.resolveAlias);
	const routes = served.flatMap((gateway) => (gateway.routes ?? []).map((route) => route.path));
	for (const item of publicPaths) {
		const [method, url] = item.split(" ") as [string, string];
		const matches = (gateway: Gateway) => !!gateway.resolveAlias!(url, method);
		if (served.length && !served.some(matches)) {
			logger.warn(
				`SharedSecretMiddleware: public path "${item}" matches no alias of the routes ` +
					`${routes.join(", ")}. Write the full path, the route's path included.`,
			);
		}
		if (mounted.some(matches)) {
			logger.warn(
				`SharedSecretMiddleware: public path "${item}" matches an alias of a mounted ` +
					"gateway as it stands. Public paths are full paths, as clients send them: " +
					`under app.use("/api", gateway.express()), write "${method} /api${url}".`,
			);
		}
	}
}

// ==== 4. The options, checked at the call ==================================================

// The messages never hold the value: they go to the logs.
function readSecrets(value: unknown): string[] {
	const list = typeof value === "string" ? value.split(",") : Array.isArray(value) ? value : [];
	const secrets = list.map((secret) => String(secret).trim());
	const make = "Make one with: openssl rand -hex 32";
	if (secrets.every((secret) => secret === "")) {
		throw configError(`SharedSecretMiddleware: no secret is set. ${make}`);
	}
	secrets.forEach((secret, index) => {
		const entry = `SharedSecretMiddleware: secrets entry ${index + 1} of ${secrets.length}`;
		const first = secrets.indexOf(secret);
		if (secret.length < 32) {
			throw configError(`${entry} is ${secret.length} characters; it needs 32. ${make}`);
		}
		// Visible ASCII travels through any gateway and HTTP stack unchanged.
		if (!/^[\x21-\x7e]+$/.test(secret)) {
			throw configError(`${entry} holds a space or a non-ASCII character. ${make}`);
		}
		// A placeholder, such as "changeme" repeated, has few different characters.
		if (new Set(secret).size < 8) {
			throw configError(`${entry} uses fewer than 8 different characters. ${make}`);
		}
		// Each request is counted against exactly one entry.
		if (first !== index) throw configError(`${entry} is the same as entry ${first + 1}.`);
	});
	return secrets;
}

function readPublicPaths(value: string | readonly string[] | undefined): Set<string> {
	const list = typeof value === "string" ? value.split(",") : [...(value ?? [])];
	const paths = new Set<string>();
	for (const text of list.map((item) => String(item).trim()).filter(Boolean)) {
		const [, method, path] = /^([A-Z]+) (\/\S*)$/.exec(text.replace(/\s+/, " ")) ?? [];
		const which = `SharedSecretMiddleware: publicPaths item "${text}"`;
		if (!path || path.includes("?")) throw configError(`${which} is not "METHOD /path".`);
		// moleculer-web routes OPTIONS as the method that a preflight names, so this item would
		// open other methods. Browsers send preflights to the API gateway, not here.
		if (method === "OPTIONS") {
			throw configError(
				`${which} opens every method: answer CORS preflights at the API gateway.`,
			);
		}
		// A CONNECT opens a tunnel, never a plain request: it always needs the secret.
		if (method === "CONNECT") throw configError(`${which} opens a tunnel: never public.`);
		paths.add(`${method} ${path}`);
	}
	return paths;
}

function readSignatureMode(value: unknown): "accept" | "require" {
	if (value === undefined || value === "accept" || value === "require") return value ?? "accept";
	throw configError(
		`SharedSecretMiddleware: signatures is "${value}"; it needs accept or require.`,
	);
}

function readSeconds(name: string, value: number): number {
	if (Number.isInteger(value) && value >= 1) return value;
	throw configError(
		`SharedSecretMiddleware: ${name} is ${value}; it needs whole seconds, 1 or more.`,
	);
}

// A stack trace would bury the one line that says what to fix, so the error carries none.
function configError(message: string): Error {
	const error = new Error(message);
	error.stack = `Error: ${message}`;
	return error;
}

// ==== 5. The rotation report: which secret is in use, by position, never by value ==========

type Metric = { set(value: number, labels: Record<string, string | number>): void };

// An entry keeps its counts only while the same secret holds its position. Called whenever the
// secrets change, with a broker or before one exists, so the tally always has one slot an entry.
function resizeTally(tally: Tally, before: string[], after: string[]) {
	const kept = (counts: number[]) => after.map((it, i) => (before[i] === it ? counts[i]! : 0));
	[tally.accepted, tally.lastSeen] = [kept(tally.accepted), kept(tally.lastSeen)];
}

// Every `every` seconds it logs how many requests used each entry after the first (those a
// rotation removes), and once, that one unused for `quiet` seconds can be removed. With the
// broker's metrics on, the counts go to Moleculer's registry once a second.
function createRotationReport(broker: ServiceBroker, tally: Tally, every: number, quiet: number) {
	const log = (line: string) => broker.logger.info(`SharedSecretMiddleware: ${line}`);
	const [period, quietFor] = [duration(every), duration(quiet)];
	let [reported, since, saidQuiet] = [[...tally.accepted], Date.now(), [] as boolean[]];
	let reportedOnTheWire = tally.secretOnTheWire;
	function logUsage() {
		const onTheWire = tally.secretOnTheWire - reportedOnTheWire;
		reportedOnTheWire = tally.secretOnTheWire;
		if (onTheWire > 0) {
			log(
				`${onTheWire} requests in ${period} carried ${HEADER}: the secret is still ` +
					'on the wire. With signatures: "require", remove it at the API gateway.',
			);
		}
		for (let index = 1; index < tally.accepted.length; index++) {
			const entry = `secrets entry ${index + 1} of ${tally.accepted.length}`;
			const used = tally.accepted[index]! - (reported[index] ?? 0);
			const last = tally.lastSeen[index] || since;
			const at = `the last at ${new Date(last).toISOString()}`;
			if (used > 0) log(`${entry} is still in use: ${used} requests in ${period}, ${at}.`);
			saidQuiet[index] &&= used === 0;
			if (saidQuiet[index] || Date.now() - last < quiet * 1000) continue;
			saidQuiet[index] = true;
			log(`no request has used ${entry} for ${quietFor}; it can be removed.`);
		}
		reported = [...tally.accepted];
	}
	// moleculer 0.14 and 0.15 type register() differently; both return a metric with `set`.
	const registry = broker.metrics as unknown as { register(options: object): Metric };
	const metric = (type: string, name: string, labelNames: string[], description: string) =>
		registry.register({ type, name: `shared_secret.${name}`, labelNames, description });
	const accepted = metric("counter", "accepted.total", ["entry"], "Requests let in, by entry");
	const refusals = metric("counter", "refused.total", ["reason"], "Requests refused, by reason");
	const lastSeen = metric("gauge", "last_seen.seconds", ["entry"], "Each entry's last use");
	const onTheWire = metric(
		"counter",
		"secret_on_the_wire.total",
		[],
		"Unsigned, with the secret",
	);
	function copyToMetrics() {
		tally.accepted.forEach((count, index) => accepted.set(count, { entry: index + 1 }));
		tally.lastSeen.forEach((ms, index) =>
			lastSeen.set(Math.floor(ms / 1000), { entry: index + 1 })
		);
		refusals.set(tally.missing, { reason: "missing" });
		refusals.set(tally.invalid, { reason: "invalid" });
		onTheWire.set(tally.secretOnTheWire, {});
	}
	const timers: ReturnType<typeof setInterval>[] = [];
	return {
		start() {
			const count = tally.accepted.length;
			if (count > 1) log(`${count} secrets; entry 1 is the current one.`);
			// unref(): the timers never keep a stopping process alive.
			timers.push(setInterval(logUsage, every * 1000).unref());
			if (broker.isMetricsEnabled()) timers.push(setInterval(copyToMetrics, 1000).unref());
		},
		stop: () => timers.forEach(clearInterval),
		// After resizeTally: the next report counts from now.
		restart() {
			[reported, since, saidQuiet] = [[...tally.accepted], Date.now(), []];
		},
	};
}

const duration = (s: number) => (s % 60 ? `${s} s` : `${s / 60} minute${s === 60 ? "" : "s"}`);

// ==== 6. The door: its state, the check at each edge, and the hooks =========================

export function SharedSecretMiddleware(options: SharedSecretOptions) {
	// Moleculer calls a function in `middlewares` with the broker: the call was left out.
	if (!options || "createService" in options) {
		const call = "middlewares: [SharedSecretMiddleware({ secrets })]";
		throw configError(`SharedSecretMiddleware must be called: ${call}`);
	}
	// Every option is checked here, at the call, so a weak secret stops the process at start.
	const secrets = readSecrets(options.secrets);
	const publicPaths = readPublicPaths(options.publicPaths);
	const reportSeconds = readSeconds("reportSeconds", options.reportSeconds ?? 60);
	const quietSeconds = readSeconds("quietSeconds", options.quietSeconds ?? 600);
	const signatures = readSignatureMode(options.signatures);
	const zeros = () => secrets.map(() => 0);
	const door: Door = {
		// Set on what this door let in: another door in the same process neither sees nor sets it.
		mark: Symbol("SharedSecretMiddleware admitted"),
		secrets,
		whichSecret: createSecretMatcher(secrets),
		signatures,
		signingKeys: createSigningKeys(secrets),
		// A signature is valid for WINDOW_PAST_S + WINDOW_AHEAD_S: its nonce is kept that long.
		firstUse: createNonceCache((WINDOW_PAST_S + WINDOW_AHEAD_S) * 1000),
		publicPaths,
		publicUrls: new Set([...publicPaths].map((item) => item.slice(item.indexOf(" ") + 1))),
		tally: { accepted: zeros(), lastSeen: zeros(), missing: 0, invalid: 0, secretOnTheWire: 0 },
		logger: undefined,
	};
	const gateways: Gateway[] = [];
	const routeActions = new Set<string>();
	let rotationReport: ReturnType<typeof createRotationReport> | undefined;

	// Where the door meets Moleculer. No `name`: moleculer 0.14 types a middleware as hooks only,
	// and so each member that is not a hook takes `unknown`.
	return {
		created(broker: ServiceBroker) {
			door.logger = broker.logger;
			rotationReport = createRotationReport(broker, door.tally, reportSeconds, quietSeconds);
			const listed = [...publicPaths].join(", ") || "none";
			const form = signatures === "require"
				? `a "${LABEL}" signature`
				: `${HEADER} or a signature`;
			door.logger.info(`SharedSecretMiddleware: ${form} required; public: ${listed}.`);
		},
		serviceCreating(_service: Service, schema: ServiceSchema) {
			if (isGateway(schema)) keepRoutesLocal(schema);
		},
		// A gateway's server exists once its own `created` has run.
		serviceCreated(service: Service) {
			if (!isGateway(service.schema)) return;
			const gateway = service as Gateway;
			gateways.push(gateway);
			routeActions.add(`${gateway.fullName}.addRoute`).add(`${gateway.fullName}.removeRoute`);
			if (gateway.server) guardServer(door, gateway.server, gateway);
			guardHttpHandler(door, gateway);
		},
		localAction(next: ActionHandler, action: ActionSchema): ActionHandler {
			const { rawName, service } = action as ActionSchema & { rawName?: string };
			return rawName === "rest" && isGateway(service?.schema) ? guardRest(door, next) : next;
		},
		// Moleculer hands this hook every packet from the transporter, before any action. (Its
		// 0.15 types say the hook returns a Promise; it returns the handler, as in 0.14.)
		transitMessageHandler: dropRouteCalls(door, routeActions) as never,
		started(broker: ServiceBroker) {
			warnOfPublicPaths(broker.logger, publicPaths, gateways);
			rotationReport?.start();
			return Promise.resolve();
		},
		stopped: () => Promise.resolve(rotationReport?.stop()),

		/** For an Express app: `app.use(door.express())`, before every other middleware. */
		express: () => guardExpress(door),

		/** Any other server, an Express app's for its upgrades: `door.guard(server)`. */
		guard(server: unknown) {
			guardServer(door, server as Server, undefined);
		},

		/**
		 * The consumer that the API gateway named on a request this door let in, or undefined:
		 * for a WebSocket or socket.io handler, which has no `ctx.meta` (`ws`: the request of
		 * `connection`; socket.io: `socket.request`).
		 */
		consumerOf(request: unknown): string | undefined {
			const marked = request as Marked | null | undefined;
			return marked?.[door.mark]?.consumer;
		},

		/**
		 * Replaces the secrets while the origin runs, given as the `secrets` option is. If
		 * the new ones fail its checks, it throws and changes nothing.
		 */
		setSecrets(replacement: unknown) {
			const secretsNow = readSecrets(replacement);
			door.whichSecret = createSecretMatcher(secretsNow);
			door.signingKeys = createSigningKeys(secretsNow);
			resizeTally(door.tally, door.secrets, secretsNow);
			rotationReport?.restart();
			door.secrets = secretsNow;
			const entries = `${secretsNow.length} ${secretsNow.length === 1 ? "entry" : "entries"}`;
			door.logger?.info(
				`SharedSecretMiddleware: the secrets changed: ${entries}, entry 1 current.`,
			);
		},
	};
}
