/**
 * SharedSecretMiddleware, the origin's door. A request that reaches a moleculer-web gateway's
 * server without the `x-shared-secret` that the API gateway (Zuplo) adds gets a 401, so nobody
 * can go around the API gateway. With the secret, the caller that the API gateway names in
 * `x-consumer` reaches services as `ctx.meta.consumer`.
 *
 *     const door = SharedSecretMiddleware({ secrets: "new,old", publicPaths: "GET /health" });
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
import * as MoleculerWeb from "moleculer-web";

export type SharedSecretOptions = {
	/** The secret, or several while you rotate ("new,old" or a list): entry 1 is current. */
	secrets: string | readonly string[] | undefined;
	/** "METHOD /exact/path" entries that need no secret, as a list or comma-separated. */
	publicPaths?: string | readonly string[] | undefined;
	/** How often the rotation report logs which entries are in use (60 s). */
	reportSeconds?: number | undefined;
	/** How long an entry after the first goes unused before it is called removable (600 s). */
	quietSeconds?: number | undefined;
};

/** What the door adds to `ctx.meta`: the consumer, on requests with the secret only. */
export type SharedSecretMeta = { consumer?: string };

const HEADER = "x-shared-secret";
// Who called, as the API gateway vouches for it.
const CONSUMER_HEADER = "x-consumer";
// In bytes: the comparison does the same work for any secret up to this length.
const COMPARE_WIDTH = 256;
// RFC 9110 §15.5.2: a 401 carries a challenge. It is no standard scheme: it names the header.
const CHALLENGE = `SharedSecret header="${HEADER}"`;
// The caller chose the method and the URL, so a refusal's log line holds only this much of each.
const LOGGED_LENGTH = 120;
// The door marks each request it let in with the URL it checked, and the consumer.
const CHECKED_URL = Symbol("SharedSecretMiddleware checked URL");
const CONSUMER = Symbol("SharedSecretMiddleware consumer");

type Reason = "missing" | "invalid";
type Marks = { [CHECKED_URL]?: string | undefined; [CONSUMER]?: string | undefined };
type Request = IncomingMessage & Marks & { stream?: Stream };
type Response = ServerResponse;
type Stream = ServerHttp2Stream & Marks;
type Headers = Record<string, unknown>;
type Tally = { accepted: number[]; lastSeen: number[]; missing: number; invalid: number };
type Gateway = Service & {
	settings: { onError?: unknown; logResponse?: string | null };
	server?: Server | null;
	routes?: { path: string }[];
	sendError(req: Request, res: Response, error: Error): void;
	resolveAlias?(url: string, method: string): unknown;
	httpHandler(req: Request, res: Response, next?: unknown): unknown;
};
type PacketHandler = (cmd: string, packet: { payload?: { action?: string } }) => unknown;

// moleculer-web's own error classes. ESM and esModuleInterop see its exports as `default`; a
// CommonJS build without esModuleInterop sees them as the module itself.
type ErrorClass = new (type: string, data: unknown) => Error;
type WebErrors =
	& { UnAuthorizedError: ErrorClass }
	& Record<"ERR_NO_TOKEN" | "ERR_INVALID_TOKEN", string>;
const web = MoleculerWeb as unknown as { Errors: WebErrors; default?: { Errors: WebErrors } };
const Errors = (web.default ?? web).Errors;

export function SharedSecretMiddleware(options: SharedSecretOptions) {
	// Moleculer calls a function in `middlewares` with the broker: the call was left out.
	if (!options || "createService" in options) {
		const call = "middlewares: [SharedSecretMiddleware({ secrets })]";
		throw configError(`SharedSecretMiddleware must be called: ${call}`);
	}
	// Every option is checked here, at the call, so a weak secret stops the process at start.
	let secrets = readSecrets(options.secrets);
	let whichSecret = createSecretMatcher(secrets);
	const publicRoutes = readPublicPaths(options.publicPaths);
	const reportEveryMs = readSeconds("reportSeconds", options.reportSeconds ?? 60) * 1000;
	const quietAfterMs = readSeconds("quietSeconds", options.quietSeconds ?? 600) * 1000;
	const tally = createTally(secrets.length);
	const refusals = createRefusals();
	const gateways: Gateway[] = [];
	const routeActions = new Set<string>();
	let logger: ServiceBroker["logger"] | undefined;
	let report: ReturnType<typeof createReport> | undefined;

	// The door itself. It wipes both headers first, so no code after it ever sees them, and
	// marks the request with the URL it checked. Then it lets the request in, or says why not.
	function check(req: Marks, headers: Headers, raw: string[], method: unknown, url: string) {
		const presented = headers[HEADER];
		const consumer = headers[CONSUMER_HEADER];
		if (presented !== undefined || consumer !== undefined) wipeHeaders(req, headers, raw);
		req[CHECKED_URL] = url;
		// A public route matches the method and the exact path before "?": no prefix, decoding
		// or normalising, so "/health/../x", "//health" and "/health/" are not "/health".
		if (publicRoutes.size !== 0) {
			const query = url.indexOf("?");
			if (publicRoutes.has(`${method} ${query === -1 ? url : url.slice(0, query)}`)) {
				return true;
			}
		}
		const entry = presented ? whichSecret(presented) : 0;
		if (entry === 0) return presented ? "invalid" : "missing";
		tally.accepted[entry - 1]! += 1;
		tally.lastSeen[entry - 1] = Date.now();
		// Only with the secret is the consumer the API gateway's word.
		if (typeof consumer === "string" && consumer) req[CONSUMER] = consumer;
		return true;
	}
	const checkRequest = (req: Request) =>
		check(req, req.headers, req.rawHeaders, req.method, req.url ?? "");

	// Each event of a gateway's server that starts a request meets the door before any
	// listener: moleculer-web's, socket.io's, a WebSocket server's, whatever comes later.
	function guardServer(server: Server, gateway: Gateway) {
		const emit = server.emit as (this: Server, event: string, ...args: unknown[]) => boolean;
		server.emit = function emitAfterTheDoor(this: Server, event: string, ...args: unknown[]) {
			if (event === "request" || event === "checkContinue") {
				const [req, res] = args as [Request, Response];
				// An HTTP/2 request met the door as its stream (below), and takes its marks.
				if (req.stream) {
					req[CHECKED_URL] = req.stream[CHECKED_URL];
					req[CONSUMER] = req.stream[CONSUMER];
				} else {
					const verdict = checkRequest(req);
					if (verdict !== true) return refuse(gateway, verdict, req, res);
				}
			} else if (event === "upgrade" || event === "connect") {
				// An upgrade's socket gets the same 401 as bytes, and closes.
				const [req, socket] = args as [Request, Duplex];
				const verdict = checkRequest(req);
				if (verdict !== true) {
					socket.end(refused(gateway, verdict, req.method, req.url).asBytes);
					return true;
				}
			} else if (event === "stream") {
				const [stream, headers, , raw] = args as [Stream, Headers, unknown, string[]];
				const method = headers[":method"];
				const path = String(headers[":path"]);
				const verdict = check(stream, headers, raw ?? [], method, path);
				if (verdict !== true) {
					const refusal = refused(gateway, verdict, method, path);
					stream.respond({ ":status": 401, ...refusal.http2Head });
					stream.end(refusal.body);
					return true;
				}
			}
			return emit.call(this, event, ...args);
		} as Server["emit"];
		// Node answers `Expect: 100-continue` with "100 Continue" unless something listens for
		// checkContinue. This listener does what Node would, after the door. (HTTP/2 servers
		// listen for streams, and send no "100 Continue" on their own.)
		if (server.listenerCount("checkContinue") + server.listenerCount("stream") === 0) {
			server.on("checkContinue", (req: Request, res: Response) => {
				res.writeContinue();
				server.emit("request", req, res);
			});
		}
	}

	// Counts a refusal, and logs one short line, as moleculer-web logs each response.
	function refused(gateway: Gateway | undefined, reason: Reason, method: unknown, url: unknown) {
		tally[reason] += 1;
		const level = gateway ? gateway.settings.logResponse : "info";
		const log = gateway?.logger ?? logger;
		if (log && (level === "info" || level === "warn" || level === "debug")) {
			log[level](`<= 401 ${cut(method)} ${cut(url)}`);
		}
		return refusals[reason];
	}

	// Writes the 401. `true` tells moleculer-web that the request is answered.
	function refuse(gateway: Gateway | undefined, reason: Reason, req: Request, res: Response) {
		const { head, body, error } = refused(gateway, reason, req.method, req.url);
		const closing = stopReadingBody(req);
		if (typeof gateway?.settings.onError !== "function") {
			res.writeHead(401, closing ? { ...head, Connection: "close" } : head).end(body);
			return true;
		}
		// A gateway `onError` gets a copy, so what it changes stays with this request.
		res.setHeader("WWW-Authenticate", CHALLENGE);
		if (closing) res.setHeader("Connection", "close");
		const copy = Object.assign(Object.create(Object.getPrototypeOf(error)), error);
		gateway.sendError(req, res, Object.assign(copy, { message: error.message }));
		return true;
	}

	// ==== The door ends here. Below: where it hooks into Moleculer, and its methods.

	// No `name`: moleculer 0.14 types a middleware as hooks only.
	return {
		created(broker: ServiceBroker) {
			logger = broker.logger;
			report = createReport(broker, tally, reportEveryMs, quietAfterMs);
			const listed = [...publicRoutes].join(", ") || "none";
			logger.info(`SharedSecretMiddleware: ${HEADER} required; public: ${listed}.`);
			if (secrets.length > 1) report.announce();
		},

		// Route management answers services on this node only (see keepRoutesLocal).
		serviceCreating(_service: Service, schema: ServiceSchema) {
			if (isGateway(schema)) keepRoutesLocal(schema);
		},

		// A gateway's server exists once its `created` has run: the door goes in front of it.
		// With `server: false`, your own server or Express calls httpHandler, and meets the door
		// there, unless the server's door or door.express() has let the request in already.
		serviceCreated(service: Service) {
			if (!isGateway(service.schema)) return;
			const gateway = service as Gateway;
			gateways.push(gateway);
			routeActions.add(`${gateway.fullName}.addRoute`).add(`${gateway.fullName}.removeRoute`);
			if (gateway.server) guardServer(gateway.server, gateway);
			const httpHandler = gateway.httpHandler;
			gateway.httpHandler = function httpHandlerAfterTheDoor(req, res, next) {
				const verdict = req[CHECKED_URL] === undefined ? checkRequest(req) : true;
				if (verdict !== true) return refuse(gateway, verdict, req, res);
				// Mounted in Express, the gateway routes the URL below its mount point.
				req[CHECKED_URL] = req.url ?? "";
				return httpHandler.call(this, req, res, next);
			};
		},

		// moleculer-web routes each request in its private `rest` action, and a broker
		// retryPolicy calls it again with the URL it has rewritten. This puts back the URL the
		// door checked, and refuses a request that never met the door.
		localAction(next: ActionHandler, action: ActionSchema): ActionHandler {
			const { rawName, service } = action as ActionSchema & { rawName?: string };
			if (rawName !== "rest" || !isGateway(service?.schema)) return next;
			return function restAfterTheDoor(this: Service, ctx: Context) {
				const { req, res } = ctx.params as { req: Request; res: Response };
				const url = req[CHECKED_URL];
				if (url === undefined) {
					return Promise.resolve(refuse(undefined, "missing", req, res));
				}
				req.url = url;
				const consumer = req[CONSUMER];
				// A meta object of its own: moleculer-web may share one (rootCallOptions.meta).
				if (consumer !== undefined) ctx.meta = { ...ctx.meta, consumer };
				return next.call(this, ctx);
			};
		},

		// Moleculer hands this hook every packet from the transporter, before any action. (Its
		// 0.15 types say the hook returns a Promise; it returns the handler, as in 0.14.)
		transitMessageHandler: function dropRouteCalls(next: PacketHandler): PacketHandler {
			return (cmd, packet) => {
				const action = cmd === "REQ" ? packet?.payload?.action : undefined;
				if (action === undefined || !routeActions.has(action)) return next(cmd, packet);
				const line =
					`SharedSecretMiddleware: dropped a call to ${action} from the transporter.`;
				logger?.warn(line);
				return Promise.resolve(false);
			};
		} as never,

		started(broker: ServiceBroker) {
			warnOfUnmatchedPublicPaths(broker.logger, publicRoutes, gateways);
			return Promise.resolve(report?.start());
		},

		stopped: () => Promise.resolve(report?.stop()),

		/** For an Express app: `app.use(door.express())`, before every other middleware. */
		express() {
			return function sharedSecretDoor(req: Request, res: Response, next: () => void) {
				const verdict = checkRequest(req);
				if (verdict === true) next();
				else refuse(undefined, verdict, req, res);
			};
		},

		/**
		 * Replaces the secrets while the origin runs, given as the `secrets` option is. If the new
		 * ones fail its checks, it throws and changes nothing. (`unknown`: moleculer 0.14 types
		 * every member of a middleware as a hook.)
		 */
		setSecrets(replacement: unknown) {
			const next = readSecrets(replacement);
			whichSecret = createSecretMatcher(next);
			keepCountsOfUnchangedEntries(tally, secrets, next);
			secrets = next;
			report?.rotated();
			const entries = `${next.length} ${next.length === 1 ? "entry" : "entries"}`;
			const line =
				`SharedSecretMiddleware: the secrets changed: ${entries}, entry 1 current.`;
			logger?.info(line);
		},
	};
}

// moleculer-web's own UnAuthorizedError, in its JSON error shape, as each kind of reply needs it.
function createRefusals() {
	const build = (message: string, type: string) => {
		const error = new Errors.UnAuthorizedError(type, undefined);
		error.message = message;
		const body = JSON.stringify({ name: error.name, message, code: 401, type });
		const head = {
			"Content-Type": "application/json; charset=utf-8",
			"Content-Length": String(Buffer.byteLength(body)),
			"WWW-Authenticate": CHALLENGE,
		};
		const fields = Object.entries(head).map(([name, value]) => `${name}: ${value}\r\n`);
		const fieldLines = fields.join("");
		const asBytes =
			`HTTP/1.1 401 Unauthorized\r\n${fieldLines}Connection: close\r\n\r\n${body}`;
		const lowerCase = Object.entries(head).map(([name, value]) => [name.toLowerCase(), value]);
		const http2Head = Object.fromEntries(lowerCase);
		return { error, body, head, asBytes, http2Head };
	};
	return {
		missing: build("No secret provided", Errors.ERR_NO_TOKEN),
		invalid: build("Invalid secret", Errors.ERR_INVALID_TOKEN),
	};
}

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

// Node builds headersDistinct on first use and keeps it under a symbol, and builds headers and
// headersDistinct from rawHeaders up to a count under another. The door finds both by name.
const probe = new IncomingMessage(null as never);
void probe.headersDistinct;
const symbolNamed = (name: string) =>
	Object.getOwnPropertySymbols(probe).find((symbol) => symbol.description === name);
const DISTINCT = symbolNamed("kHeadersDistinct");
const RAW_COUNT = symbolNamed("kHeadersCount");

// Removes both headers from every form of them, so a service that forwards copied headers sends
// neither. An HTTP/1 request gets a copy of `headers` without them: `delete` would turn it into
// a slow dictionary (5% a request in moleculer-web). HTTP/2's headers are a dictionary already.
function wipeHeaders(req: Marks, headers: Headers, raw: string[]) {
	const isDoorHeader = (name: string) => name === HEADER || name === CONSUMER_HEADER;
	for (let index = raw.length - 2; index >= 0; index -= 2) {
		if (isDoorHeader(raw[index]!.toLowerCase())) raw.splice(index, 2);
	}
	if (!(req instanceof IncomingMessage)) {
		delete headers[HEADER];
		delete headers[CONSUMER_HEADER];
		return;
	}
	const kept: Headers = {};
	for (const name in headers) if (!isDoorHeader(name)) kept[name] = headers[name];
	req.headers = kept as IncomingMessage["headers"];
	const internal = req as unknown as Record<symbol, unknown>;
	if (RAW_COUNT && typeof internal[RAW_COUNT] === "number") internal[RAW_COUNT] = raw.length;
	// Only code before the door can have built it: Express middleware, or your own server.
	const distinct = DISTINCT && internal[DISTINCT] as Headers | undefined;
	if (distinct) delete distinct[HEADER], delete distinct[CONSUMER_HEADER];
}

// A refused request's body is never read, so nobody makes the origin read megabytes. The door
// stops reading, and closes the connection half a second after the 401: closing at once, with
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
function isGateway(schema: ServiceSchema | undefined): schema is ServiceSchema {
	const methods = schema?.methods as Partial<Gateway> | undefined;
	return typeof methods?.sendError === "function" && typeof methods.httpHandler === "function";
}

function cut(value: unknown): string {
	const text = String(value);
	if (text.length <= LOGGED_LENGTH) return text;
	return `${text.slice(0, LOGGED_LENGTH)}... (${text.length} characters)`;
}

// ---- Routes: kept to this node, and checked at start ---------------------------------------

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
	publicRoutes: Set<string>,
	gws: Gateway[],
) {
	const served = gws.filter((gateway) => gateway.server && gateway.resolveAlias);
	const routes = served.flatMap((gateway) => (gateway.routes ?? []).map((route) => route.path));
	for (const entry of served.length ? publicRoutes : []) {
		const [method, path] = entry.split(" ") as [string, string];
		if (served.some((gateway) => gateway.resolveAlias!(path, method))) continue;
		logger.warn(
			`SharedSecretMiddleware: public path "${entry}" matches no alias of the routes ` +
				`${routes.join(", ")}. Write the full path, the route's path included.`,
		);
	}
}

// ---- The options, checked at the call ------------------------------------------------------

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
	const routes = new Set<string>();
	for (const entry of list.map((text) => String(text).trim()).filter(Boolean)) {
		const [, method, path] = /^([A-Z]+) (\/\S*)$/.exec(entry.replace(/\s+/, " ")) ?? [];
		const which = `SharedSecretMiddleware: publicPaths entry "${entry}"`;
		if (!path || path.includes("?")) throw configError(`${which} is not "METHOD /path".`);
		// moleculer-web routes OPTIONS as the method that a preflight names, so this entry
		// would open other methods. Browsers send preflights to the API gateway, not here.
		if (method === "OPTIONS") {
			throw configError(
				`${which} opens every method: answer CORS preflights at the API gateway.`,
			);
		}
		routes.add(`${method} ${path}`);
	}
	return routes;
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

// ---- The rotation report and metrics: which secret is in use -------------------------------

// What the door counts: a request pays for an increment and a clock read.
function createTally(entries: number): Tally {
	const zeros = () => Array<number>(entries).fill(0);
	return { accepted: zeros(), lastSeen: zeros(), missing: 0, invalid: 0 };
}

// After setSecrets, an entry keeps its counts only if the same secret still holds its position.
function keepCountsOfUnchangedEntries(tally: Tally, before: string[], after: string[]) {
	const kept = (counts: number[]) =>
		after.map((next, i) => (before[i] === next ? counts[i]! : 0));
	tally.accepted = kept(tally.accepted);
	tally.lastSeen = kept(tally.lastSeen);
}

/**
 * Every reportSeconds it logs how many requests used each entry after the first (the ones a
 * rotation removes), that an entry unused for quietSeconds can be removed, and the refusals:
 * one line of each kind, entries by position, never by any part of their value. With the
 * broker's metrics on, it copies the counts into Moleculer's registry once a second.
 */
function createReport(broker: ServiceBroker, tally: Tally, everyMs: number, quietAfterMs: number) {
	const log = (line: string) => broker.logger.info(`SharedSecretMiddleware: ${line}`);
	const copyToMetrics = broker.isMetricsEnabled() ? registerMetrics(broker, tally) : undefined;
	const period = duration(everyMs);
	const quietFor = duration(quietAfterMs);
	const snapshot = () => ({ ...tally, accepted: [...tally.accepted] });
	let reported = snapshot();
	let announcedQuiet: boolean[] = [];
	let since = 0;
	let timers: ReturnType<typeof setInterval>[] = [];

	function report() {
		const total = tally.accepted.length;
		for (let index = 1; index < total; index++) {
			const entry = `secrets entry ${index + 1} of ${total}`;
			const lastSeen = tally.lastSeen[index]!;
			const used = tally.accepted[index]! - (reported.accepted[index] ?? 0);
			if (used > 0) {
				announcedQuiet[index] = false;
				const last = `the last at ${new Date(lastSeen).toISOString()}`;
				log(`${entry} is still in use: ${used} requests in ${period}, ${last}.`);
			} else if (Date.now() - (lastSeen || since) >= quietAfterMs && !announcedQuiet[index]) {
				announcedQuiet[index] = true;
				log(`no request has used ${entry} for ${quietFor}; it can be removed.`);
			}
		}
		const missing = tally.missing - reported.missing;
		const invalid = tally.invalid - reported.invalid;
		const why = `${missing} without a secret, ${invalid} with an invalid one`;
		if (missing + invalid > 0) {
			log(`refused ${missing + invalid} requests in ${period}: ${why}.`);
		}
		reported = snapshot();
	}

	return {
		announce: () => log(`${tally.accepted.length} secrets; entry 1 is the current one.`),
		// unref(): the timers never keep a stopping process alive.
		start() {
			since = Date.now();
			timers = [setInterval(report, everyMs).unref()];
			if (copyToMetrics) timers.push(setInterval(copyToMetrics, 1000).unref());
		},
		stop: () => timers.forEach(clearInterval),
		// The new entries start unused, and their quiet time counts from the change.
		rotated() {
			since = Date.now();
			reported = snapshot();
			announcedQuiet = [];
		},
	};
}

// Two counters and a gauge, registered only when the broker's metrics are on.
function registerMetrics(broker: ServiceBroker, tally: Tally): () => void {
	// moleculer 0.14 and 0.15 type register() differently; both return a metric with `set`.
	type Metric = { set(value: number, labels: Record<string, string | number>): void };
	const registry = broker.metrics as unknown as { register(options: object): Metric };
	const register = (type: string, name: string, label: string, description: string) =>
		registry.register({
			type,
			name: `shared_secret.${name}`,
			labelNames: [label],
			description,
		});
	const accepted = register("counter", "accepted.total", "entry", "Requests let in, by entry");
	const refused = register("counter", "refused.total", "reason", "Requests refused, by reason");
	const lastSeen = register("gauge", "last_seen.seconds", "entry", "Each entry's last use");
	return function copyTallyToMetrics() {
		tally.accepted.forEach((count, index) => {
			accepted.set(count, { entry: index + 1 });
			lastSeen.set(Math.floor(tally.lastSeen[index]! / 1000), { entry: index + 1 });
		});
		refused.set(tally.missing, { reason: "missing" });
		refused.set(tally.invalid, { reason: "invalid" });
	};
}

function duration(ms: number): string {
	return ms % 60_000 ? `${ms / 1000} s` : `${ms / 60_000} minute${ms === 60_000 ? "" : "s"}`;
}
