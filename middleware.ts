/**
 * SharedSecretMiddleware, the origin's door. A request that reaches a moleculer-web gateway's
 * server without the `x-shared-secret` that the API gateway (Zuplo) adds gets a 401, so nobody
 * can go around the API gateway. With the secret, the caller that the API gateway names in
 * `x-consumer` reaches services as `ctx.meta.consumer`.
 *
 *     const door = SharedSecretMiddleware({ secrets: "new,old", publicPaths: "GET /health" });
 *     const broker = new ServiceBroker({ middlewares: [door] });
 *
 * From the moleculer-shared-secret-origin template, tested with moleculer 0.15.2 + moleculer-web
 * 0.11.0 and 0.14.36 + 0.10.8, Node 22 and 24, Deno 2, Bun 1, Express 4 and 5. It imports nothing
 * of its project: copy it alone, and compare it with the template's to update it.
 */
import { timingSafeEqual } from "node:crypto";
import type { IncomingMessage, Server, ServerResponse } from "node:http";
import type { ServerHttp2Stream } from "node:http2";
import type { Duplex } from "node:stream";
import type { ActionHandler, ActionSchema, Context, Service, ServiceBroker } from "moleculer";
import type { ServiceSchema } from "moleculer";
import * as MoleculerWeb from "moleculer-web";

// ==== 1. What the page promises: the options, the check, the comparison, the 401 ============

export type SharedSecretOptions = {
	/** The secret, or several while you rotate ("new,old" or a list): entry 1 is current. */
	secrets: string | readonly string[] | undefined;
	/** "METHOD /exact/path" items, listed or comma-separated: plain requests need no secret. */
	publicPaths?: string | readonly string[] | undefined;
	/** How often the rotation report logs which entries are in use (60 s). */
	reportSeconds?: number | undefined;
	/** How long an entry after the first goes unused before it is called removable (600 s). */
	quietSeconds?: number | undefined;
};

/** What the door adds to `ctx.meta`: the consumer, on requests with the secret only. */
export type SharedSecretMeta = { consumer?: string };

const HEADER = "x-shared-secret";
const CONSUMER_HEADER = "x-consumer"; // Who called, as the API gateway vouches for it.
// In bytes: the comparison does the same work for any secret up to this length.
const COMPARE_WIDTH = 256;
// RFC 9110 §15.5.2: a 401 carries a challenge. It is no standard scheme: it names the header.
const CHALLENGE = `SharedSecret header="${HEADER}"`;

/** What the door let in: the method and the URL it checked, and the API gateway's consumer. */
type Admission = { method: string; url: string; consumer: string | undefined };
/** Why the door turned a request away, with its answer prebuilt for each kind of connection. */
type Refusal = ReturnType<typeof createRefusal>;
type Gateway = Service & {
	settings: { onError?: unknown; logResponse?: string | null };
	server?: Server | null;
	routes?: { path: string }[];
	sendError(req: Request, res: ServerResponse, error: Error): void;
	resolveAlias?(url: string, method: string): unknown;
	httpHandler(req: Request, res: ServerResponse, next?: unknown): unknown;
};
type Headers = Record<string, unknown>;
type Tally = { accepted: number[]; lastSeen: number[]; missing: number; invalid: number };
type Request = IncomingMessage & { stream?: ServerHttp2Stream; baseUrl?: string };

// moleculer-web's own error classes. ESM and esModuleInterop see its exports as `default`; a
// CommonJS build without esModuleInterop sees them as the module itself.
type WebErrors =
	& { UnAuthorizedError: new (type: string, data: unknown) => Error }
	& Record<"ERR_NO_TOKEN" | "ERR_INVALID_TOKEN", string>;
const web = MoleculerWeb as unknown as { Errors: WebErrors; default?: { Errors: WebErrors } };
const Errors = (web.default ?? web).Errors;

// moleculer-web's own UnAuthorizedError and its JSON body, with the head that each kind of
// connection needs: built once, as every refusal of one kind is the same.
function createRefusal(reason: "missing" | "invalid", message: string, type: string) {
	const error = Object.assign(new Errors.UnAuthorizedError(type, undefined), { message });
	const body = JSON.stringify({ name: error.name, message, code: 401, type });
	const head = {
		"Content-Type": "application/json; charset=utf-8",
		"Content-Length": String(Buffer.byteLength(body)),
		"WWW-Authenticate": CHALLENGE,
	};
	const closingHead = { ...head, Connection: "close" };
	// An upgrade's socket has no response object: the 401 goes out as bytes.
	const fields = Object.entries(closingHead).map(([name, value]) => `${name}: ${value}\r\n`);
	const bytes = `HTTP/1.1 401 Unauthorized\r\n${fields.join("")}\r\n${body}`;
	const lowerCase = Object.entries(head).map(([name, value]) => [name.toLowerCase(), value]);
	const http2Head = { ":status": 401, ...Object.fromEntries(lowerCase) };
	return { reason, error, body, head, closingHead, bytes, http2Head };
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

export function SharedSecretMiddleware(options: SharedSecretOptions) {
	// Moleculer calls a function in `middlewares` with the broker: the call was left out.
	if (!options || "createService" in options) {
		const call = "middlewares: [SharedSecretMiddleware({ secrets })]";
		throw configError(`SharedSecretMiddleware must be called: ${call}`);
	}
	// Every option is checked here, at the call, so a weak secret stops the process at start.
	let secrets = readSecrets(options.secrets);
	let whichSecret = createSecretMatcher(secrets);
	const publicPaths = readPublicPaths(options.publicPaths);
	const publicUrls = new Set([...publicPaths].map((item) => item.slice(item.indexOf(" ") + 1)));
	const reportSeconds = readSeconds("reportSeconds", options.reportSeconds ?? 60);
	const quietSeconds = readSeconds("quietSeconds", options.quietSeconds ?? 600);
	// This door's own mark: another door in the same process neither sees nor sets it.
	const admitted = Symbol("SharedSecretMiddleware admitted");
	type Marked = { [admitted]?: Admission | undefined };
	const zeros = () => secrets.map(() => 0);
	const tally: Tally = { accepted: zeros(), lastSeen: zeros(), missing: 0, invalid: 0 };
	const gateways: Gateway[] = [];
	const routeActions = new Set<string>();
	let logger: ServiceBroker["logger"] | undefined;
	let report: ReturnType<typeof createReport> | undefined;

	// The door itself. It removes both headers first, so no code after it ever sees them. A
	// request it lets in gets this door's mark; one it turns away gets back the reason.
	function check(
		target: Marked,
		headers: Headers,
		raw: string[],
		method: string,
		url: string,
		publicPathsApply: boolean,
	): Refusal | undefined {
		const presented = headers[HEADER];
		const consumer = headers[CONSUMER_HEADER];
		if (presented !== undefined || consumer !== undefined) wipeHeaders(target, headers, raw);
		// A public path matches the method and the exact path before "?": no prefix, decoding
		// or normalising, so "/health/../x", "//health" and "/health/" are not "/health".
		// (The path alone is looked up first: most requests then build no string at all.)
		if (publicPathsApply && publicPaths.size !== 0) {
			const query = url.indexOf("?");
			const path = query === -1 ? url : url.slice(0, query);
			if (publicUrls.has(path) && publicPaths.has(`${method} ${path}`)) {
				target[admitted] = { method, url, consumer: undefined };
				return undefined;
			}
		}
		if (!presented) return NO_SECRET;
		const entry = whichSecret(presented);
		if (entry === 0) return WRONG_SECRET;
		tally.accepted[entry - 1]! += 1;
		tally.lastSeen[entry - 1] = Date.now();
		// Only with the secret is the consumer the API gateway's word.
		const named = typeof consumer === "string" && consumer !== "" ? consumer : undefined;
		target[admitted] = { method, url, consumer: named };
		return undefined;
	}

	// Writes the 401 to an HTTP/1 request, or an HTTP/2 one through Node's compatibility API.
	// `true` tells moleculer-web that the request is answered.
	function rejectRequest(refusal: Refusal, req: Request, res: ServerResponse, gateway?: Gateway) {
		countAndLog(refusal, req.method, req.url, gateway);
		res.on("error", ignore);
		const { "content-length": length = "0", "transfer-encoding": chunked } = req.headers;
		const hasBody = req.httpVersionMajor === 1 && (length !== "0" || chunked !== undefined);
		// Nobody makes the origin read a refused body: it stops reading it at once.
		if (hasBody) req.socket?.pause();
		if (typeof gateway?.settings.onError === "function") {
			// A gateway `onError` gets a copy, so what it changes stays with this request.
			res.setHeader("WWW-Authenticate", CHALLENGE);
			if (hasBody) res.setHeader("Connection", "close");
			const { error } = refusal;
			const copy = Object.assign(Object.create(Object.getPrototypeOf(error)), error);
			gateway.sendError(req, res, Object.assign(copy, { message: error.message }));
		} else if (hasBody) {
			answerThenClose(refusal, req, res);
		} else {
			res.writeHead(401, refusal.head).end(refusal.body);
		}
		return true;
	}

	// The door stands at each way into the server: part 2 below says where, and why.
	return middleware();

	// ==== 2. The edges: each way into the server, and why the door stands there ============

	// The request's form of the check, for HTTP/1 and Node's HTTP/2 compatibility API alike.
	function checkRequest(req: Request & Marked, url: string, publicPathsApply: boolean) {
		return check(req, req.headers, req.rawHeaders, req.method ?? "", url, publicPathsApply);
	}

	// Counts a refusal, and logs one short line, as moleculer-web logs each response.
	function countAndLog(refusal: Refusal, method: unknown, url: unknown, gateway?: Gateway) {
		tally[refusal.reason] += 1;
		const level = gateway ? gateway.settings.logResponse : "info";
		const log = gateway?.logger ?? logger;
		if (log && (level === "info" || level === "warn" || level === "debug")) {
			log[level](`<= 401 ${cut(method)} ${cut(url)}`);
		}
	}

	// Node starts every request, upgrade, CONNECT and HTTP/2 stream with server.emit, so the
	// door wraps emit: each one meets the door before any listener (moleculer-web's, socket.io's,
	// a WebSocket server's, whatever comes later), and the listeners stay as they are.
	function guardServer(server: Server, gateway: Gateway | undefined) {
		const emit = server.emit as (this: Server, event: string, ...args: unknown[]) => boolean;
		server.emit = function emitAfterTheDoor(this: Server, event: string, ...args: unknown[]) {
			if (event === "stream") {
				const [stream, headers] = args as [ServerHttp2Stream & Marked, Headers];
				const [method, url] = [String(headers[":method"]), String(headers[":path"])];
				const raw = (args[3] as string[] | undefined) ?? [];
				const refusal = check(stream, headers, raw, method, url, method !== "CONNECT");
				if (refusal) return rejectStream(refusal, stream, method, url, gateway);
			} else if (REQUEST_EVENTS.has(event)) {
				const req = args[0] as Request & Marked;
				// One verdict per request: an HTTP/2 request met the door as its stream, and the
				// checkContinue listener below emits `request` again.
				if (req.stream) req[admitted] ??= (req.stream as Marked)[admitted];
				// Public paths open plain requests only: a WebSocket on /health needs the secret.
				const plain = event !== "upgrade" && event !== "connect";
				const refusal = req[admitted] ? undefined : checkRequest(req, req.url ?? "", plain);
				if (refusal && plain) {
					return rejectRequest(refusal, req, args[1] as ServerResponse, gateway);
				}
				if (refusal) return rejectSocket(refusal, req, args[1] as Duplex, gateway);
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

	// An upgrade's or a CONNECT's socket has no response object: the 401 goes out as bytes. Node
	// took its own error listener off the socket before the event, so the door adds one first: a
	// client that resets would crash the process otherwise. Node no longer counts the socket as
	// its connection, so closeAllConnections() would never end it: the door does, within a bound.
	function rejectSocket(refusal: Refusal, req: Request, socket: Duplex, gateway?: Gateway) {
		countAndLog(refusal, req.method, req.url, gateway);
		socket.on("error", ignore);
		socket.end(refusal.bytes);
		closeWithin(socket, LINGER_MS);
		return true;
	}

	// A refused HTTP/2 stream may be reset already, or be a HEAD whose write side Node ended at
	// `respond`: each write goes only where it may. A reset or a GOAWAY with an error code can
	// end the stream between two lines, so an error listener comes first, and a throw from a
	// stream that is gone is dropped with it.
	function rejectStream(
		refusal: Refusal,
		stream: ServerHttp2Stream,
		method: string,
		url: string,
		gateway?: Gateway,
	) {
		countAndLog(refusal, method, url, gateway);
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
		return true;
	}

	// With `server: false`, your own server or Express calls the gateway's httpHandler: the door
	// stands there too. A request that a door of this broker let in already is not checked again,
	// but its method and URL must be the ones that door checked: Express's methodOverride or a
	// URL rewrite placed after door.express() would otherwise route what the door never saw.
	function guardHttpHandler(gateway: Gateway) {
		const httpHandler = gateway.httpHandler;
		gateway.httpHandler = function httpHandlerAfterTheDoor(req: Request & Marked, res, next) {
			let admission = req[admitted];
			if (admission === undefined) {
				const refusal = checkRequest(req, req.url ?? "", true);
				if (refusal) return rejectRequest(refusal, req, res, gateway);
				admission = req[admitted]!;
			} else if (req.method !== admission.method || !isSameUrl(req, admission.url)) {
				return rejectRequest(NO_SECRET, req, res, gateway);
			}
			// Mounted in Express, the gateway routes the URL below its mount point.
			admission.url = req.url ?? "";
			return httpHandler.call(this, req, res, next);
		};
	}

	// moleculer-web routes each request in its private `rest` action, and a broker retryPolicy
	// calls it again with the URL it has rewritten. This puts back the URL the door let in, and
	// refuses a request that never met this door, or whose method changed since.
	function guardRest(next: ActionHandler): ActionHandler {
		return function restAfterTheDoor(this: Service, ctx: Context) {
			const { req, res } = ctx.params as { req: Request & Marked; res: ServerResponse };
			const admission = req[admitted];
			if (admission === undefined || req.method !== admission.method) {
				return Promise.resolve(rejectRequest(NO_SECRET, req, res));
			}
			req.url = admission.url;
			// A meta object of its own: moleculer-web may share one (rootCallOptions.meta).
			const { consumer } = admission;
			if (consumer !== undefined) ctx.meta = { ...ctx.meta, consumer };
			return next.call(this, ctx);
		};
	}

	type PacketHandler = (cmd: string, packet: { payload?: { action?: string } }) => unknown;

	// A gateway's addRoute and removeRoute are protected (keepRoutesLocal), yet a crafted REQUEST
	// packet from the transporter could still name them: the door drops it before any action.
	function dropRouteCalls(next: PacketHandler): PacketHandler {
		return (cmd, packet) => {
			const action = cmd === "REQ" ? packet?.payload?.action : undefined;
			if (action === undefined || !routeActions.has(action)) return next(cmd, packet);
			const line = `dropped a call to ${action} from the transporter.`;
			logger?.warn(`SharedSecretMiddleware: ${line}`);
			return Promise.resolve(false);
		};
	}

	// Where the door meets Moleculer. No `name`: moleculer 0.14 types a middleware as hooks only.
	function middleware() {
		return {
			created(broker: ServiceBroker) {
				logger = broker.logger;
				report = createReport(broker, tally, reportSeconds, quietSeconds);
				const listed = [...publicPaths].join(", ") || "none";
				logger.info(`SharedSecretMiddleware: ${HEADER} required; public: ${listed}.`);
			},
			serviceCreating(_service: Service, schema: ServiceSchema) {
				if (isGateway(schema)) keepRoutesLocal(schema);
			},
			// A gateway's server exists once its own `created` has run.
			serviceCreated(service: Service) {
				if (!isGateway(service.schema)) return;
				const gateway = service as Gateway;
				gateways.push(gateway);
				const name = gateway.fullName;
				routeActions.add(`${name}.addRoute`).add(`${name}.removeRoute`);
				if (gateway.server) guardServer(gateway.server, gateway);
				guardHttpHandler(gateway);
			},
			localAction(next: ActionHandler, action: ActionSchema): ActionHandler {
				const { rawName, service } = action as ActionSchema & { rawName?: string };
				return rawName === "rest" && isGateway(service?.schema) ? guardRest(next) : next;
			},
			// Moleculer hands this hook every packet from the transporter, before any action. (Its
			// 0.15 types say the hook returns a Promise; it returns the handler, as in 0.14.)
			transitMessageHandler: dropRouteCalls as never,
			started(broker: ServiceBroker) {
				warnOfUnmatchedPublicPaths(broker.logger, publicPaths, gateways);
				report?.start();
				return Promise.resolve();
			},
			stopped: () => Promise.resolve(report?.stop()),

			/** For an Express app: `app.use(door.express())`, before every other middleware. */
			express() {
				return function sharedSecretDoor(
					req: Request,
					res: ServerResponse,
					next: () => void,
				) {
					const url = req.baseUrl ? req.baseUrl + req.url : req.url ?? "";
					const refusal = checkRequest(req, url, true);
					if (refusal) rejectRequest(refusal, req, res);
					else next();
				};
			},

			/** Any other server, an Express app's for its upgrades: `door.guard(server)`. */
			guard(server: unknown) {
				guardServer(server as Server, undefined);
			},

			/**
			 * Replaces the secrets while the origin runs, given as the `secrets` option is. If
			 * the new ones fail its checks, it throws and changes nothing. (`unknown`: moleculer
			 * 0.14 types every member of a middleware as a hook.)
			 */
			setSecrets(replacement: unknown) {
				const next = readSecrets(replacement);
				whichSecret = createSecretMatcher(next);
				report?.rotated(secrets, next);
				secrets = next;
				const entries = `${next.length} ${next.length === 1 ? "entry" : "entries"}`;
				logger?.info(
					`SharedSecretMiddleware: the secrets changed: ${entries}, entry 1 current.`,
				);
			},
		};
	}
}

// A refused connection is closed this long after its 401, whatever the client does.
const LINGER_MS = 500;
const ignore = () => {};
// The server events that start a request, an upgrade or a tunnel: each meets the door.
const REQUEST_EVENTS = new Set([
	"request",
	"checkContinue",
	"checkExpectation",
	"upgrade",
	"connect",
]);
const isDoorHeader = (name: string) => name === HEADER || name === CONSUMER_HEADER;

// Removes both door headers from every form of the request's headers, so a service that
// forwards copied headers sends neither. An HTTP/1 request gets `headers` as a copy through Node's
// public setter (a `delete` would make it a slow dictionary), and `headersDistinct` as an own
// property, built on first use from the wiped raw headers: Node would build it from a count that
// no longer holds, and building it for every request would cost more than the whole check.
// An HTTP/2 stream's headers are a dictionary already.
function wipeHeaders(target: object, headers: Headers, raw: string[]) {
	for (let index = raw.length - 2; index >= 0; index -= 2) {
		const name = raw[index]!;
		// Only a name as long as a door header's is lowercased: most never are.
		const length = name.length;
		if (length !== HEADER.length && length !== CONSUMER_HEADER.length) continue;
		if (isDoorHeader(name.toLowerCase())) raw.splice(index, 2);
	}
	if (!("rawHeaders" in target)) {
		delete headers[HEADER];
		delete headers[CONSUMER_HEADER];
		return;
	}
	const kept: Headers = {};
	for (const name in headers) if (!isDoorHeader(name)) kept[name] = headers[name];
	(target as IncomingMessage).headers = kept as IncomingMessage["headers"];
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
		const [raw, distinct] = [this.rawHeaders, {} as Record<string, string[]>];
		for (let index = 0; index < raw.length; index += 2) {
			(distinct[raw[index]!.toLowerCase()] ??= []).push(raw[index + 1]!);
		}
		ownValue(this, distinct);
		return distinct;
	},
	set(this: IncomingMessage, value: unknown) {
		ownValue(this, value);
	},
};

// Node would end a `Connection: close` answer by closing at once, and the unread body would turn
// the close into a reset that can overtake the 401. So the 401 goes out whole (its Content-Length
// says so), and the socket closes a moment later. (Deno's node:http closes the same way.)
function answerThenClose(refusal: Refusal, req: Request, res: ServerResponse) {
	res.writeHead(401, refusal.closingHead);
	res.write(refusal.body);
	closeWithin(req.socket, LINGER_MS);
}

// Express mounts move their path from req.url into req.baseUrl, and add a "/" where nothing is
// left: "/api?x" mounted at "/api" is "/?x".
function isSameUrl(req: Request, url: string): boolean {
	if (req.url === url) return true;
	const base = req.baseUrl;
	return !!base && (base + req.url === url || base + req.url?.slice(1) === url);
}

// Ends a refused connection within a bound, whatever the client does. unref(): the timer never
// keeps a stopping process alive.
function closeWithin(connection: { destroy(): unknown } | null | undefined, ms: number) {
	if (connection) setTimeout(() => connection.destroy(), ms).unref();
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

// A warning, not an error: a route can come later (addRoute, autoAliases), and then match. Only
// gateways with a server of their own count: behind Express, public paths are the app's.
function warnOfUnmatchedPublicPaths(
	logger: ServiceBroker["logger"],
	publicPaths: Set<string>,
	gateways: Gateway[],
) {
	const served = gateways.filter((gateway) => gateway.server && gateway.resolveAlias);
	const routes = served.flatMap((gateway) => (gateway.routes ?? []).map((route) => route.path));
	for (const path of served.length ? publicPaths : []) {
		const [method, url] = path.split(" ") as [string, string];
		if (served.some((gateway) => gateway.resolveAlias!(url, method))) continue;
		logger.warn(
			`SharedSecretMiddleware: public path "${path}" matches no alias of the routes ` +
				`${routes.join(", ")}. Write the full path, the route's path included.`,
		);
	}
}

// The caller chose the method and the URL, so a refusal's log line holds only this much of each.
function cut(value: unknown, length = 120): string {
	const text = String(value);
	if (text.length <= length) return text;
	return `${text.slice(0, length)}... (${text.length} characters)`;
}

// ==== 3. The options, checked at the call ==================================================

// The messages never hold the value: they go to the logs.
function readSecrets(raw: unknown): string[] {
	const list = typeof raw === "string" ? raw.split(",") : Array.isArray(raw) ? raw : [];
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

function readPublicPaths(raw: string | readonly string[] | undefined): Set<string> {
	const list = typeof raw === "string" ? raw.split(",") : [...(raw ?? [])];
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

// ==== 4. The rotation report: which secret is in use, by position, never by value ==========

type Metric = { set(value: number, labels: Record<string, string | number>): void };

// Every `every` seconds it logs how many requests used each entry after the first (those a
// rotation removes), and once, that one unused for `quiet` seconds can be removed. With the
// broker's metrics on, the counts go to Moleculer's registry once a second.
function createReport(broker: ServiceBroker, tally: Tally, every: number, quiet: number) {
	const log = (line: string) => broker.logger.info(`SharedSecretMiddleware: ${line}`);
	const [period, quietFor] = [duration(every), duration(quiet)];
	let [reported, since, saidQuiet] = [[...tally.accepted], Date.now(), [] as boolean[]];
	function report() {
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
	function copyToMetrics() {
		tally.accepted.forEach((count, index) => accepted.set(count, { entry: index + 1 }));
		tally.lastSeen.forEach((ms, index) =>
			lastSeen.set(Math.floor(ms / 1000), { entry: index + 1 })
		);
		refusals.set(tally.missing, { reason: "missing" });
		refusals.set(tally.invalid, { reason: "invalid" });
	}
	const timers: ReturnType<typeof setInterval>[] = [];
	return {
		start() {
			const count = tally.accepted.length;
			if (count > 1) log(`${count} secrets; entry 1 is the current one.`);
			// unref(): the timers never keep a stopping process alive.
			timers.push(setInterval(report, every * 1000).unref());
			if (broker.isMetricsEnabled()) timers.push(setInterval(copyToMetrics, 1000).unref());
		},
		stop: () => timers.forEach(clearInterval),
		// An entry keeps its counts only while the same secret holds its position.
		rotated(before: string[], after: string[]) {
			const kept = (list: number[]) =>
				after.map((it, i) => (before[i] === it ? list[i]! : 0));
			[tally.accepted, tally.lastSeen] = [kept(tally.accepted), kept(tally.lastSeen)];
			[reported, since, saidQuiet] = [[...tally.accepted], Date.now(), []];
		},
	};
}

const duration = (s: number) => (s % 60 ? `${s} s` : `${s / 60} minute${s === 60 ? "" : "s"}`);
