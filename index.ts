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
import { Errors, ServiceBroker, type BrokerOptions, type Context, type LogLevels, type Service } from "moleculer";
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
// transporter string ("nats://host:4222", "redis://host:6379", "TCP", ...).
// A "tcp://host:port/nodeID,..." list names every node, so the multicast
// discovery that plain "TCP" uses is turned off for it. For NATS, a user and
// password go in the URL (nats://user:password@host:4222) and a token in
// NATS_TOKEN (in the URL, moleculer would read it as a user name); NATS retries
// a lost connection every 500 ms, so a restarted server is back within a second.
const transporterUrl = process.env.TRANSPORTER;
function readTransporter(value: string | undefined): BrokerOptions["transporter"] {
	if (!value) return undefined;
	if (value.startsWith("tcp://")) return { type: "TCP", options: { urls: value, udpDiscovery: false } };
	if (value.startsWith("nats://")) {
		return { type: "NATS", options: { url: value, token: process.env.NATS_TOKEN || undefined, reconnectTimeWait: 500 } };
	}
	// moleculer's types list only the names; its resolver also takes URLs.
	return value as BrokerOptions["transporter"];
}

// In a cluster, a call can be lost: its node dies mid-call, or NATS restarts.
// These defaults lose no request when an api node is killed or restarted or
// NATS is down for a few seconds (test/cluster.test.ts injects each fault;
// the README has the table). Starting points: measure them for your services.
const cluster: Partial<BrokerOptions> = transporterUrl
	? {
			// A call with no answer in 500 ms fails with a retryable
			// RequestTimeoutError instead of waiting forever. An action that
			// is slower by design sets its own `timeout`.
			requestTimeout: 500,
			// Retried 5 times, 100 ms to 1 s apart: about 5 s in all with the
			// timeouts, longer than a NATS restart. Only actions that declare
			// `retryPolicy: { enabled: true }` are retried (the api service's
			// GETs do): a call that changes something may have run already.
			retryPolicy: { enabled: false, retries: 5, delay: 100, maxDelay: 1000, factor: 2 },
			// A retry goes through a NATS queue group, which only reaches
			// nodes that are connected, not back to the dead one.
			disableBalancer: transporterUrl.startsWith("nats://"),
			// A node that vanishes without a goodbye (kill -9) is dropped after
			// 6 s, not Moleculer's 30 s (keep it above NATS's failover time).
			heartbeatInterval: 2,
			heartbeatTimeout: 6,
			// An api node announces its services at once, so its "Node ready"
			// means gateways can route to it (Moleculer waits 1 s by default).
			// (moleculer's types do not list this option of its own.)
			transit: { serviceChangedDebounceTime: 0 } as BrokerOptions["transit"],
			// On stop, the requests in flight finish (up to 5 s) before the
			// node leaves the cluster.
			tracking: { enabled: true, shutdownTimeout: 5000 }
		}
	: {};

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
	transporter: readTransporter(transporterUrl),
	...cluster,
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
			hooks: {
				error: {
					// No api node known: Moleculer says "service not available",
					// which moleculer-web would send as a 404. A gateway can
					// know none for a moment (a rolling restart, a restarted
					// node's announcement still on its way), so it waits up to
					// 2 s for one and routes the request again, once. If none
					// comes, a 503 with Retry-After, which a load balancer reads
					// as "try another origin, or again shortly".
					async rest(this: Service, ctx: Context<GatewayParams, ResponseMeta>, error: Error) {
						if (!(error instanceof Errors.ServiceNotAvailableError || error instanceof Errors.ServiceNotFoundError)) throw error;
						if (!ctx.params.waitedForApi) {
							ctx.params.waitedForApi = true;
							const apiIsBack = await this.broker.waitForServices("api", 2000).then(() => true, () => false);
							if (apiIsBack) return this.actions.rest(ctx.params, { parentCtx: ctx });
						}
						ctx.meta.$responseHeaders = { "Retry-After": "1" };
						throw new Errors.MoleculerServerError("No api node is available; try again shortly.", 503, "SERVICE_UNAVAILABLE");
					}
				}
			},
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
							"GET /api/whoami": "api.whoami",
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

// Fail fast: Moleculer retries a transporter it cannot reach forever, and a
// gateway node would never listen. A node that has not connected in 30 s (host
// unreachable, credentials wrong) says why in one line, without the password
// or token, and exits 1 for its supervisor to see. (Connected, it may wait on
// for `api` as long as it takes.) On Deno, the NATS client can also throw an
// uncaught socket error while refused; until it has connected, that ends the
// node the same way. Any other uncaught error is left as it is.
const JOIN_SECONDS = 30;
let lastTransporterError = "no answer";
function failToJoin(reason: string): never {
	broker.logger.fatal(`Cannot join the cluster at ${withoutCredentials(transporterUrl!)}: ${withoutCredentials(reason)}`);
	process.exit(1);
}
const joinFailed = (error: Error) => {
	if (broker.transit?.connected) throw error;
	failToJoin(lastTransporterError === "no answer" ? error.message : lastTransporterError);
};
if (transporterUrl) {
	broker.localBus.on("$transporter.error", ({ error }: { error?: Error }) => (lastTransporterError = error?.message ?? lastTransporterError));
	process.on("uncaughtException", joinFailed);
}
const joinDeadline = transporterUrl
	? setTimeout(() => broker.transit?.connected || failToJoin(`${lastTransporterError} (not connected after ${JOIN_SECONDS} s)`), JOIN_SECONDS * 1000)
	: undefined;

await broker.start();
clearTimeout(joinDeadline);
process.off("uncaughtException", joinFailed);

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

type GatewayParams = { waitedForApi?: boolean };
type ResponseMeta = { $responseHeaders?: Record<string, string> };

function withoutCredentials(text: string): string {
	let safe = text.replace(/\/\/[^/@\s]*@/g, "//***@");
	for (const secret of [process.env.NATS_TOKEN, transporterUrl && URL.parse(transporterUrl)?.password]) {
		if (secret) safe = safe.replaceAll(secret, "***");
	}
	return safe;
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
 *   $ curl localhost:3000/api/whoami -H "x-shared-secret: $SHARED_SECRET" -H "x-consumer: acme-corp"
 *   {"consumer":"acme-corp"}
 *
 *   $ curl localhost:3000/health
 *   {"status":"ok"}
 */
