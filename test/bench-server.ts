/**
 * The benchmark's other contenders, each a plain `api` service with the template's
 * answers behind the same moleculer-web route as index.ts, so that only the guard
 * differs:
 *
 *   CONTENDER=baseline  no guard at all (with METRICS_PORT, Moleculer's metrics
 *                       on, as index.ts turns them on).
 *   CONTENDER=page      the public page's approach as it is commonly fixed: a
 *                       route hook copies the header into ctx.meta, and a check
 *                       inside every action hashes it with createHash and throws
 *                       a plain MoleculerClientError.
 *   CONTENDER=floor     no Moleculer at all: node:http answering every request
 *                       with the template's 401, byte for byte. Nothing written
 *                       on Node can refuse for less.
 *   CONTENDER=door      the baseline with the door (middleware.ts) alone: its own
 *                       cost, without index.ts's extras.
 *   CONTENDER=emitFloor the baseline with the floor of the door's approach: the
 *                       server's emit wrapped, one constant-time compare, the
 *                       same 401, and nothing else.
 *
 * The template itself is benchmarked as index.ts, unchanged.
 */
import { createHash, timingSafeEqual } from "node:crypto";
import { createServer, type IncomingMessage, type Server } from "node:http";
import {
	type ActionHandler,
	type ActionSchema,
	type Context,
	Errors,
	type LogLevels,
	type Middleware,
	ServiceBroker,
} from "moleculer";
import ApiGateway from "moleculer-web";
import { SharedSecretMiddleware } from "../middleware.ts";

const contender = process.env.CONTENDER;
const contenders = ["baseline", "page", "floor", "door", "emitFloor"];
if (!contenders.includes(contender ?? "")) {
	throw new Error(`CONTENDER must be one of ${contenders.join(", ")}, not ${contender}`);
}

// The floor: no broker is even built.
if (contender === "floor") {
	const body =
		'{"name":"UnAuthorizedError","message":"Invalid secret","code":401,"type":"INVALID_TOKEN"}';
	const headers = {
		"Content-type": "application/json; charset=utf-8",
		"Content-Length": String(body.length),
		"WWW-Authenticate": 'SharedSecret header="x-shared-secret"',
	};
	createServer((_req, res) => res.writeHead(401, headers).end(body)).listen(
		Number(process.env.PORT ?? 0),
	);
} else {
	await startMoleculer();
}

async function startMoleculer() {
	// Digest the expected secret once: the fairest version of the page's check.
	const expectedDigest = createHash("sha256").update(process.env.SHARED_SECRET ?? "").digest();

	const PageStyleCheck: Middleware = {
		name: "PageStyleCheck",
		localAction(next: ActionHandler, action: ActionSchema): ActionHandler {
			// The common fix for the page's defects 3 and 8: leave the gateway's own
			// actions and Moleculer's internal ones alone.
			if (action.service?.name === "gateway" || action.name?.startsWith("$")) return next;
			return function pageStyleCheck(
				this: unknown,
				ctx: Context<unknown, { secret?: string }>,
			) {
				const presented = ctx.meta.secret;
				if (!presented) {
					throw new Errors.MoleculerClientError("No secret provided", 401, "NO_SECRET");
				}
				const digest = createHash("sha256").update(presented).digest();
				if (!timingSafeEqual(digest, expectedDigest)) {
					throw new Errors.MoleculerClientError("Invalid secret", 401, "INVALID_SECRET");
				}
				return next.call(this as never, ctx);
			};
		},
	};

	const metricsPort = Number(process.env.METRICS_PORT || 0);
	const broker = new ServiceBroker({
		logLevel: (process.env.LOGLEVEL ?? "warn") as LogLevels,
		middlewares: contender === "page"
			? [PageStyleCheck]
			: contender === "door"
			? [SharedSecretMiddleware({
				secrets: process.env.SHARED_SECRET,
				publicPaths: "GET /health",
			})]
			: [],
		metrics: metricsPort
			? {
				enabled: true,
				reporter: { type: "Prometheus", options: { host: "127.0.0.1", port: metricsPort } },
			}
			: false,
	});

	// What a user has without the template: the same answers, from a service that
	// declares nothing extra (no retries, no hooks).
	broker.createService({
		name: "api",
		actions: {
			protectedAction: () => ({ message: "Access granted" }),
			health: () => ({ status: "ok" }),
		},
	});

	const gateway = broker.createService({
		name: "gateway",
		mixins: [ApiGateway],
		settings: {
			port: Number(process.env.PORT ?? 0),
			routes: [
				{
					path: "/",
					mappingPolicy: "restrict",
					aliases: {
						"GET /api/protected": "api.protectedAction",
						"GET /health": "api.health",
					},
					...(contender === "page" && {
						onBeforeCall(
							ctx: Context<unknown, { secret?: string }>,
							_route: unknown,
							req: IncomingMessage,
						) {
							ctx.meta.secret = req.headers["x-shared-secret"] as string | undefined;
						},
					}),
				},
			],
		},
	});

	if (contender === "emitFloor") {
		wrapEmitWithOneCompare((gateway as unknown as { server: Server }).server);
	}
	await broker.start();
	const { port } = (gateway as unknown as { server: Server }).server.address() as {
		port: number;
	};
	broker.logger.info(`Origin ready at http://localhost:${port}`);
}

// The least the door's approach can do: every request meets one constant-time compare in the
// server's emit, and a refusal is the same 401, written by node:http.
function wrapEmitWithOneCompare(server: Server) {
	const expected = Buffer.alloc(256);
	expected.write(process.env.SHARED_SECRET ?? "");
	const presented = Buffer.alloc(256);
	const body = '{"name":"UnAuthorizedError","message":"Invalid secret","code":401}';
	const emit = server.emit as (this: Server, event: string, ...args: unknown[]) => boolean;
	server.emit = function (this: Server, event: string, ...args: unknown[]) {
		if (event === "request") {
			const [req, res] = args as [IncomingMessage, import("node:http").ServerResponse];
			presented.fill(0);
			presented.write(String(req.headers["x-shared-secret"] ?? ""));
			if (!timingSafeEqual(presented, expected)) {
				res.writeHead(401, { "Content-Type": "application/json" }).end(body);
				return true;
			}
		}
		return emit.call(this, event, ...args);
	} as Server["emit"];
}
