/**
 * SharedSecretMiddleware, the origin's door. Every request that reaches a moleculer-web gateway's
 * server must carry the `x-shared-secret` that the API gateway (Zuplo) adds, or it gets a 401,
 * so nobody can go around the API gateway. With the secret, the caller that the API gateway names
 * in `x-consumer` reaches services as `ctx.meta.consumer`.
 *
 *     const door = SharedSecretMiddleware({ secrets: process.env.SHARED_SECRET });
 *     const broker = new ServiceBroker({ middlewares: [door] });
 *
 * It imports nothing from its project, so you can copy it alone: moleculer 0.14 or 0.15,
 * moleculer-web 0.10 or 0.11, standalone or in Express (`app.use(door.express())`).
 */
import { timingSafeEqual } from "node:crypto";
import { IncomingMessage, type Server, type ServerResponse } from "node:http";
import type { ServerHttp2Stream } from "node:http2";
import type { Duplex } from "node:stream";
import type { ActionHandler, ActionSchema, Context, Service, ServiceBroker } from "moleculer";
import type { ServiceSchema } from "moleculer";
import ApiGateway from "moleculer-web";

export type SharedSecretOptions = {
	/** The secret, or several while you rotate ("new,old" or an array): entry 1 is current. */
	secrets: string | readonly string[] | undefined;
	/** "METHOD /exact/path" entries that need no secret, as a list or comma-separated. */
	publicPaths?: string | readonly string[] | undefined;
	/** How often the rotation report logs which entries are in use, in seconds (60). */
	reportSeconds?: number;
	/** How long an entry after the first must go unused to be called removable, in seconds (600). */
	quietSeconds?: number;
};

/** What the door adds to `ctx.meta`: the consumer, on requests with the secret only. */
export type SharedSecretMeta = { consumer?: string };

type Logger = { info(line: string): void; warn(line: string): void };
type Refusal = {
	reason: Reason;
	error: Error;
	body: string;
	head: Record<string, string>;
	http2Head: Record<string, string>;
	asBytes: string;
};
type Refusals = Record<Reason, Refusal>;
type Report = { announce(entries: number): void; start(): void; stop(): void; rotated(): void };
type PacketHandler = (cmd: string, packet: { payload?: { action?: string } }) => unknown;
type Request = IncomingMessage & {
	originalUrl?: string;
	[CHECKED_URL]?: string;
	[CONSUMER]?: string;
};
type Reason = "missing" | "invalid";
type Marks = { [CHECKED_URL]?: string; [CONSUMER]?: string };
type Http2Stream = ServerHttp2Stream & Marks;
type Http2Request = Request & { stream: Http2Stream };
type Headers = Record<string, unknown>;
type Tally = { accepted: number[]; lastSeen: number[]; missing: number; invalid: number };
type Gateway = Service & GatewayMethods & { server?: Server | null; routes?: { path: string }[] };
type GatewayMethods = {
	settings: { onError?: unknown; logResponse?: string | null; server?: unknown };
	sendError(req: Request, res: ServerResponse, error: Error): void;
	reformatError(error: Error): unknown;
	resolveAlias?(url: string, method: string): unknown;
	httpHandler(req: Request, res: ServerResponse, next?: unknown): unknown;
};

const HEADER = "x-shared-secret";
// Who called, as the API gateway vouches for it.
const CONSUMER_HEADER = "x-consumer";
const MIN_SECRET_LENGTH = 32;
// In bytes: the comparison does the same work for any secret up to this length.
const COMPARE_WIDTH = 256;
// RFC 9110 §15.5.2: a 401 carries a challenge. It is no standard scheme: it names the header.
const CHALLENGE = `SharedSecret header="${HEADER}"`;
// The caller chose the method and the URL, so a refusal's log line holds only this much of each.
const LOGGED_METHOD_LENGTH = 20;
const LOGGED_URL_LENGTH = 120;
// The door marks each request it let through with the URL it checked, and the consumer.
const CHECKED_URL = Symbol("SharedSecretMiddleware checked URL");
const CONSUMER = Symbol("SharedSecretMiddleware consumer");

export function SharedSecretMiddleware(options: SharedSecretOptions) {
	// Moleculer calls a function in `middlewares` with the broker: the call was left out.
	if (!options || "createService" in options) {
		throw configError(
			"SharedSecretMiddleware must be called: middlewares: [SharedSecretMiddleware({ secrets })]",
		);
	}
	// Everything is checked here, at the call: a weak secret stops the process before it serves.
	let secrets = readSecrets(options.secrets);
	let whichSecret = createSecretMatcher(secrets);
	const publicRoutes = readPublicPaths(options.publicPaths);
	const reportEveryMs = readSeconds("reportSeconds", options.reportSeconds, 60) * 1000;
	const quietAfterMs = readSeconds("quietSeconds", options.quietSeconds, 600) * 1000;
	const tally = createTally(secrets.length);
	const refuseInExpress = refuser(undefined, createRefusals(undefined));
	const gateways: Gateway[] = [];
	const routeActions = new Set<string>();
	let logger: Logger | undefined;
	let report: Report | undefined;

	// The door itself. It reads and wipes the two headers, then lets the request through (true)
	// or names why not. The wipe comes first, so no code after the door ever sees them.
	function check(req: Request): true | Reason {
		const presented = req.headers[HEADER];
		const consumer = req.headers[CONSUMER_HEADER];
		if (presented !== undefined || consumer !== undefined) wipeHeaders(req);
		// A retry or a later handler routes exactly this URL.
		req[CHECKED_URL] = req.url ?? "";
		// No public routes (the default): no route key to build.
		if (publicRoutes.size !== 0 && publicRoutes.has(routeKey(req.method, req.url))) return true;
		const entry = presented ? whichSecret(presented) : 0;
		if (entry === 0) return presented ? "invalid" : "missing";
		tally.accepted[entry - 1]++;
		tally.lastSeen[entry - 1] = Date.now();
		// Only with the secret is the consumer the API gateway's word.
		if (typeof consumer === "string" && consumer) req[CONSUMER] = consumer;
		return true;
	}

	// Every event of a gateway's server that starts a request meets the door before any
	// listener: moleculer-web's, socket.io's, a WebSocket server's, whatever is added later.
	function guardServer(server: Server, gateway: Gateway) {
		const refusals = createRefusals(gateway);
		const refuse = refuser(gateway, refusals);
		const emit = server.emit as (this: Server, event: string, ...args: unknown[]) => boolean;
		server.emit = function emitAfterTheDoor(this: Server, event: string, ...args: unknown[]) {
			if (event === "request" || event === "checkContinue") {
				const [req, res] = args as [Request, ServerResponse];
				if (req.httpVersionMajor === 2) passedAsStream(req as Http2Request);
				else {
					const verdict = check(req);
					if (verdict !== true) return refuse(req, res, verdict);
				}
			} else if (event === "upgrade" || event === "connect") {
				const [req, socket] = args as [Request, Duplex];
				const verdict = check(req);
				if (verdict !== true) return refuseSocket(gateway, refusals[verdict], req, socket);
			} else if (event === "stream") {
				const [stream, headers, , raw] = args as [Http2Stream, Headers, unknown, string[]];
				const verdict = checkStream(stream, headers, raw);
				if (verdict !== true) {
					return refuseStream(gateway, refusals[verdict], stream, headers);
				}
			}
			return emit.call(this, event, ...args);
		} as Server["emit"];
		// Node answers `Expect: 100-continue` with "100 Continue" itself unless something
		// listens for checkContinue: this listener does what Node would, after the door.
		// (HTTP/2 servers listen for streams, and do not send "100 Continue" on their own.)
		if (server.listenerCount("checkContinue") === 0 && server.listenerCount("stream") === 0) {
			server.on("checkContinue", (req: Request, res: ServerResponse) => {
				res.writeContinue();
				server.emit("request", req, res);
			});
		}
	}

	// HTTP/2's headers arrive with the stream, before its request exists: the door checks them
	// there, and the request of a stream that passed inherits the stream's marks.
	function checkStream(stream: Http2Stream, headers: Headers, raw: string[] | undefined) {
		const req = { headers, rawHeaders: raw ?? [], method: headers[":method"] } as Request;
		req.url = String(headers[":path"] ?? "");
		const verdict = check(req);
		stream[CHECKED_URL] = req[CHECKED_URL];
		stream[CONSUMER] = req[CONSUMER];
		return verdict;
	}

	function passedAsStream(req: Http2Request) {
		req[CHECKED_URL] = req.stream[CHECKED_URL];
		req[CONSUMER] = req.stream[CONSUMER];
	}

	// Writes a refusal, counts it, and says that the request is answered.
	function refuser(gateway: Gateway | undefined, refusals: Refusals) {
		return function refuse(req: Request, res: ServerResponse, reason: Reason): true {
			tally[reason]++;
			const { error, body, head } = refusals[reason];
			const closing = stopReadingBody(req);
			logRefusal(gateway, req.method, req.url);
			if (typeof gateway?.settings.onError !== "function") {
				res.writeHead(401, closing ? { ...head, Connection: "close" } : head).end(body);
			} else {
				// A gateway `onError` gets a copy: what it changes stays with this request.
				res.setHeader("WWW-Authenticate", CHALLENGE);
				if (closing) res.setHeader("Connection", "close");
				const copy = Object.assign(Object.create(Object.getPrototypeOf(error)), error);
				gateway.sendError(req, res, Object.assign(copy, { message: error.message }));
			}
			return true;
		};
	}

	// An upgrade's socket gets the same 401 as raw bytes, and closes.
	function refuseSocket(gateway: Gateway, refusal: Refusal, req: Request, socket: Duplex) {
		tally[refusal.reason]++;
		logRefusal(gateway, req.method, req.url);
		socket.end(refusal.asBytes);
		return true;
	}

	function refuseStream(
		gateway: Gateway,
		refusal: Refusal,
		stream: Http2Stream,
		headers: Headers,
	) {
		tally[refusal.reason]++;
		logRefusal(gateway, headers[":method"], headers[":path"]);
		stream.respond({ ":status": 401, ...refusal.http2Head });
		stream.end(refusal.body);
		return true;
	}

	// One short line per refusal, as moleculer-web logs every response.
	function logRefusal(gateway: Gateway | undefined, method: unknown, url: unknown) {
		const level = gateway ? gateway.settings.logResponse : "info";
		if (level !== "info" && level !== "warn") return;
		const line = `<= 401 ${cut(method, LOGGED_METHOD_LENGTH)} ${cut(url, LOGGED_URL_LENGTH)}`;
		(gateway?.logger ?? logger)?.[level](line);
	}

	// ==== The door ends here. Below: where it hooks into Moleculer, the configuration, read
	// ==== once at start, and the optional rotation report and metrics.

	return {
		name: "SharedSecretMiddleware",

		created(broker: ServiceBroker) {
			logger = broker.logger;
			report = createReport(broker, tally, reportEveryMs, quietAfterMs);
			const listed = [...publicRoutes].join(", ") || "none";
			logger.info(`SharedSecretMiddleware: ${HEADER} required; public: ${listed}.`);
			if (secrets.length > 1) report.announce(secrets.length);
		},

		// Route management answers services on this node only (see keepRoutesLocal).
		serviceCreating(_service: Service, schema: ServiceSchema) {
			keepRoutesLocal(schema);
		},

		// A gateway's server exists once its `created` has run: the door goes in front of it.
		serviceCreated(service: Service) {
			if (!isGateway(service)) return;
			const gateway = service as Gateway;
			gateways.push(gateway);
			routeActions.add(`${gateway.fullName}.addRoute`).add(`${gateway.fullName}.removeRoute`);
			if (gateway.server) guardServer(gateway.server, gateway);
			// With `server: false`, your own server or Express calls httpHandler: it meets the
			// door there, unless the server's door or `door.express()` let the request in.
			const refuse = refuser(gateway, createRefusals(gateway));
			const httpHandler = gateway.httpHandler;
			gateway.httpHandler = function httpHandlerAfterTheDoor(req, res, next) {
				if (req[CHECKED_URL] === undefined) {
					const verdict = check(req);
					if (verdict !== true) return refuse(req, res, verdict);
				}
				return httpHandler.call(this, req, res, next);
			};
		},

		// moleculer-web routes each request in its private `rest` action, and calls it again on
		// a retry with a URL it has rewritten. This puts back the URL the door checked, and
		// refuses a request that never met the door.
		localAction(next: ActionHandler, action: ActionSchema): ActionHandler {
			const { rawName, service } = action as ActionSchema & { rawName?: string };
			if (rawName !== "rest" || !service || !isGateway(service)) return next;
			const refuse = refuser(service as Gateway, createRefusals(service as Gateway));
			return function restAfterTheDoor(this: Service, ctx: Context) {
				const { req, res } = ctx.params as { req: Request; res: ServerResponse };
				const url = req[CHECKED_URL];
				// moleculer-web reads `true` as "answered".
				if (url === undefined) return Promise.resolve(refuse(req, res, "missing"));
				req.url = url;
				const consumer = req[CONSUMER];
				// A meta object of its own: moleculer-web may share one (rootCallOptions.meta).
				if (consumer !== undefined) ctx.meta = { ...ctx.meta, consumer };
				return next.call(this, ctx);
			};
		},

		// Moleculer sees every packet from the transporter here, before any action does. (Its
		// 0.15 types say this hook returns a Promise; it returns the handler, as in 0.14.)
		transitMessageHandler: function dropRouteCalls(next: PacketHandler): PacketHandler {
			return (cmd, packet) => {
				const action = cmd === "REQ" ? packet?.payload?.action : undefined;
				if (action === undefined || !routeActions.has(action)) return next(cmd, packet);
				logger?.warn(
					`SharedSecretMiddleware: dropped a call to ${action} from the transporter.`,
				);
				return Promise.resolve(false);
			};
		} as never,

		started(broker: ServiceBroker) {
			warnOfUnmatchedPublicPaths(broker.logger, publicRoutes, gateways);
			report?.start();
			return Promise.resolve();
		},

		stopped() {
			report?.stop();
			return Promise.resolve();
		},

		/** Express middleware for the whole app: `app.use(door.express())`, before all others. */
		express() {
			return function sharedSecretDoor(req: Request, res: ServerResponse, next: () => void) {
				const verdict = check(req);
				if (verdict === true) next();
				else refuseInExpress(req, res, verdict);
			};
		},

		/**
		 * Replaces the secrets while the origin runs, with the checks of the first call. It
		 * throws and changes nothing if the new ones fail them.
		 */
		setSecrets(next: string | readonly string[]) {
			const replacement = readSecrets(next);
			whichSecret = createSecretMatcher(replacement);
			resetChangedEntries(tally, secrets, replacement);
			secrets = replacement;
			logger?.info(
				`SharedSecretMiddleware: the secret changed: ${secrets.length} entries, entry 1 is current.`,
			);
			report?.rotated();
		},
	};
}

// moleculer-web's own UnAuthorizedError, in the gateway's error shape, built once per gateway.
function createRefusals(gateway: Gateway | undefined): Refusals {
	const build = (reason: Reason, message: string, type: string): Refusal => {
		const error = new ApiGateway.Errors.UnAuthorizedError(type, undefined);
		error.message = message;
		const { name, code } = error;
		const body = JSON.stringify(
			gateway ? gateway.reformatError(error) : { name, message, code, type },
		);
		const head = {
			"Content-Type": "application/json; charset=utf-8",
			"Content-Length": String(Buffer.byteLength(body)),
			"WWW-Authenticate": CHALLENGE,
		};
		const fields = Object.entries(head).map(([field, value]) => `${field}: ${value}\r\n`).join(
			"",
		);
		const asBytes = `HTTP/1.1 401 Unauthorized\r\n${fields}Connection: close\r\n\r\n${body}`;
		const http2Head = Object.fromEntries(
			Object.entries(head).map(([field, value]) => [field.toLowerCase(), value]),
		);
		return { reason, error, body, head, http2Head, asBytes };
	};
	return {
		missing: build("missing", "No secret provided", ApiGateway.Errors.ERR_NO_TOKEN),
		invalid: build("invalid", "Invalid secret", ApiGateway.Errors.ERR_INVALID_TOKEN),
	};
}

/**
 * Tells, in constant time and never throwing, which of `secrets` a value is: its entry number
 * (1 for the first), or 0. The value goes into a fixed-width zero-padded buffer, and
 * timingSafeEqual compares it with every secret; a separate length check is ANDed in, so a
 * prefix never matches. The entry is summed without a branch, so the work depends on no
 * secret's content or length, and not on which one matched.
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
			const sameBytes = timingSafeEqual(scratch, expected[index] as Buffer);
			const sameLength = length === lengths[index];
			entry += (index + 1) * (Number(sameBytes) & Number(sameLength));
		}
		return entry;
	};
}

// A public route matches on the method and the exact path before "?". There is no prefix,
// decoding or normalising: "/health/../x", "//health" and "/health/" are not "/health".
function routeKey(method: string | undefined, url: string | undefined): string {
	const path = url ?? "";
	const query = path.indexOf("?");
	return `${method} ${query === -1 ? path : path.slice(0, query)}`;
}

// Node builds headersDistinct on first use and keeps it under a symbol of its own, and it builds
// it, and headers, from rawHeaders up to a count under another. Found once, by their names.
const probe = new IncomingMessage(null as never);
void probe.headersDistinct;
const symbolNamed = (name: string) =>
	Object.getOwnPropertySymbols(probe).find((symbol) => symbol.description === name);
const HEADERS_DISTINCT = symbolNamed("kHeadersDistinct");
const HEADERS_COUNT = symbolNamed("kHeadersCount");

// Removes both headers from every form of them that the request has or will build, so a service
// that forwards copied headers sends neither. `req.headers` gets a copy without them: `delete`
// would turn it into a slow dictionary (5% a request in moleculer-web).
function wipeHeaders(req: Request) {
	const headers = req.headers as Record<string, unknown>;
	if (req instanceof IncomingMessage) {
		const kept: Record<string, unknown> = {};
		for (const name in headers) {
			if (name !== HEADER && name !== CONSUMER_HEADER) kept[name] = headers[name];
		}
		req.headers = kept as typeof req.headers;
	} else {
		// HTTP/2's headers object has no prototype, so it is a dictionary already.
		delete headers[HEADER];
		delete headers[CONSUMER_HEADER];
	}
	const raw = req.rawHeaders;
	for (let index = raw.length - 2; index >= 0; index -= 2) {
		const name = (raw[index] as string).toLowerCase();
		if (name === HEADER || name === CONSUMER_HEADER) raw.splice(index, 2);
	}
	const internal = req as unknown as Record<symbol, unknown>;
	if (HEADERS_COUNT && typeof internal[HEADERS_COUNT] === "number") {
		internal[HEADERS_COUNT] = raw.length;
	}
	// Built already only where code ran before the door: Express middleware, or your own server.
	const distinct = HEADERS_DISTINCT && internal[HEADERS_DISTINCT] as Record<string, unknown>;
	if (distinct) {
		delete distinct[HEADER];
		delete distinct[CONSUMER_HEADER];
	}
}

// A refused request's body is never read, so nobody makes the origin read megabytes. The door
// stops reading and closes the connection half a second after the 401. Closing at once, with
// unread bytes, would reset it before the client reads the 401. HTTP/1 only.
function stopReadingBody(req: Request): boolean {
	const length = req.headers["content-length"];
	const hasBody = (length !== undefined && length !== "0") || !!req.headers["transfer-encoding"];
	if (!hasBody || req.httpVersionMajor !== 1) return false;
	const { socket } = req;
	(socket as { _handle?: { readStop?(): void } })._handle?.readStop?.();
	socket.destroySoon = () => socket.end(() => setTimeout(() => socket.destroy(), 500).unref());
	return true;
}

// A moleculer-web gateway, whatever it is called, has these two methods.
function isGateway(service: { schema?: ServiceSchema } | ServiceSchema): boolean {
	const schema = "schema" in service && service.schema ? service.schema : service;
	const methods = (schema as ServiceSchema).methods as Partial<GatewayMethods> | undefined;
	return typeof methods?.sendError === "function" && typeof methods.httpHandler === "function";
}

function cut(value: unknown, length: number): string {
	const text = String(value);
	return text.length <= length ? text : `${text.slice(0, length)}... (${text.length} characters)`;
}

// ---- Where the door meets a cluster --------------------------------------------------------

// A gateway's addRoute and removeRoute answer every node of a cluster by default, so a node
// that joins could take the routes away. "protected" leaves them to services on this node, and
// the door drops a packet from the transporter that calls them anyway. listAliases stays as
// moleculer-web makes it, so `GET /list-aliases` still answers.
function keepRoutesLocal(schema: ServiceSchema) {
	const actions = schema.actions as Record<string, object> | undefined;
	if (!actions || !isGateway(schema)) return;
	for (const name of ["addRoute", "removeRoute"]) {
		if (actions[name]) actions[name] = { ...actions[name], visibility: "protected" };
	}
}

// A warning, not an error: routes can appear later (addRoute, autoAliases), and the entry then
// matches. Only gateways with a server of their own: behind Express, paths are the app's.
function warnOfUnmatchedPublicPaths(
	logger: Logger,
	publicRoutes: Set<string>,
	gateways: Gateway[],
) {
	const served = gateways.filter((gateway) => gateway.server && gateway.resolveAlias);
	if (served.length === 0) return;
	for (const entry of publicRoutes) {
		const [method, path] = entry.split(" ") as [string, string];
		if (served.some((gateway) => gateway.resolveAlias?.(path, method))) continue;
		const paths = served.flatMap((gateway) =>
			(gateway.routes ?? []).map((route) => route.path)
		);
		logger.warn(
			`SharedSecretMiddleware: public path "${entry}" matches no alias of the routes ${
				paths.join(", ")
			}. Write the full path, the route's path included.`,
		);
	}
}

// ---- The configuration, checked at the call ------------------------------------------------

function readSecrets(raw: string | readonly string[] | undefined): string[] {
	const list = typeof raw === "string" ? raw.split(",") : [...(raw ?? [])];
	const secrets = list.map((secret) => String(secret).trim());
	if (secrets.every((secret) => secret === "")) {
		throw configError(
			"SharedSecretMiddleware: no secret is set. Make one with: openssl rand -hex 32",
		);
	}
	secrets.forEach((secret, index) => {
		// The messages never hold the value: they go to the logs.
		const which = `secrets entry ${index + 1} of ${secrets.length}`;
		if (secret.length < MIN_SECRET_LENGTH) {
			throw configError(
				`SharedSecretMiddleware: ${which} is ${secret.length} characters; it needs at least 32. Make one with: openssl rand -hex 32`,
			);
		}
		// Visible ASCII travels through any gateway and HTTP stack unchanged.
		if (!/^[\x21-\x7e]+$/.test(secret)) {
			throw configError(
				`SharedSecretMiddleware: ${which} holds a space or a non-ASCII character. Make one with: openssl rand -hex 32`,
			);
		}
		// A placeholder such as "changeme" repeated has few different characters.
		if (new Set(secret).size < 8) {
			throw configError(
				`SharedSecretMiddleware: ${which} uses fewer than 8 different characters. Make one with: openssl rand -hex 32`,
			);
		}
		// Each request is counted against exactly one entry.
		const first = secrets.indexOf(secret);
		if (first !== index) {
			throw configError(
				`SharedSecretMiddleware: ${which} is the same as entry ${first + 1}.`,
			);
		}
	});
	return secrets;
}

function readPublicPaths(raw: string | readonly string[] | undefined): Set<string> {
	const routes = new Set<string>();
	const list = typeof raw === "string" ? raw.split(",") : [...(raw ?? [])];
	for (const entry of list.map((text) => String(text).trim()).filter(Boolean)) {
		const [, method, path] = /^([A-Z]+) (\/\S*)$/.exec(entry.replace(/\s+/, " ")) ?? [];
		if (!method || !path || path.includes("?")) {
			throw configError(
				`SharedSecretMiddleware: publicPaths entry "${entry}" is not "METHOD /exact/path".`,
			);
		}
		// moleculer-web routes OPTIONS as the method that a preflight names, so this entry
		// would open other methods. Browsers send preflights to the API gateway, not here.
		if (method === "OPTIONS") {
			throw configError(
				`SharedSecretMiddleware: publicPaths entry "${entry}" opens every method: answer CORS preflights at the API gateway.`,
			);
		}
		routes.add(`${method} ${path}`);
	}
	return routes;
}

function readSeconds(name: string, value: number | undefined, fallback: number): number {
	if (value === undefined) return fallback;
	if (Number.isInteger(value) && value >= 1) return value;
	throw configError(
		`SharedSecretMiddleware: ${name} is ${value}; it needs a whole number of seconds, 1 or more.`,
	);
}

// A stack trace would bury the one line that says what to fix, so the error carries none.
function configError(message: string): Error {
	const error = new Error(message);
	error.stack = `Error: ${message}`;
	return error;
}

// ---- The rotation report and metrics: which secret is in use -------------------------------

// What the door counts: a request pays for an increment and a clock read.
function createTally(entries: number): Tally {
	const zeros = () => Array<number>(entries).fill(0);
	return { accepted: zeros(), lastSeen: zeros(), missing: 0, invalid: 0 };
}

// An entry keeps its counts only if the same secret still holds its position.
function resetChangedEntries(tally: Tally, before: string[], after: string[]) {
	tally.accepted = after.map((secret, index) =>
		before[index] === secret ? tally.accepted[index] ?? 0 : 0
	);
	tally.lastSeen = after.map((secret, index) =>
		before[index] === secret ? tally.lastSeen[index] ?? 0 : 0
	);
}

/**
 * Every reportSeconds it logs how many requests used each entry after the first (the ones a
 * rotation removes), that an entry unused for quietSeconds can be removed, and the refusals by
 * reason. It logs one line of each kind per period, and names entries by position, never by
 * any part of their value. With the broker's metrics on, it copies the counts into Moleculer's
 * registry once a second, so a request costs the same.
 */
function createReport(broker: ServiceBroker, tally: Tally, everyMs: number, quietAfterMs: number) {
	const log = (line: string) => broker.logger.info(`SharedSecretMiddleware: ${line}`);
	const copyToMetrics = broker.isMetricsEnabled() ? registerMetrics(broker, tally) : undefined;
	let reported = { accepted: [...tally.accepted], missing: 0, invalid: 0 };
	let announcedQuiet = tally.accepted.map(() => false);
	let since = 0;
	let timers: ReturnType<typeof setInterval>[] = [];

	function report() {
		const total = tally.accepted.length;
		for (let index = 1; index < total; index++) {
			const lastSeen = tally.lastSeen[index] ?? 0;
			const used = (tally.accepted[index] ?? 0) - (reported.accepted[index] ?? 0);
			if (used > 0) {
				announcedQuiet[index] = false;
				const last = new Date(lastSeen).toISOString();
				log(
					`secrets entry ${
						index + 1
					} of ${total} is still in use: ${used} requests in the last ${
						duration(everyMs)
					}, the last at ${last}. Keep it.`,
				);
			} else if (Date.now() - (lastSeen || since) >= quietAfterMs && !announcedQuiet[index]) {
				announcedQuiet[index] = true;
				log(
					`no request has used secrets entry ${index + 1} of ${total} for ${
						duration(quietAfterMs)
					}; it can be removed.`,
				);
			}
		}
		const missing = tally.missing - reported.missing;
		const invalid = tally.invalid - reported.invalid;
		if (missing + invalid > 0) {
			log(
				`refused ${missing + invalid} requests in the last ${
					duration(everyMs)
				}: ${missing} without a secret, ${invalid} with an invalid one.`,
			);
		}
		reported = {
			accepted: [...tally.accepted],
			missing: tally.missing,
			invalid: tally.invalid,
		};
	}

	return {
		announce(entries: number) {
			log(
				`there are ${entries} secrets. Entry 1 is the current one; this log says when another has been unused for ${
					duration(quietAfterMs)
				}.`,
			);
		},
		// unref(): the timers never keep a stopping process alive.
		start() {
			since = Date.now();
			timers = [setInterval(report, everyMs).unref()];
			if (copyToMetrics) timers.push(setInterval(copyToMetrics, 1000).unref());
		},
		stop: () => timers.forEach(clearInterval),
		// New entries start unused, and an entry's quiet time counts from the change.
		rotated() {
			since = Date.now();
			reported.accepted = [...tally.accepted];
			announcedQuiet = tally.accepted.map(() => false);
		},
	};
}

// Two counters and a gauge, registered only when the broker's metrics are on.
function registerMetrics(broker: ServiceBroker, tally: Tally): () => void {
	// moleculer 0.14 and 0.15 type register() differently; both return a metric with `set`.
	type Settable = { set(value: number, labels: Record<string, string | number>): void };
	const registry = broker.metrics as unknown as { register(options: object): Settable };
	const accepted = registry.register({
		type: "counter",
		name: "shared_secret.accepted.total",
		labelNames: ["entry"],
		description: "Requests let through, by entry",
	});
	const refused = registry.register({
		type: "counter",
		name: "shared_secret.refused.total",
		labelNames: ["reason"],
		description: "Requests refused: missing, invalid",
	});
	const lastSeen = registry.register({
		type: "gauge",
		name: "shared_secret.last_seen.seconds",
		labelNames: ["entry"],
		description: "Each entry's last use (Unix time)",
	});
	return function copyTallyToMetrics() {
		tally.accepted.forEach((count, index) => {
			accepted.set(count, { entry: index + 1 });
			lastSeen.set(Math.floor((tally.lastSeen[index] ?? 0) / 1000), { entry: index + 1 });
		});
		refused.set(tally.missing, { reason: "missing" });
		refused.set(tally.invalid, { reason: "invalid" });
	};
}

function duration(ms: number): string {
	if (ms % 60_000 !== 0) return `${ms / 1000} s`;
	return `${ms / 60_000} minute${ms === 60_000 ? "" : "s"}`;
}
