/**
 * SharedSecretMiddleware: the origin's door.
 *
 * An API gateway such as Zuplo checks each caller's API key, then adds the
 * header `x-shared-secret` to every request it forwards. This Moleculer
 * middleware makes a moleculer-web gateway refuse, with a 401, every HTTP
 * request that does not carry that secret, so nobody can go around the gateway.
 *
 *     new ServiceBroker({ middlewares: [SharedSecretMiddleware] })
 *
 * It is configured by the environment alone:
 *   SHARED_SECRET  one secret, or several separated by commas ("new,old") while
 *                  you rotate. Each is at least 32 visible ASCII characters:
 *                  `openssl rand -hex 32`.
 *   PUBLIC_PATHS   optional, comma-separated "METHOD /exact/path" entries that
 *                  pass without the secret, e.g. "GET /health". Nothing by default.
 *
 * This file imports nothing from its project, so you can copy it alone.
 */
import { timingSafeEqual } from "node:crypto";
import type { ActionHandler, ActionSchema, Context, Middleware, Service, ServiceBroker } from "moleculer";
import ApiGateway from "moleculer-web";

const HEADER = "x-shared-secret";
const MIN_SECRET_LENGTH = 32;

// Every secret is compared inside a buffer of at least this many bytes, so the
// work per request is the same for any secret up to this length.
const COMPARE_WIDTH = 256;

// RFC 9110 §15.5.2: a 401 must carry a challenge. The scheme is not a standard
// one; it tells the gateway's operator which header the origin expects.
const CHALLENGE = `SharedSecret header="${HEADER}"`;

// Each broker's door, made once as that broker is built (see `created`).
type Door = {
	matchesASecret: (presented: unknown) => boolean;
	publicRoutes: Set<string>;
	noSecret: Error;
	invalidSecret: Error;
};
const doors = new WeakMap<ServiceBroker, Door>();

export const SharedSecretMiddleware: Middleware = {
	name: "SharedSecretMiddleware",

	// Runs once, inside `new ServiceBroker()`. Reading and checking the
	// configuration here means a missing or weak SHARED_SECRET stops the
	// process before it serves anything, never one request at a time.
	created(broker: ServiceBroker) {
		const publicRoutes = readPublicRoutes(process.env.PUBLIC_PATHS);
		doors.set(broker, {
			matchesASecret: createSecretMatcher(readSecrets(process.env.SHARED_SECRET)),
			publicRoutes,
			// Two refusals, built once. Building a MoleculerError captures a
			// stack trace, which costs more than serving a request; a refusal
			// must cost less. moleculer-web's own class gives its JSON error
			// shape; the messages are the page's. Neither carries anything the
			// caller sent.
			noSecret: refusal("No secret provided", ApiGateway.Errors.ERR_NO_TOKEN),
			invalidSecret: refusal("Invalid secret", ApiGateway.Errors.ERR_INVALID_TOKEN)
		});
		broker.logger.info(
			`SharedSecretMiddleware: ${HEADER} required; public: ${[...publicRoutes].join(", ") || "none"}.`
		);
	},

	// moleculer-web hands every HTTP request to its private `rest` action as
	// ctx.params.req / ctx.params.res, before routing, body parsing or any
	// action. Wrapping that one action guards all HTTP and nothing else: calls
	// between services, events and the REPL carry no HTTP headers, and their
	// handlers are returned untouched.
	localAction(this: ServiceBroker, next: ActionHandler, action: ActionSchema): ActionHandler {
		if (!isGatewayEntry(action)) return next;
		const door = doors.get(this);
		// Fail closed: a gateway on a broker whose `created` never ran here.
		if (!door) throw new Error("SharedSecretMiddleware must be in the broker's `middlewares`.");
		const { matchesASecret, publicRoutes, noSecret, invalidSecret } = door;
		const gateway = action.service as unknown as GatewayMethods;

		return function sharedSecretDoor(this: Service, ctx: Context) {
			const { req, res } = ctx.params as GatewayParams;
			const presented = req.headers[HEADER];

			// Services never see the secret, even if a route copies
			// req.headers into ctx.meta. Overwritten, not deleted: `delete`
			// turns the headers object into a slow dictionary, and every later
			// header lookup in moleculer-web cost 5% more per request.
			if (presented !== undefined) req.headers[HEADER] = undefined;

			// With no public routes (the middleware's default), no request
			// pays for building its route key.
			const isPublic = publicRoutes.size > 0 && publicRoutes.has(routeKey(req));
			if (!isPublic) {
				if (presented === undefined || presented === "") {
					return refuse(gateway, req, res, noSecret);
				}
				if (!matchesASecret(presented)) {
					return refuse(gateway, req, res, invalidSecret);
				}
			}
			return next.call(this, ctx);
		};
	}
};

/**
 * Returns a function that tells, in constant time, whether `presented` equals
 * one of `secrets`, and never throws.
 *
 * Why not hash both sides and compare the digests? That is the textbook way,
 * but a SHA-256 costs about 1.5 µs, several percent of a whole request through
 * moleculer-web. Instead the presented value is written into a fixed-width,
 * zero-padded buffer and compared byte for byte with each zero-padded secret by
 * `timingSafeEqual`; a separate length-equality bit is ANDed in, so a prefix or
 * a secret with trailing zero bytes never matches (express-basic-auth's way).
 * The work depends on the presented value's length and the number of secrets,
 * never on a secret's content or length (up to COMPARE_WIDTH), and every secret
 * is compared, with no early exit.
 */
export function createSecretMatcher(secrets: readonly string[]): (presented: unknown) => boolean {
	const width = Math.max(COMPARE_WIDTH, ...secrets.map(secret => Buffer.byteLength(secret)));
	const expected = secrets.map(secret => {
		const bytes = Buffer.alloc(width);
		bytes.write(secret);
		return { bytes, length: Buffer.byteLength(secret) };
	});
	// One scratch buffer, reused: JavaScript runs this function to the end
	// before any other request can touch it, and no allocation happens per call.
	const scratch = Buffer.alloc(width);

	return function matchesASecret(presented: unknown): boolean {
		// Node decodes header bytes as latin1; a repeated header arrives joined
		// with ", ". Anything else is not a header value and cannot match.
		if (typeof presented !== "string") return false;
		// As UTF-8, any character above 0x7F becomes bytes >= 0x80, which no
		// secret holds (secrets are visible ASCII), so such values never match.
		const length = Buffer.byteLength(presented);
		scratch.fill(0);
		scratch.write(presented);
		let matched = false;
		for (const secret of expected) {
			const sameBytes = timingSafeEqual(scratch, secret.bytes);
			const sameLength = length === secret.length;
			matched = (sameBytes && sameLength) || matched;
		}
		return matched;
	};
}

// --- Configuration, read once at start -------------------------------------

const HOW_TO_MAKE_ONE = "Make one with: openssl rand -hex 32";

function readSecrets(raw: string | undefined): string[] {
	if (raw === undefined || raw.trim() === "") {
		throw configError(`SHARED_SECRET is not set. ${HOW_TO_MAKE_ONE}`);
	}
	const secrets = raw.split(",").map(secret => secret.trim());
	secrets.forEach((secret, index) => {
		// Never echo the value: this line goes to the logs.
		const which = secrets.length > 1 ? `SHARED_SECRET entry ${index + 1} of ${secrets.length}` : "SHARED_SECRET";
		if (secret.length < MIN_SECRET_LENGTH) {
			throw configError(
				`${which} is ${secret.length} characters; it needs at least ${MIN_SECRET_LENGTH}. ${HOW_TO_MAKE_ONE}`
			);
		}
		// Visible ASCII travels through any gateway and HTTP stack unchanged.
		if (!/^[\x21-\x7e]+$/.test(secret)) {
			throw configError(
				`${which} holds a space or a non-ASCII character; use visible ASCII only. ${HOW_TO_MAKE_ONE}`
			);
		}
		if (new Set(secret).size < 8) {
			throw configError(
				`${which} uses fewer than 8 different characters and looks like a placeholder. ${HOW_TO_MAKE_ONE}`
			);
		}
	});
	return secrets;
}

function readPublicRoutes(raw: string | undefined): Set<string> {
	const routes = new Set<string>();
	for (const entry of (raw ?? "").split(",")) {
		const trimmed = entry.trim();
		if (trimmed === "") continue;
		const match = /^([A-Z]+) (\/\S*)$/.exec(trimmed.replace(/\s+/, " "));
		if (!match || match[2].includes("?")) {
			throw configError(
				`PUBLIC_PATHS entry "${trimmed}" is not "METHOD /exact/path" (for example "GET /health").`
			);
		}
		routes.add(`${match[1]} ${match[2]}`);
	}
	return routes;
}

// The broker prints a middleware's start-up error and exits 1. A stack trace
// would bury the one line that says what to fix, so the error carries none.
function configError(message: string): Error {
	const error = new Error(message);
	error.stack = `Error: ${message}`;
	return error;
}

// --- Per request ------------------------------------------------------------

// A public route matches on the method and the exact path, with the query
// string cut off, and nothing else: no prefix, no decoding, no normalising.
// "/health/../api/protected", "//health" or "/health/" are not "/health".
// moleculer-web routes on the same text before its "?", so a request that
// passes here as "GET /health" can only reach the /health alias.
function routeKey(req: GatewayRequest): string {
	const url = req.url ?? "";
	const query = url.indexOf("?");
	return `${req.method} ${query === -1 ? url : url.slice(0, query)}`;
}

// A refusal is written straight through moleculer-web's own sendError, which
// honours a gateway-wide `onError`, instead of being thrown through the broker:
// a throw would build a stack trace and run every error middleware, and cost
// more than serving the request. The resolved `true` tells moleculer-web the
// request was handled.
function refuse(gateway: GatewayMethods, req: GatewayRequest, res: GatewayResponse, error: Error) {
	// moleculer-web logs the response with the URL it sets in `rest`, which
	// has not run yet.
	req.originalUrl ??= req.url;
	res.setHeader("WWW-Authenticate", CHALLENGE);
	gateway.sendError(req, res, error);
	return Promise.resolve(true);
}

function refusal(message: string, type: string): Error {
	const error = new ApiGateway.Errors.UnAuthorizedError(type, undefined);
	error.message = message;
	return error;
}

// moleculer-web's entry action is named `rest` and lives on a service that has
// its `httpHandler` and `sendError` methods, whatever the gateway is called.
function isGatewayEntry(action: ActionSchema): boolean {
	const { rawName } = action as ActionSchema & { rawName?: string };
	const service = action.service as Partial<GatewayMethods> | undefined;
	return (
		rawName === "rest" &&
		typeof service?.sendError === "function" &&
		typeof (service as { httpHandler?: unknown }).httpHandler === "function"
	);
}

type GatewayRequest = import("node:http").IncomingMessage & { originalUrl?: string };
type GatewayResponse = import("node:http").ServerResponse;
type GatewayParams = { req: GatewayRequest; res: GatewayResponse };
type GatewayMethods = { sendError(req: GatewayRequest, res: GatewayResponse, error: Error): void };
