/**
 * The origin: one Moleculer broker with the `api` service behind a moleculer-web
 * gateway, and SharedSecretMiddleware in front of every HTTP request.
 *
 *     npm run setup    # writes .env with a fresh SHARED_SECRET
 *     npm start        # tsx --env-file-if-exists=.env index.ts
 *
 * The same file scales out: with TRANSPORTER set, SERVICES=gateway starts a node
 * that holds the door and the gateway, and SERVICES=api one that holds the
 * service (see "Scaling out" in the README).
 */
import { ServiceBroker, type BrokerOptions, type LogLevels } from "moleculer";
import ApiGateway from "moleculer-web";
import type { Server } from "node:http";
import { SharedSecretMiddleware } from "./middleware.ts";
import { ApiService } from "./service.ts";

// The template's one public route, unless PUBLIC_PATHS says otherwise
// (PUBLIC_PATHS= with nothing after it makes every path need the secret).
process.env.PUBLIC_PATHS ??= "GET /health";

// What this node runs: the gateway, the api service, or both (the default).
const services = (process.env.SERVICES ?? "gateway,api").split(",").map(name => name.trim());
const runsGateway = services.includes("gateway");

// Unset, the broker runs alone. Otherwise TRANSPORTER is Moleculer's own
// transporter string ("TCP", "nats://host:4222", "redis://host:6379", ...). A
// "tcp://host:port/nodeID,..." list names every node, so the multicast
// discovery that plain "TCP" uses is turned off for it.
function readTransporter(value: string | undefined): BrokerOptions["transporter"] {
	if (!value) return undefined;
	if (value.startsWith("tcp://")) return { type: "TCP", options: { urls: value, udpDiscovery: false } };
	// moleculer's types list only the names; its resolver also takes URLs.
	return value as BrokerOptions["transporter"];
}

// METRICS_PORT turns on Moleculer's metrics with its Prometheus reporter:
// request counts and latencies per action, and the door's own counters (which
// secret entry is in use, refusals by reason). That port is NOT behind the
// door, so it listens on 127.0.0.1 unless METRICS_HOST names another address:
// make that a private interface that only your scraper reaches.
const metricsPort = Number(process.env.METRICS_PORT || 0);
const metrics: BrokerOptions["metrics"] = metricsPort
	? {
			enabled: true,
			reporter: { type: "Prometheus", options: { host: process.env.METRICS_HOST || "127.0.0.1", port: metricsPort } }
		}
	: false;

// The middleware reads SHARED_SECRET as the broker is built and stops the
// process with one line if it is missing or weak: nothing below runs then. A
// node without the gateway serves no HTTP and needs no secret.
const broker = new ServiceBroker({
	nodeID: process.env.NODE_ID || undefined,
	logLevel: (process.env.LOGLEVEL ?? "info") as LogLevels,
	transporter: readTransporter(process.env.TRANSPORTER),
	metrics,
	middlewares: runsGateway ? [SharedSecretMiddleware] : [],
	// SIGTERM and SIGINT are handled below, to drain HTTP before the broker stops.
	skipProcessEventRegistration: true
});

if (services.includes("api")) broker.createService(ApiService);

const gateway = runsGateway
	? broker.createService({
			// Not "api", moleculer-web's default name: that is the page's service.
			name: "gateway",
			mixins: [ApiGateway],
			// On a gateway-only node, listen only once `api` can answer from
			// another node. (A local one has started when broker.start() resolves.)
			dependencies: services.includes("api") ? [] : ["api"],
			settings: {
				port: Number(process.env.PORT ?? 3000),
				routes: [
					{
						path: "/",
						// Only the aliases below are served. "restrict" keeps
						// Moleculer's internal actions ($node.list, ~node/...)
						// off HTTP, even for callers that hold the secret.
						// Declared aliases exist as soon as the gateway starts;
						// autoAliases would answer 404 for the first half second.
						mappingPolicy: "restrict",
						aliases: {
							"GET /api/protected": "api.protectedAction",
							// Public: see PUBLIC_PATHS above.
							"GET /health": "api.health"
						}
					}
				]
			}
		})
	: undefined;

// A graceful stop, for deploys: refuse new connections at once, let the
// requests in flight finish with their real answers (the broker stays up, as
// they may wait on other nodes), then stop the broker and exit 0. Keep-alive
// connections are closed as soon as they fall idle; after 8 s, all are.
// Registered before the broker starts, so no signal finds the process without
// a handler; `once`, so a second Ctrl+C ends it at once. (moleculer-web
// creates its HTTP server with the service.)
const server = (gateway as unknown as { server: Server } | undefined)?.server;
async function stop(signal: string) {
	broker.logger.info(`${signal}: refusing new connections, finishing the requests in flight.`);
	if (server?.listening) {
		const closeIdle = setInterval(() => server.closeIdleConnections(), 100);
		const deadline = setTimeout(() => server.closeAllConnections(), 8000);
		await new Promise(resolve => server.close(resolve));
		clearInterval(closeIdle);
		clearTimeout(deadline);
	}
	await broker.stop();
	process.exit(0);
}
process.once("SIGTERM", stop);
process.once("SIGINT", stop);

await broker.start();

// Ready means ready: the broker has started every service, `api` is reachable
// and the gateway is listening, so the first request after this line gets its
// real answer. PORT=0 picks a free port; the address says which.
// The line also names the runtime, as each one reports itself through
// node:process, so you can see which one `deno task start` or `bun run start`
// really started.
const runtime = process.versions.deno ? `Deno ${process.versions.deno}` : process.versions.bun ? `Bun ${process.versions.bun}` : `Node ${process.version}`;
if (server) {
	const { port } = server.address() as { port: number };
	broker.logger.info(`Origin ready at http://localhost:${port} on ${runtime}`);
} else {
	broker.logger.info(`Node ready: ${services.join(", ")} on ${broker.nodeID}, ${runtime}`);
}

/* What a caller sees (with the secret from .env):
 *
 *   $ curl localhost:3000/api/protected -H "x-shared-secret: $SHARED_SECRET"
 *   {"message":"Access granted"}
 *
 *   $ curl localhost:3000/api/protected
 *   {"name":"UnAuthorizedError","message":"No secret provided","code":401,"type":"NO_TOKEN"}
 *
 *   $ curl localhost:3000/api/protected -H "x-shared-secret: wrong"
 *   {"name":"UnAuthorizedError","message":"Invalid secret","code":401,"type":"INVALID_TOKEN"}
 *
 *   $ curl localhost:3000/health
 *   {"status":"ok"}
 */
