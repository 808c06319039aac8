/**
 * The origin: one Moleculer broker, the door (middleware.ts) in front of a moleculer-web
 * gateway, and the page's `api` service behind it (service.ts).
 *
 *     npm run setup    # writes .env with a fresh SHARED_SECRET
 *     npm start        # or: tsx index.ts, node index.ts, bun index.ts, deno task start
 *
 * The first screen is the page's promise. Below it, the production extras, each a named
 * function: .env, the cluster, metrics, the graceful stop and the fail-fast join.
 */
import { existsSync } from "node:fs";
import type { Server } from "node:http";
import { Errors, type LogLevels, ServiceBroker } from "moleculer";
import type { BrokerOptions, Context, Service } from "moleculer";
import ApiGateway from "moleculer-web";
import { SharedSecretMiddleware } from "./middleware.ts";
import { ApiService, retrySafeActions } from "./service.ts";

loadDotEnv();
// The template's one public route, unless PUBLIC_PATHS says otherwise (PUBLIC_PATHS= with
// nothing after it makes every path need the secret).
process.env.PUBLIC_PATHS ??= "GET /health";
// What this node runs: the gateway, the api service, or both (the default). Only a node
// with the gateway serves HTTP, so only it needs the door and SHARED_SECRET.
const services = (process.env.SERVICES ?? "gateway,api").split(",").map((name) => name.trim());
const [runsGateway, runsApi] = [services.includes("gateway"), services.includes("api")];
const transporterUrl = process.env.TRANSPORTER;

// The door reads SHARED_SECRET as the broker is built, and stops the process with one line
// if it is missing or weak: nothing below runs then.
const broker = new ServiceBroker({
	nodeID: process.env.NODE_ID || undefined,
	logLevel: (process.env.LOGLEVEL ?? "info") as LogLevels,
	middlewares: runsGateway ? [SharedSecretMiddleware] : [],
	...clusterOptions(transporterUrl),
	metrics: metricsOptions(Number(process.env.METRICS_PORT || 0)),
	// SIGTERM and SIGINT are handled below, to let HTTP drain before the broker stops.
	skipProcessEventRegistration: true,
});

if (runsApi) broker.createService(transporterUrl ? withRetries(ApiService) : ApiService);

const gateway = runsGateway
	? broker.createService({
		// Not "api", moleculer-web's default name: that is the page's service.
		name: "gateway",
		mixins: [ApiGateway],
		// On a gateway-only node, listen only once `api` can answer from another node.
		dependencies: runsApi ? [] : ["api"],
		// In a cluster only: nothing of it wraps a request on a broker that runs alone.
		hooks: transporterUrl ? { error: { rest: waitForApiOr503 } } : {},
		settings: {
			port: Number(process.env.PORT ?? 3000),
			routes: [{
				path: "/",
				// Only these aliases are served: "restrict" keeps Moleculer's internal
				// actions ($node.list, ...) off HTTP, even for callers with the secret.
				// Declared aliases exist at once; autoAliases would 404 for a moment.
				mappingPolicy: "restrict",
				aliases: {
					"GET /api/protected": "api.protectedAction",
					"GET /api/whoami": "api.whoami",
					"GET /health": "api.health", // public: see PUBLIC_PATHS above
				},
			}],
		},
	})
	: undefined;
const server = (gateway as { server?: Server } | undefined)?.server; // made with the service

// Before the start, so that no signal finds the process without its handler.
stopGracefullyOnSignals(server);
const joinDeadline = transporterUrl ? failFastUntilJoined(transporterUrl) : undefined;
await broker.start();
clearTimeout(joinDeadline);

// Ready means ready: every service has started, `api` is reachable and the gateway
// listens, so the first request after this line gets its real answer. PORT=0 picks a
// free port; the line says which, and which runtime you really started.
const { deno, bun } = process.versions as { deno?: string; bun?: string };
const runtime = deno ? `Deno ${deno}` : bun ? `Bun ${bun}` : `Node ${process.version}`;
if (server) {
	const { port } = server.address() as { port: number };
	broker.logger.info(`Origin ready at http://localhost:${port} on ${runtime}`);
} else {
	broker.logger.info(`Node ready: ${services.join(", ")} on ${broker.nodeID}, ${runtime}`);
}

// ---- Production extras ------------------------------------------------------------------

// `tsx index.ts`, `node index.ts`, `bun index.ts` and `deno run index.ts` all read .env
// from the working folder, if there is one. A variable already in the environment wins:
// Node's and Bun's loadEnvFile keep it, Deno's would overwrite it, so it is put back.
function loadDotEnv(file = ".env") {
	if (!existsSync(file)) return;
	const alreadySet = { ...process.env };
	process.loadEnvFile(file);
	Object.assign(process.env, alreadySet);
}

// Unset, the broker runs alone. Otherwise TRANSPORTER is Moleculer's transporter string
// ("nats://host:4222", "redis://...", "TCP", ...). The defaults below lose no request when
// an api node is killed or restarted, or NATS is down for a few seconds
// (test/cluster.test.ts injects each fault; docs/scaling-out.md has the numbers).
function clusterOptions(url: string | undefined): Partial<BrokerOptions> {
	if (!url) return {};
	return {
		transporter: readTransporter(url),
		// A call with no answer in 500 ms fails with a retryable timeout instead of
		// waiting forever. An action that is slower by design sets its own `timeout`.
		requestTimeout: 500,
		// Retried 5 times, 100 ms to 1 s apart: about 5 s, longer than a NATS restart.
		// Only the actions withRetries() marks are retried: a write may have run already.
		retryPolicy: { enabled: false, retries: 5, delay: 100, maxDelay: 1000, factor: 2 },
		// A retry through a NATS queue group reaches only connected nodes, never the dead one.
		disableBalancer: url.startsWith("nats://"),
		// A node that vanishes without a goodbye (kill -9) is dropped after 6 s, not 30 s
		// (keep it above NATS's failover time).
		heartbeatInterval: 2,
		heartbeatTimeout: 6,
		// A node announces its services at once, so its "Node ready" means gateways can
		// route to it (Moleculer waits 1 s; its types omit this option).
		transit: { serviceChangedDebounceTime: 0 } as BrokerOptions["transit"],
		// On stop, the calls in flight finish (up to 5 s) before the node leaves.
		tracking: { enabled: true, shutdownTimeout: 5000 },
	};
}

// A "tcp://host:port/nodeID,..." list names every node, so the UDP discovery that plain
// "TCP" uses is off. NATS: a user and password go in the URL, a token in NATS_TOKEN (in the
// URL moleculer reads it as a user), and a lost server is retried every 500 ms.
function readTransporter(url: string): BrokerOptions["transporter"] {
	if (url.startsWith("tcp://")) {
		return { type: "TCP", options: { urls: url, udpDiscovery: false } };
	}
	if (!url.startsWith("nats://")) return url as BrokerOptions["transporter"];
	const token = process.env.NATS_TOKEN || undefined;
	return { type: "NATS", options: { url, token, reconnectTimeWait: 500 } };
}

// In a cluster, a call lost with a dying node is retried on another, for the actions that
// service.ts lists as safe to run twice.
function withRetries(schema: typeof ApiService): typeof ApiService {
	const actions = { ...schema.actions } as Record<string, object>;
	for (const name of retrySafeActions) {
		const action = typeof actions[name] === "function"
			? { handler: actions[name] }
			: actions[name];
		actions[name] = { ...action, retryPolicy: { enabled: true } };
	}
	return { ...schema, actions };
}

// No api node known (a rolling restart, a restarted node's announcement on its way):
// Moleculer says "service not available", which moleculer-web sends as a 404. Wait up to
// 2 s for one and route the request again, once; else a 503 with Retry-After, which a load
// balancer reads as "try another origin, or again shortly".
async function waitForApiOr503(this: Service, ctx: Context<RetryParams, Meta>, error: Error) {
	const noApi = error instanceof Errors.ServiceNotAvailableError ||
		error instanceof Errors.ServiceNotFoundError;
	if (!noApi) throw error;
	if (!ctx.params.waitedForApi) {
		ctx.params.waitedForApi = true;
		const apiIsBack = await this.broker.waitForServices("api", 2000).then(
			() => true,
			() => false,
		);
		if (apiIsBack) return this.actions.rest(ctx.params, { parentCtx: ctx });
	}
	ctx.meta.$responseHeaders = { "Retry-After": "1" };
	const message = "No api node is available; try again shortly.";
	throw new Errors.MoleculerServerError(message, 503, "SERVICE_UNAVAILABLE");
}
type RetryParams = { waitedForApi?: boolean };
type Meta = { $responseHeaders?: Record<string, string> };

// METRICS_PORT turns on Moleculer's Prometheus reporter, the door's counters included.
// That port is NOT behind the door, so it listens on 127.0.0.1 unless METRICS_HOST names
// another address (docs/rotation-and-metrics.md).
function metricsOptions(port: number): BrokerOptions["metrics"] {
	if (!port) return false;
	const host = process.env.METRICS_HOST || "127.0.0.1";
	return { enabled: true, reporter: { type: "Prometheus", options: { host, port } } };
}

// A graceful stop, for deploys: refuse new connections at once, let the requests in flight
// finish with their real answers (the broker stays up, as they may wait on other nodes),
// then stop the broker and exit 0. Idle keep-alive connections close at once; after 8 s,
// all do. Ctrl+C reaches npm, tsx and Node alike, and each may pass it on again, so a
// repeat within a second is the same press; a press after that ends the process at once.
function stopGracefullyOnSignals(server: Server | undefined) {
	let stoppingSince = 0;
	async function stop(signal: string) {
		if (stoppingSince) {
			if (Date.now() - stoppingSince > 1000) process.exit(130);
			return;
		}
		stoppingSince = Date.now();
		broker.logger.info(
			`${signal}: refusing new connections, finishing the requests in flight.`,
		);
		if (server?.listening) {
			const closeIdle = setInterval(() => server.closeIdleConnections(), 100);
			const deadline = setTimeout(() => server.closeAllConnections(), 8000);
			await new Promise((resolve) => server.close(resolve));
			clearInterval(closeIdle);
			clearTimeout(deadline);
		}
		await broker.stop();
		process.exit(0);
	}
	process.on("SIGTERM", stop);
	process.on("SIGINT", stop);
}

// Fail fast: Moleculer retries a transporter it cannot reach forever, and a gateway node
// would never listen. A credentials error ends the node at once; any other, if it has not
// connected within 30 s of the process starting. One line, without the password or token,
// and exit 1 for a supervisor to see. (On Deno, the NATS client can also throw an uncaught
// socket error while refused: until connected, that ends the node the same way.)
function failFastUntilJoined(url: string): ReturnType<typeof setTimeout> {
	const joinSeconds = 30;
	let lastError = "no answer";
	const fail = (reason: string): never => {
		const safe = (text: string) => withoutCredentials(text, url);
		broker.logger.fatal(`Cannot join the cluster at ${safe(url)}: ${safe(reason)}`);
		process.exit(1);
	};
	broker.localBus.on("$transporter.error", ({ error }: { error?: Error }) => {
		lastError = error?.message ?? lastError;
		if (/authori[sz]ation|authentication|NOAUTH|WRONGPASS/i.test(lastError)) fail(lastError);
	});
	const uncaught = (error: Error) => {
		if (broker.transit?.connected) throw error;
		fail(lastError === "no answer" ? error.message : lastError);
	};
	process.on("uncaughtException", uncaught);
	broker.localBus.on("$transporter.connected", () => process.off("uncaughtException", uncaught));
	const left = Math.max(0, joinSeconds - process.uptime()) * 1000;
	const notJoined = () => fail(`${lastError} (not connected within ${joinSeconds} s)`);
	return setTimeout(() => broker.transit?.connected || notJoined(), left);
}

function withoutCredentials(text: string, url: string): string {
	let safe = text.replace(/\/\/[^/@\s]*@/g, "//***@");
	for (const secret of [process.env.NATS_TOKEN, URL.parse(url)?.password]) {
		if (secret) safe = safe.replaceAll(secret, "***");
	}
	return safe;
}
