/**
 * SharedSecretMiddleware, the origin's door: every moleculer-web gateway on the broker
 * refuses, with a 401, each HTTP request without the `x-shared-secret` that the API gateway
 * (Zuplo) adds, so nobody can go around it. With the secret, the caller the gateway names
 * in `x-consumer` reaches services as `ctx.meta.consumer`.
 *
 *     new ServiceBroker({ middlewares: [SharedSecretMiddleware] })
 *
 * It reads SHARED_SECRET ("new,old" while you rotate) and PUBLIC_PATHS ("GET /health,...")
 * as the broker is built, and imports nothing from its project, so you can copy it alone
 * (moleculer 0.14 or 0.15, moleculer-web 0.10 or 0.11, standalone or in Express).
 */
import { timingSafeEqual } from "node:crypto";
import type { IncomingMessage, ServerResponse } from "node:http";
import type { ActionHandler, ActionSchema, Context, Service, ServiceBroker } from "moleculer";
import type { ServiceSchema } from "moleculer";
import ApiGateway from "moleculer-web";

const HEADER = "x-shared-secret";
// Who called, as the gateway vouches for it (Zuplo: request.user.sub).
const CONSUMER_HEADER = "x-consumer";
const MIN_SECRET_LENGTH = 32;
const COMPARE_WIDTH = 256; // bytes: the comparison does the same work for any secret
// RFC 9110 §15.5.2: a 401 carries a challenge. Not a standard scheme: it names the header.
const CHALLENGE = `SharedSecret header="${HEADER}"`;
const LOGGED_URL_LENGTH = 120; // of a refused URL, which the caller chose
const doors = new WeakMap<ServiceBroker, Door>(); // each broker's, made in `created`
const PASSED_DOOR = Symbol("passed SharedSecretMiddleware"); // see the retry below

// Plain hooks, not typed as `Middleware`, which moleculer 0.14 and 0.15 type apart.
export const SharedSecretMiddleware = {
	// Runs once, inside `new ServiceBroker()`: a missing or weak SHARED_SECRET stops the
	// process before it serves anything, never one request at a time.
	created(broker: ServiceBroker) {
		const secrets = readSecrets(process.env.SHARED_SECRET);
		const publicRoutes = readPublicRoutes(process.env.PUBLIC_PATHS);
		const whichSecret = createSecretMatcher(secrets);
		const tally = createTally(secrets.length);
		const report = createReport(broker, tally);
		doors.set(broker, { whichSecret, publicRoutes, tally, report });
		const listed = [...publicRoutes].join(", ") || "none";
		broker.logger.info(`SharedSecretMiddleware: ${HEADER} required; public: ${listed}.`);
		report.announce();
	},

	// In a cluster, no other node may change the gateway's routes (see below the door).
	serviceCreating: keepRoutesLocal,

	// moleculer-web hands each HTTP request to its private `rest` action before routing,
	// body parsing or any action. Wrapping that one action guards all HTTP and nothing
	// else: calls between services, events and the REPL carry no headers, and pass.
	localAction(this: ServiceBroker, next: ActionHandler, action: ActionSchema): ActionHandler {
		const { rawName, service } = action as ActionSchema & { rawName?: string };
		if (rawName !== "rest" || !isGateway({ methods: service })) return next;
		const door = doors.get(this);
		// Fail closed: a gateway on a broker whose `created` never ran here.
		if (!door) throw new Error("SharedSecretMiddleware must be in the broker's `middlewares`.");
		const { whichSecret, publicRoutes, tally } = door;
		const refuse = createRefusals(service as unknown as GatewayMethods, tally);
		return function sharedSecretDoor(this: Service, ctx: Context) {
			const params = ctx.params as GatewayParams;
			const { req, res } = params;
			// A broker `retryPolicy` calls `rest` again with these params after a service's
			// retryable error, the header wiped: a request let through stays let through.
			if (params[PASSED_DOOR]) return next.call(this, ctx);
			const { [HEADER]: presented, [CONSUMER_HEADER]: consumer } = req.headers;
			// Route hooks and services never see the secret or an unvouched consumer.
			if (presented !== undefined || consumer !== undefined) wipeHeaders(req);
			// No public routes (the default): no route key to build.
			if (publicRoutes.size === 0 || !publicRoutes.has(routeKey(req))) {
				const entry = presented ? whichSecret(presented) : 0;
				if (entry === 0) return refuse(req, res, presented ? "invalid" : "missing");
				tally.accepted[entry - 1]++;
				tally.lastSeen[entry - 1] = Date.now();
				// Only with the secret is the consumer the gateway's word. In a meta object of
				// its own: moleculer-web may hand all requests one (rootCallOptions.meta).
				if (typeof consumer === "string" && consumer) ctx.meta = { ...ctx.meta, consumer };
			}
			params[PASSED_DOOR] = true;
			return next.call(this, ctx);
		};
	},

	// The rotation report runs while the broker does.
	started: async (broker: ServiceBroker) => doors.get(broker)?.report.start(),
	stopped: async (broker: ServiceBroker) => doors.get(broker)?.report.stop(),
};

// Tells, in constant time and never throwing, which of `secrets` a value is: its entry
// number (1 for the first), or 0. Fixed-width zero-padded buffers for timingSafeEqual, a
// length bit ANDed in (a prefix never matches), every secret compared, the entry summed
// without a branch: the work depends on no secret's content or length, nor on the match.
export function createSecretMatcher(secrets: readonly string[]): (presented: unknown) => number {
	const width = Math.max(COMPARE_WIDTH, ...secrets.map((secret) => Buffer.byteLength(secret)));
	const expected = secrets.map((secret) => Buffer.concat([Buffer.from(secret)], width));
	const lengths = secrets.map((secret) => Buffer.byteLength(secret));
	// One scratch buffer, reused: no other request runs until this function returns.
	const scratch = Buffer.alloc(width);
	return function whichSecret(presented: unknown): number {
		// A header value is a string (a repeated header's values joined); nothing else is.
		if (typeof presented !== "string") return 0;
		// As UTF-8, a character above 0x7F is bytes no secret holds (they are visible ASCII).
		const length = Buffer.byteLength(presented);
		scratch.fill(0);
		scratch.write(presented);
		let entry = 0;
		for (let index = 0; index < expected.length; index++) {
			const sameBytes = timingSafeEqual(scratch, expected[index]);
			const sameLength = length === lengths[index];
			entry += (index + 1) * (Number(sameBytes) & Number(sameLength));
		}
		return entry;
	};
}

// The two refusals: moleculer-web's UnAuthorizedError, written from a head and body built
// once, in Express too (whose default handler makes a 500 of an error passed to `next`).
// A gateway `onError` gets a copy instead: what it changes stays with that request.
function createRefusals(gateway: GatewayMethods, tally: Tally) {
	const refusal = (message: string, type: string) => {
		const error = new ApiGateway.Errors.UnAuthorizedError(type, undefined);
		error.message = message;
		const body = JSON.stringify(gateway.reformatError(error));
		const head = {
			"Content-type": "application/json; charset=utf-8",
			"Content-Length": String(Buffer.byteLength(body)),
			"WWW-Authenticate": CHALLENGE,
		};
		return { error, body, head, closingHead: { ...head, Connection: "close" } };
	};
	const refusals = {
		missing: refusal("No secret provided", ApiGateway.Errors.ERR_NO_TOKEN),
		invalid: refusal("Invalid secret", ApiGateway.Errors.ERR_INVALID_TOKEN),
	};
	return function refuse(req: GatewayRequest, res: ServerResponse, reason: Reason) {
		tally[reason]++;
		const { error, body, head, closingHead } = refusals[reason];
		// moleculer-web logs each response with this URL, which the caller chose: cut short.
		const url = req.originalUrl ?? req.url ?? "";
		req.originalUrl = url.length <= LOGGED_URL_LENGTH
			? url
			: `${url.slice(0, LOGGED_URL_LENGTH)}... (${url.length} characters)`;
		const closing = closesUnread(req);
		if (typeof gateway.settings.onError !== "function") {
			res.writeHead(401, closing ? closingHead : head).end(body);
			gateway.logResponse(req, res);
		} else {
			res.setHeader("WWW-Authenticate", CHALLENGE);
			if (closing) res.setHeader("Connection", "close");
			const copy = Object.create(Object.getPrototypeOf(error));
			Object.assign(copy, error, { name: error.name, message: error.message });
			gateway.sendError(req, res, copy);
		}
		return Promise.resolve(true);
	};
}

// A public route matches on the method and the exact path before "?": no prefix, decoding
// or normalising ("/health/../x", "//health" and "/health/" are not "/health"), so
// "GET /health" reaches only that alias. (PUBLIC_PATHS refuses OPTIONS; see below.)
function routeKey(req: GatewayRequest): string {
	const url = req.url ?? "";
	const query = url.indexOf("?");
	return `${req.method} ${query === -1 ? url : url.slice(0, query)}`;
}

// Overwritten, not deleted: `delete` makes the headers a slow dictionary (5% a request),
// and Node builds its lazy headersDistinct from rawHeaders by their original count.
function wipeHeaders(req: GatewayRequest) {
	req.headers[HEADER] = req.headers[CONSUMER_HEADER] = undefined;
	const raw = req.rawHeaders;
	for (let index = 0; index < raw.length; index += 2) {
		const name = raw[index].toLowerCase();
		if (name === HEADER || name === CONSUMER_HEADER) raw[index + 1] = "";
	}
	// Node builds headersDistinct from rawHeaders on first use, so only Express middleware,
	// before the door, can have built one; building it here would cost every request.
	const distinct = req.$next ? req.headersDistinct as Record<string, unknown> : undefined;
	if (distinct) distinct[HEADER] = distinct[CONSUMER_HEADER] = undefined;
}

// A body a refused request announces is never read, so nobody makes the origin read
// megabytes: it stops reading, and closes the connection half a second after the 401 (at
// once, the unread bytes would reset it before the client reads the 401). HTTP/1 only.
function closesUnread(req: GatewayRequest): boolean {
	const length = req.headers["content-length"];
	const hasBody = (length !== undefined && length !== "0") || !!req.headers["transfer-encoding"];
	if (!hasBody || req.httpVersionMajor !== 1) return false;
	const { socket } = req;
	(socket as { _handle?: { readStop?(): void } })._handle?.readStop?.();
	socket.destroySoon = () => socket.end(() => setTimeout(() => socket.destroy(), 500).unref());
	return true;
}

// A moleculer-web gateway, whatever it is called, has these two methods.
function isGateway(schema: { methods?: object }): boolean {
	const methods = schema.methods as Partial<GatewayMethods> | undefined;
	return typeof methods?.sendError === "function" && typeof methods.httpHandler === "function";
}

// ==== The door ends here. Below: the cluster guard, the configuration, read once at start,
// ==== and the optional rotation report and metrics.

// A gateway's addRoute, removeRoute and listAliases actions answer every node of a cluster
// by default, so a node that joins could take the routes away. "protected" leaves them to
// the services on this node.
function keepRoutesLocal(_service: Service, schema: ServiceSchema) {
	const actions = schema.actions as Record<string, object> | undefined;
	if (!actions || !isGateway(schema)) return;
	for (const name of ["addRoute", "removeRoute", "listAliases"]) {
		if (actions[name]) actions[name] = { ...actions[name], visibility: "protected" };
	}
}

const HOW_TO_MAKE_ONE = "Make one with: openssl rand -hex 32";

function readSecrets(raw: string | undefined): string[] {
	if (!raw?.trim()) throw configError(`SHARED_SECRET is not set. ${HOW_TO_MAKE_ONE}`);
	const secrets = raw.split(",").map((secret) => secret.trim());
	secrets.forEach((secret, index) => {
		// Never echo the value: this line goes to the logs.
		const which = secrets.length === 1
			? "SHARED_SECRET"
			: `SHARED_SECRET entry ${index + 1} of ${secrets.length}`;
		const weak = (problem: string) => configError(`${which} ${problem}. ${HOW_TO_MAKE_ONE}`);
		const tooShort = `is ${secret.length} characters; it needs at least ${MIN_SECRET_LENGTH}`;
		if (secret.length < MIN_SECRET_LENGTH) throw weak(tooShort);
		// Visible ASCII travels through any gateway and HTTP stack unchanged.
		if (!/^[\x21-\x7e]+$/.test(secret)) throw weak("holds a space or a non-ASCII character");
		if (new Set(secret).size < 8) throw weak("uses fewer than 8 different characters");
		// Each request is counted against exactly one entry.
		const first = secrets.indexOf(secret);
		if (first !== index) throw configError(`${which} is the same as entry ${first + 1}.`);
	});
	return secrets;
}

function readPublicRoutes(raw: string | undefined): Set<string> {
	const routes = new Set<string>();
	for (const entry of (raw ?? "").split(",").map((text) => text.trim()).filter(Boolean)) {
		const [, method, path] = /^([A-Z]+) (\/\S*)$/.exec(entry.replace(/\s+/, " ")) ?? [];
		if (!path || path.includes("?")) {
			throw configError(`PUBLIC_PATHS entry "${entry}" is not "METHOD /exact/path".`);
		}
		// moleculer-web routes OPTIONS as the method a preflight names, so this entry
		// would open other methods. Browsers send preflights to the gateway, not here.
		const atGateway = "answer CORS preflights at the gateway (Zuplo's CORS policy)";
		if (method === "OPTIONS") {
			throw configError(`PUBLIC_PATHS "${entry}" opens every method: ${atGateway}.`);
		}
		routes.add(`${method} ${path}`);
	}
	return routes;
}

function readSeconds(name: string, fallback: number): number {
	const raw = process.env[name];
	if (!raw?.trim()) return fallback;
	const seconds = Number(raw);
	if (Number.isInteger(seconds) && seconds >= 1) return seconds;
	throw configError(`${name} is "${raw}"; it needs a whole number of seconds, 1 or more.`);
}

// The broker prints a middleware's start-up error and exits 1. A stack trace would bury
// the one line that says what to fix, so the error carries none.
function configError(message: string): Error {
	const error = new Error(message);
	error.stack = `Error: ${message}`;
	return error;
}

// --- The rotation report and metrics: which secret is in use -----------------------------

// What the door counts: a request pays for an increment and a clock read.
type Tally = { accepted: number[]; lastSeen: number[]; missing: number; invalid: number };

function createTally(entries: number): Tally {
	const zeros = () => Array<number>(entries).fill(0);
	return { accepted: zeros(), lastSeen: zeros(), missing: 0, invalid: 0 };
}

/**
 * Every SHARED_SECRET_REPORT_SECONDS (60) it logs how many requests used each entry after
 * the first (those a rotation removes), that an entry unused for SHARED_SECRET_QUIET_SECONDS
 * (600) can be removed, and the refusals by reason: one line of each kind per period,
 * entries by position, never by any part of their value. With the broker's metrics on, the
 * counts are copied into Moleculer's registry once a second, so a request costs the same.
 */
function createReport(broker: ServiceBroker, tally: Tally) {
	const everyMs = readSeconds("SHARED_SECRET_REPORT_SECONDS", 60) * 1000;
	const quietAfterMs = readSeconds("SHARED_SECRET_QUIET_SECONDS", 600) * 1000;
	const [period, quietFor] = [duration(everyMs), duration(quietAfterMs)];
	const copyToMetrics = broker.isMetricsEnabled() ? registerMetrics(broker, tally) : undefined;
	const total = tally.accepted.length;
	const reported = { accepted: [...tally.accepted], missing: 0, invalid: 0 };
	const announcedQuiet = tally.accepted.map(() => false);
	const log = (line: string) => broker.logger.info(`SharedSecretMiddleware: ${line}`);
	let startedAt = 0;
	let timers: ReturnType<typeof setInterval>[] = [];

	function report() {
		for (let index = 1; index < total; index++) {
			const name = `SHARED_SECRET entry ${index + 1} of ${total}`;
			const lastSeen = tally.lastSeen[index];
			const used = tally.accepted[index] - reported.accepted[index];
			const quiet = Date.now() - (lastSeen || startedAt) >= quietAfterMs;
			if (used > 0) {
				announcedQuiet[index] = false;
				const last = new Date(lastSeen).toISOString();
				const uses = `${used} requests in the last ${period}, the last at ${last}`;
				log(`${name} is still in use: ${uses}. Keep it.`);
			} else if (quiet && !announcedQuiet[index]) {
				announcedQuiet[index] = true;
				log(`no request has used ${name} for ${quietFor}; it can be removed.`);
			}
		}
		const missing = tally.missing - reported.missing;
		const invalid = tally.invalid - reported.invalid;
		const refusals = `${missing} without a secret, ${invalid} with an invalid one`;
		if (missing + invalid > 0) {
			log(`refused ${missing + invalid} requests in the last ${period}: ${refusals}.`);
		}
		reported.accepted = [...tally.accepted];
		[reported.missing, reported.invalid] = [tally.missing, tally.invalid];
	}

	const rotating = `SHARED_SECRET has ${total} entries. Entry 1 is the current one; this log`;
	const announcement = `${rotating} says when another has been unused for ${quietFor}.`;
	return {
		announce: () => total > 1 && log(announcement),
		// unref(): the timers never keep a stopping process alive.
		start() {
			startedAt = Date.now();
			timers = [setInterval(report, everyMs).unref()];
			if (copyToMetrics) timers.push(setInterval(copyToMetrics, 1000).unref());
		},
		stop: () => timers.forEach(clearInterval),
	};
}

// Two counters and a gauge, registered only when the broker's metrics are on.
function registerMetrics(broker: ServiceBroker, tally: Tally): () => void {
	// moleculer 0.14 and 0.15 type register() differently; both return a metric with `set`.
	const registry = broker.metrics as unknown as { register(options: object): SettableMetric };
	const [accepted, refused, lastSeen] = [
		["counter", "shared_secret.accepted.total", "entry", "Requests let through, by entry"],
		["counter", "shared_secret.refused.total", "reason", "Requests refused: missing, invalid"],
		["gauge", "shared_secret.last_seen.seconds", "entry", "Each entry's last use (Unix time)"],
	].map(([type, name, label, description]) => {
		return registry.register({ type, name, labelNames: [label], description });
	});
	return function copyTally() {
		tally.accepted.forEach((count, index) => {
			accepted.set(count, { entry: index + 1 });
			lastSeen.set(Math.floor(tally.lastSeen[index] / 1000), { entry: index + 1 });
		});
		refused.set(tally.missing, { reason: "missing" });
		refused.set(tally.invalid, { reason: "invalid" });
	};
}

function duration(ms: number): string {
	if (ms % 60_000 !== 0) return `${ms / 1000} s`;
	return `${ms / 60_000} minute${ms === 60_000 ? "" : "s"}`;
}

type Door = { whichSecret: Matcher; publicRoutes: Set<string>; tally: Tally; report: Report };
type Matcher = ReturnType<typeof createSecretMatcher>;
type Report = ReturnType<typeof createReport>;
type SettableMetric = { set(value: number, labels: Record<string, string | number>): void };
type Reason = "missing" | "invalid";
type GatewayRequest = IncomingMessage & { originalUrl?: string; $next?: unknown };
type GatewayParams = { req: GatewayRequest; res: ServerResponse; [PASSED_DOOR]?: true };
type GatewayMethods = {
	settings: { onError?: unknown };
	sendError(req: GatewayRequest, res: ServerResponse, error: Error): void;
	reformatError(error: Error): unknown;
	logResponse(req: GatewayRequest, res: ServerResponse): void;
	httpHandler: unknown;
};
