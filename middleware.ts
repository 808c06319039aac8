/**
 * SharedSecretMiddleware: the origin's door.
 *
 * An API gateway such as Zuplo checks each caller's API key, then adds the
 * header `x-shared-secret` to every request it forwards. This Moleculer
 * middleware makes a moleculer-web gateway refuse, with a 401, every HTTP
 * request that does not carry that secret, so nobody can go around the gateway.
 * The gateway may also name the caller in `x-consumer`; on a request with the
 * secret, services read that as `ctx.meta.user.sub`.
 *
 *     new ServiceBroker({ middlewares: [SharedSecretMiddleware] })
 *
 * It is configured by the environment alone:
 *   SHARED_SECRET  one secret, or "new,old" while you rotate. Each is at least
 *                  32 visible ASCII characters: `openssl rand -hex 32`.
 *   PUBLIC_PATHS   optional, comma-separated "METHOD /exact/path" entries that
 *                  pass without the secret, e.g. "GET /health". Nothing by default.
 *   SHARED_SECRET_REPORT_SECONDS, SHARED_SECRET_QUIET_SECONDS
 *                  optional: how often it logs which secret is in use (60), and
 *                  after how long unused it calls an entry removable (600).
 *
 * This file imports nothing from its project, so you can copy it alone.
 */
import { timingSafeEqual } from "node:crypto";
import type { ActionHandler, ActionSchema, Context, Middleware, Service, ServiceBroker } from "moleculer";
import ApiGateway from "moleculer-web";

const HEADER = "x-shared-secret";
// Who called, as the gateway vouches for it (Zuplo: request.user.sub).
const CONSUMER_HEADER = "x-consumer";
const MIN_SECRET_LENGTH = 32;

// Secrets are compared in buffers this wide: the same work for any secret length.
const COMPARE_WIDTH = 256;

// RFC 9110 §15.5.2: a 401 carries a challenge. The scheme is not a standard one;
// it tells the gateway's operator which header the origin expects.
const CHALLENGE = `SharedSecret header="${HEADER}"`;

// What the door counts: a request pays for an increment and a clock read.
type Tally = { accepted: number[]; lastSeen: number[]; missing: number; invalid: number };

// Each broker's door, made once as that broker is built (see `created`).
type Door = { whichSecret: (presented: unknown) => number; publicRoutes: Set<string>; tally: Tally; report: ReturnType<typeof createReport> };
const doors = new WeakMap<ServiceBroker, Door>();

// Marks the params of a request the door let through (see the retry below).
const PASSED_DOOR = Symbol("passed SharedSecretMiddleware");

export const SharedSecretMiddleware: Middleware = {
	name: "SharedSecretMiddleware",

	// Runs once, inside `new ServiceBroker()`. Reading and checking the
	// configuration here means a missing or weak SHARED_SECRET stops the
	// process before it serves anything, never one request at a time.
	created(broker: ServiceBroker) {
		const secrets = readSecrets(process.env.SHARED_SECRET);
		const publicRoutes = readPublicRoutes(process.env.PUBLIC_PATHS);
		const tally: Tally = { accepted: secrets.map(() => 0), lastSeen: secrets.map(() => 0), missing: 0, invalid: 0 };
		const report = createReport(broker, tally);
		doors.set(broker, { whichSecret: createSecretMatcher(secrets), publicRoutes, tally, report });
		const log = (line: string) => broker.logger.info(`SharedSecretMiddleware: ${line}`);
		log(`${HEADER} required; public: ${[...publicRoutes].join(", ") || "none"}.`);
		if (secrets.length > 1) log(`SHARED_SECRET has ${secrets.length} entries. Entry 1 is the current one; this log says when no request has used another for ${report.quietAfter}: it can then be removed.`);
	},

	// The rotation report runs while the broker does.
	async started(broker: ServiceBroker) { doors.get(broker)?.report.start(); },
	async stopped(broker: ServiceBroker) { doors.get(broker)?.report.stop(); },

	// moleculer-web hands every HTTP request to its private `rest` action
	// (ctx.params.req / .res) before routing, body parsing or any action.
	// Wrapping that one action guards all HTTP and nothing else: calls between
	// services, events and the REPL carry no HTTP headers and stay untouched.
	localAction(this: ServiceBroker, next: ActionHandler, action: ActionSchema): ActionHandler {
		if (!isGatewayEntry(action)) return next;
		const door = doors.get(this);
		// Fail closed: a gateway on a broker whose `created` never ran here.
		if (!door) throw new Error("SharedSecretMiddleware must be in the broker's `middlewares`.");
		const { whichSecret, publicRoutes, tally } = door;
		const gateway = action.service as unknown as GatewayMethods;
		const refuse = createRefusals(gateway);

		return function sharedSecretDoor(this: Service, ctx: Context) {
			const params = ctx.params as GatewayParams;
			const { req, res } = params;
			// A broker `retryPolicy` calls `rest` again with the same params
			// when a service fails with a retryable error, and the header is
			// wiped by then: a params object marked here gets the service's real
			// answer on every attempt, not a 401.
			if (params[PASSED_DOOR]) return next.call(this, ctx);
			const presented = req.headers[HEADER];
			const consumer = req.headers[CONSUMER_HEADER];

			// Services never see the secret, nor a consumer the door did not
			// vouch for, even if a route copies req.headers into ctx.meta.
			// Overwritten, not deleted: `delete` makes the headers a slow
			// dictionary, which cost 5% per request in moleculer-web.
			if (presented !== undefined) req.headers[HEADER] = undefined;
			if (consumer !== undefined) req.headers[CONSUMER_HEADER] = undefined;

			// No public routes (the default): no route key to build.
			const isPublic = publicRoutes.size > 0 && publicRoutes.has(routeKey(req));
			if (!isPublic) {
				if (presented === undefined || presented === "") {
					tally.missing++;
					return refuse.noSecret(req, res);
				}
				const entry = whichSecret(presented);
				if (entry === 0) {
					tally.invalid++;
					return refuse.invalidSecret(req, res);
				}
				tally.accepted[entry - 1]++;
				tally.lastSeen[entry - 1] = Date.now();
				// Only a request with the secret came through the gateway, so
				// only its consumer header is the gateway's word.
				if (typeof consumer === "string" && consumer !== "") (ctx.meta as { user?: object }).user = { sub: consumer };
			}
			params[PASSED_DOOR] = true;
			return next.call(this, ctx);
		};
	}
};

/**
 * Returns a function that tells, in constant time, which of `secrets` the value
 * is: its entry number (1 for the first), or 0. It never throws. Not a hash of
 * both sides (the textbook way: a SHA-256 is several percent of a request): the
 * value goes into a zero-padded fixed-width buffer, `timingSafeEqual` compares
 * it with each padded secret, and a length-equality bit is ANDed in, so a prefix
 * never matches. The work never depends on a secret's content or length (up to
 * COMPARE_WIDTH) nor on which one matched: every secret is compared, and the
 * entry number is added up without a branch.
 */
export function createSecretMatcher(secrets: readonly string[]): (presented: unknown) => number {
	const width = Math.max(COMPARE_WIDTH, ...secrets.map(secret => Buffer.byteLength(secret)));
	const expected = secrets.map(secret => {
		const bytes = Buffer.alloc(width);
		bytes.write(secret);
		return { bytes, length: Buffer.byteLength(secret) };
	});
	// One scratch buffer, reused: no other request runs until this function ends.
	const scratch = Buffer.alloc(width);

	return function whichSecret(presented: unknown): number {
		// Node decodes header bytes as latin1 and joins a repeated header with
		// ", ". Anything else is not a header value and cannot match.
		if (typeof presented !== "string") return 0;
		// As UTF-8, any character above 0x7F becomes bytes >= 0x80, which no
		// secret holds (secrets are visible ASCII), so such values never match.
		const length = Buffer.byteLength(presented);
		scratch.fill(0);
		scratch.write(presented);
		let entry = 0;
		for (let index = 0; index < expected.length; index++) {
			const sameBytes = timingSafeEqual(scratch, expected[index].bytes);
			const sameLength = length === expected[index].length;
			entry += (index + 1) * (Number(sameBytes) & Number(sameLength));
		}
		return entry;
	};
}

// --- The rotation report: which secret is in use --------------------------------

/**
 * Every SHARED_SECRET_REPORT_SECONDS (60) it logs how many requests used each
 * entry after the first (those a rotation removes) and when; that an entry
 * unused for SHARED_SECRET_QUIET_SECONDS (600) can be removed; and refusals by
 * reason. Counts, never a line per request, so a scanner cannot flood the logs;
 * entries by position, never by any part of their value. With the broker's
 * metrics on, the numbers are copied into Moleculer's registry once a second
 * (not per request, so a request costs the same either way), and any reporter,
 * Prometheus included, exports them.
 */
function createReport(broker: ServiceBroker, tally: Tally) {
	const everyMs = readSeconds("SHARED_SECRET_REPORT_SECONDS", 60) * 1000;
	const quietAfterMs = readSeconds("SHARED_SECRET_QUIET_SECONDS", 600) * 1000;
	const metrics = broker.isMetricsEnabled() ? registerMetrics(broker, tally) : undefined;
	const [total, reported] = [tally.accepted.length, { accepted: [...tally.accepted], missing: 0, invalid: 0 }];
	const announcedQuiet = tally.accepted.map(() => false);
	const log = (line: string) => broker.logger.info(`SharedSecretMiddleware: ${line}`);
	let [startedAt, timers] = [0, [] as ReturnType<typeof setInterval>[]];

	function report() {
		for (let index = 1; index < total; index++) {
			const [name, lastSeen] = [`SHARED_SECRET entry ${index + 1} of ${total}`, tally.lastSeen[index]];
			const used = tally.accepted[index] - reported.accepted[index];
			if (used > 0) {
				announcedQuiet[index] = false;
				log(`${name} is still in use: ${used} requests in the last ${duration(everyMs)}, the last at ${new Date(lastSeen).toISOString()}. Keep it.`);
			} else if (!announcedQuiet[index] && Date.now() - (lastSeen || startedAt) >= quietAfterMs) {
				announcedQuiet[index] = true;
				log(`no request has used ${name} for ${duration(quietAfterMs)}; it can be removed.`);
			}
		}
		const [missing, invalid] = [tally.missing - reported.missing, tally.invalid - reported.invalid];
		if (missing + invalid > 0) log(`refused ${missing + invalid} requests in the last ${duration(everyMs)}: ${missing} without a secret, ${invalid} with an invalid one.`);
		Object.assign(reported, { accepted: [...tally.accepted], missing: tally.missing, invalid: tally.invalid });
	}

	return {
		quietAfter: duration(quietAfterMs),
		// unref(): the timers never keep a stopping process alive.
		start() {
			startedAt = Date.now();
			timers = [setInterval(report, everyMs).unref(), ...(metrics ? [setInterval(metrics, 1000).unref()] : [])];
		},
		stop: () => timers.forEach(clearInterval)
	};
}

// Two counters and a gauge, registered only when the broker's metrics are on.
function registerMetrics(broker: ServiceBroker, tally: Tally): () => void {
	const accepted = broker.metrics.register({ type: "counter", name: "shared_secret.accepted.total", labelNames: ["entry"],
		description: "Requests let through, by SHARED_SECRET entry (1: the first)" })!;
	const refused = broker.metrics.register({ type: "counter", name: "shared_secret.refused.total", labelNames: ["reason"],
		description: "Requests refused, by reason: missing or invalid" })!;
	const lastSeen = broker.metrics.register({ type: "gauge", name: "shared_secret.last_seen.seconds", labelNames: ["entry"],
		description: "When each SHARED_SECRET entry was last used (Unix time; 0: not since start)" })!;
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
	return ms % 60_000 === 0 ? `${ms / 60_000} minute${ms === 60_000 ? "" : "s"}` : `${ms / 1000} s`;
}

// --- Configuration, read once at start -------------------------------------

const HOW_TO_MAKE_ONE = "Make one with: openssl rand -hex 32";

function readSecrets(raw: string | undefined): string[] {
	if (raw === undefined || raw.trim() === "") throw configError(`SHARED_SECRET is not set. ${HOW_TO_MAKE_ONE}`);
	const secrets = raw.split(",").map(secret => secret.trim());
	secrets.forEach((secret, index) => {
		// Never echo the value: this line goes to the logs.
		const which = secrets.length > 1 ? `SHARED_SECRET entry ${index + 1} of ${secrets.length}` : "SHARED_SECRET";
		if (secret.length < MIN_SECRET_LENGTH) throw configError(`${which} is ${secret.length} characters; it needs at least ${MIN_SECRET_LENGTH}. ${HOW_TO_MAKE_ONE}`);
		// Visible ASCII travels through any gateway and HTTP stack unchanged.
		if (!/^[\x21-\x7e]+$/.test(secret)) throw configError(`${which} holds a space or a non-ASCII character; use visible ASCII only. ${HOW_TO_MAKE_ONE}`);
		if (new Set(secret).size < 8) throw configError(`${which} uses fewer than 8 different characters and looks like a placeholder. ${HOW_TO_MAKE_ONE}`);
		// Each request is counted against exactly one entry.
		if (secrets.indexOf(secret) !== index) throw configError(`${which} is the same as entry ${secrets.indexOf(secret) + 1}; list each secret once.`);
	});
	return secrets;
}

function readPublicRoutes(raw: string | undefined): Set<string> {
	const routes = new Set<string>();
	for (const entry of (raw ?? "").split(",")) {
		const trimmed = entry.trim();
		if (trimmed === "") continue;
		const match = /^([A-Z]+) (\/\S*)$/.exec(trimmed.replace(/\s+/, " "));
		if (!match || match[2].includes("?")) throw configError(`PUBLIC_PATHS entry "${trimmed}" is not "METHOD /exact/path" (for example "GET /health").`);
		routes.add(`${match[1]} ${match[2]}`);
	}
	return routes;
}

function readSeconds(name: string, fallback: number): number {
	const raw = process.env[name];
	if (raw === undefined || raw.trim() === "") return fallback;
	const seconds = Number(raw);
	if (!Number.isInteger(seconds) || seconds < 1) throw configError(`${name} is "${raw}"; it needs a whole number of seconds, 1 or more.`);
	return seconds;
}

// The broker prints a middleware's start-up error and exits 1. A stack trace
// would bury the one line that says what to fix, so the error carries none.
function configError(message: string): Error {
	const error = new Error(message);
	error.stack = `Error: ${message}`;
	return error;
}

// --- Per request ------------------------------------------------------------

// A public route matches on the method and the exact path before "?", and
// nothing else: no prefix, no decoding, no normalising ("/health/../x",
// "//health" and "/health/" are not "/health"). moleculer-web routes on the
// same text, so "GET /health" here can only reach the /health alias.
function routeKey(req: GatewayRequest): string {
	const url = req.url ?? "";
	const query = url.indexOf("?");
	return `${req.method} ${query === -1 ? url : url.slice(0, query)}`;
}

/**
 * The two refusals: moleculer-web's UnAuthorizedError in its JSON shape, with
 * the page's messages; each resolves `true` (handled). Fast path, when the
 * gateway has no `onError` and is not Express middleware: head and body built
 * once, here, and written as they are, then logged as moleculer-web logs its
 * responses. Otherwise sendError gets a fresh copy of the error, so an `onError`
 * may change it without changing the next request's. Copied (about 1 µs), not
 * constructed: that captures a stack trace (about 10 µs).
 */
function createRefusals(gateway: GatewayMethods) {
	const refusal = (message: string, type: string) => {
		const error = new ApiGateway.Errors.UnAuthorizedError(type, undefined);
		error.message = message;
		const prototype = Object.getPrototypeOf(error);
		const body = JSON.stringify(gateway.reformatError(error));
		const length = String(Buffer.byteLength(body));
		const headers = { "Content-type": "application/json; charset=utf-8", "Content-Length": length, "WWW-Authenticate": CHALLENGE };
		return function refuse(req: GatewayRequest, res: GatewayResponse) {
			// moleculer-web logs the URL it sets in `rest`, which has not run yet.
			req.originalUrl ??= req.url;
			if (typeof gateway.settings.onError !== "function" && !req.$next) {
				res.writeHead(401, headers).end(body);
				gateway.logResponse(req, res);
			} else {
				res.setHeader("WWW-Authenticate", CHALLENGE);
				gateway.sendError(req, res, Object.assign(Object.create(prototype), error, { name: error.name, message: error.message }));
			}
			return Promise.resolve(true);
		};
	};
	return {
		noSecret: refusal("No secret provided", ApiGateway.Errors.ERR_NO_TOKEN),
		invalidSecret: refusal("Invalid secret", ApiGateway.Errors.ERR_INVALID_TOKEN)
	};
}

// moleculer-web's entry action is named `rest` and lives on a service that has
// its `httpHandler` and `sendError` methods, whatever the gateway is called.
function isGatewayEntry(action: ActionSchema): boolean {
	const { rawName } = action as ActionSchema & { rawName?: string };
	const service = action.service as Partial<GatewayMethods> | undefined;
	return rawName === "rest" && typeof service?.sendError === "function" && typeof service.httpHandler === "function";
}

type GatewayRequest = import("node:http").IncomingMessage & { originalUrl?: string; $next?: unknown };
type GatewayResponse = import("node:http").ServerResponse;
type GatewayParams = { req: GatewayRequest; res: GatewayResponse; [PASSED_DOOR]?: true };
type GatewayMethods = {
	settings: { onError?: unknown };
	sendError(req: GatewayRequest, res: GatewayResponse, error: Error): void;
	reformatError(error: Error): unknown;
	logResponse(req: GatewayRequest, res: GatewayResponse): void;
	httpHandler?: unknown;
};
