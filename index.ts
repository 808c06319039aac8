/**
 * The origin: one Moleculer broker, the door (middleware.ts) in front of a moleculer-web gateway,
 * and the page's `api` service behind it (service.ts). The first block reads every environment
 * variable; then comes the page's promise; below it, the production extras, each a named part.
 */
import { existsSync, readFileSync } from "node:fs";
import { isIP } from "node:net";
import { readFile } from "node:fs/promises";
import type { Server } from "node:http";
import { Errors, ServiceBroker } from "moleculer";
import type { BrokerOptions, Context, Service, ServiceSchema } from "moleculer";
import ApiGateway, { type ApiSettingsSchema } from "moleculer-web";
import { SharedSecretMiddleware } from "./middleware.ts";
import { ApiService, retrySafeActions } from "./service.ts";

// ---- The configuration: README's table and .env.example list the same variables ----------
// Every one is checked here, before anything starts: a value that cannot be used ends the
// process with one line that names its variable and what it accepts.

loadDotEnv();
// What each kind of value accepts, as the error lines say it. The transporters are those that
// Moleculer resolves from a string (its transporters/index.js).
const [ports, seconds] = ["a whole number from 0 to 65535", "whole seconds, 1 or more"];
const LOG_LEVELS = ["fatal", "error", "warn", "info", "debug", "trace"] as const;
const MODES = ["accept", "require"] as const;
const SCHEMES = "nats:// redis:// rediss:// mqtt:// mqtts:// amqp:// amqps:// kafka:// tcp://";
const TRANSPORTERS = [...SCHEMES.split(" "), "NATS", "Redis", "MQTT", "AMQP", "Kafka", "TCP"];
const config = {
	secrets: process.env.SHARED_SECRET || undefined,
	secretFile: process.env.SHARED_SECRET_FILE || undefined,
	// The door's options (middleware.ts), as the variables give them.
	door: {
		// "GET /health" is public unless PUBLIC_PATHS says otherwise; set empty, nothing is.
		publicPaths: process.env.PUBLIC_PATHS ?? "GET /health",
		reportSeconds: checked("SHARED_SECRET_REPORT_SECONDS", wholeNumber(1), seconds),
		quietSeconds: checked("SHARED_SECRET_QUIET_SECONDS", wholeNumber(1), seconds),
		// "accept": signed or with the header; "require": signed only (docs/zuplo.md).
		signatures: checked("SHARED_SECRET_SIGNATURES", oneOf(...MODES), MODES.join(" or ")),
	},
	port: checked("PORT", wholeNumber(0, 65535), `${ports} (0: a free one)`) ?? 3000,
	logLevel: checked("LOGLEVEL", oneOf(...LOG_LEVELS), LOG_LEVELS.join(", ")) ?? "info",
	metricsPort: checked("METRICS_PORT", wholeNumber(0, 65535), `${ports} (0: off)`) ?? 0,
	metricsHost: checked("METRICS_HOST", hostName, "an IP address or a host name") ?? "127.0.0.1",
	transporter: checked("TRANSPORTER", knownTransporter, TRANSPORTERS.join(", ")),
	natsToken: process.env.NATS_TOKEN || undefined,
	nodeID: process.env.NODE_ID || undefined,
	// What this node runs: the gateway, the api service, or both (the default).
	services: checked("SERVICES", serviceNames, "gateway, api or both") ?? ["gateway", "api"],
};
if (config.natsToken && !config.transporter?.startsWith("nats://")) {
	exitWith("NATS_TOKEN is set, but TRANSPORTER is no nats:// URL: the token would go unused.");
}
const runsGateway = config.services.includes("gateway");
const runsApi = config.services.includes("api");

// ---- The page's promise: the door, the broker, the gateway and the api service -------------

// Only a node with the gateway serves HTTP, so only it needs the door and the secret. A missing
// or weak secret ends the process here, with one line: nothing below runs then.
const { door, secretFileContents } = runsGateway ? createDoorOrExit() : {};

const broker = new ServiceBroker({
	nodeID: config.nodeID,
	logLevel: config.logLevel,
	middlewares: [...(door ? [door] : []), ...clusterMiddlewares(config.transporter)],
	metrics: metricsOptions(config.metricsPort),
	// SIGTERM and SIGINT are handled below, to let HTTP drain before the broker stops.
	skipProcessEventRegistration: true,
	...clusterOptions(config.transporter),
});

const gatewaySchema: ServiceSchema<ApiSettingsSchema> = {
	// Not "api", moleculer-web's default name: that is the page's service.
	name: "gateway",
	mixins: [ApiGateway],
	settings: {
		port: config.port,
		routes: [{
			path: "/",
			// Only these aliases are served: "restrict" keeps Moleculer's internal actions
			// ($node.list, ...) off HTTP, even for callers with the secret.
			mappingPolicy: "restrict",
			aliases: {
				"GET /api/protected": "api.protectedAction",
				"GET /api/whoami": "api.whoami",
				"GET /health": "api.health", // public: see publicPaths above
			},
		}],
	},
};

if (runsApi) broker.createService(ApiService);
const gateway = runsGateway ? broker.createService(gatewaySchema) : undefined;
const server = (gateway as { server?: Server } | undefined)?.server; // made with the service

// Before the start, so that no signal or taken port finds the process without its handler.
stopGracefullyOnSignals(server);
server?.prependListener("error", exitIfPortTaken);
if (door && config.secretFile) watchSecretFile(config.secretFile, secretFileContents!, door);
await startOrFailFast(broker);

// Ready means ready: the first request after this line gets its real answer. The line names the
// port (PORT=0 picks a free one) and the runtime you really started.
const { deno, bun } = process.versions as { deno?: string; bun?: string };
const runtime = deno ? `Deno ${deno}` : bun ? `Bun ${bun}` : `Node ${process.version}`;
if (server) {
	const { port } = server.address() as { port: number };
	broker.logger.info(`Origin ready at http://localhost:${port} on ${runtime}`);
} else {
	broker.logger.info(`Node ready: ${config.services.join(", ")} on ${broker.nodeID}, ${runtime}`);
}

// ---- Production extras ---------------------------------------------------------------------

// `tsx index.ts`, `node index.ts`, `bun index.ts` and `deno run index.ts` all read .env from
// the working folder, if there is one. A variable already in the environment wins: Node's and
// Bun's loadEnvFile keep it, and Deno's would overwrite it, so it is put back.
function loadDotEnv(file = ".env") {
	if (!existsSync(file)) return;
	const alreadySet = { ...process.env };
	process.loadEnvFile(file);
	Object.assign(process.env, alreadySet);
}

// The door checks its options at the call, in its own words, and throws one line without the
// value. Here that line names the variable that fed the option. The secret file is read once:
// the door is built from that reading, and the watcher starts from it, so a rotation that lands
// during the start is applied by the watcher's first re-read.
function createDoorOrExit() {
	const secretVariable = config.secretFile ? "SHARED_SECRET_FILE" : "SHARED_SECRET";
	if (config.secrets && config.secretFile) {
		exitWith("Set SHARED_SECRET or SHARED_SECRET_FILE, not both.");
	}
	if (!config.secrets && !config.secretFile) {
		exitWith(
			"Neither SHARED_SECRET nor SHARED_SECRET_FILE is set. Run `npm run setup` to write " +
				".env with a fresh secret, or make one: openssl rand -hex 32",
		);
	}
	const secretFileContents = config.secretFile && readSecretFileOrExit(config.secretFile);
	try {
		const secrets = secretFileContents || config.secrets;
		const door = SharedSecretMiddleware({ secrets, ...config.door });
		return { door, secretFileContents };
	} catch (error) {
		const message = (error as Error).message;
		const variable = message.includes("publicPaths") ? "PUBLIC_PATHS" : secretVariable;
		exitWith(`${variable}: ${message.replace("SharedSecretMiddleware: ", "")}`);
	}
}

// A port that cannot be had ends the start with one line: moleculer-web's own has a stack trace.
function exitIfPortTaken(error: NodeJS.ErrnoException) {
	if (error.code === "EADDRINUSE") {
		exitWith(`PORT ${config.port} is in use: set PORT to a free one.`);
	}
	if (error.code === "EACCES") exitWith(`PORT ${config.port} is not this process's to use.`);
}

// The process's last line, with exit 1 for a supervisor to see: no stack trace, no ready line.
function exitWith(line: string): never {
	console.error(`[${new Date().toISOString()}] FATAL origin: ${line}`);
	process.exit(1);
}

// ---- The configuration, checked: each check names its variable and what it accepts ---------

// Reads one variable: unset or empty gives the default. A value that `parse` turns down ends the
// start, with the value in the line, except TRANSPORTER's: its URL may hold a password.
function checked<T>(name: string, parse: (text: string) => T | undefined, accepts: string) {
	const text = process.env[name];
	if (!text) return undefined;
	const value = parse(text);
	if (value !== undefined) return value;
	const holds = name === "TRANSPORTER" ? "cannot be used" : `is "${text}"`;
	exitWith(`${name} ${holds}; it needs ${accepts}.`);
}

function wholeNumber(min: number, max = Infinity) {
	const inRange = (text: string) => /^\d+$/.test(text) && +text >= min && +text <= max;
	return (text: string) => (inRange(text) ? Number(text) : undefined);
}

function oneOf<T extends string>(...allowed: T[]) {
	return (text: string) => allowed.find((each) => each === text);
}

function hostName(text: string) {
	const isHostName = /^[A-Za-z0-9]([A-Za-z0-9.-]*[A-Za-z0-9])?$/.test(text);
	return isIP(text) || isHostName ? text : undefined;
}

function serviceNames(text: string) {
	const names = text.split(",").map((name) => name.trim());
	return names.every((name) => name === "gateway" || name === "api") ? names : undefined;
}

function knownTransporter(text: string) {
	const isScheme = TRANSPORTERS.some((known) => known.endsWith("://") && text.startsWith(known));
	return isScheme || TRANSPORTERS.includes(text) ? text : undefined;
}

// ---- The secret file: rotation without a restart (docs/rotating-the-secret.md) ------------

// A file's trailing newline is not part of the secret. A read error names the file and the
// error's code (Deno's NotCapable, a missing permission, has only a name), never the contents.
function readSecretFileOrExit(path: string): string {
	try {
		return readFileSync(path, "utf8").trimEnd();
	} catch (error) {
		const why = (error as NodeJS.ErrnoException).code ?? (error as Error).name;
		exitWith(`SHARED_SECRET_FILE ${path} cannot be read (${why}).`);
	}
}

// The watching lives here, not in the door: the door reads no file, so a project with a vault
// hands it secrets with setSecrets. The file is read every second and on SIGHUP, which costs no
// work per request and sees every change alike: an editor's rewrite, or Kubernetes pointing its
// `..data` link at a new folder. A change is applied once it has settled: two reads 250 ms apart
// agree, so a rotation written in two steps is never applied half done. A bad or missing file
// keeps the secrets, with one line for each.
function watchSecretFile(path: string, applied: string, door: { setSecrets(s: unknown): void }) {
	const SETTLE_MS = 250;
	let lastSeen: string | void = applied;
	let reading = false; // One re-read at a time: the timer's and SIGHUP's would overlap.
	const read = () => readFile(path, "utf8").then((text) => text.trimEnd(), () => {});
	async function reread() {
		if (reading) return;
		reading = true;
		try {
			const first = await read();
			if (first === lastSeen) return;
			await new Promise((resolve) => setTimeout(resolve, SETTLE_MS));
			// Not settled yet: the next re-read tries again.
			if ((await read()) !== first) return;
			lastSeen = first;
			if (first === undefined) throw new Error("the file is gone.");
			door.setSecrets(first);
		} catch (error) {
			const why = (error as Error).message;
			broker.logger.warn(`SHARED_SECRET_FILE ${path}: the door keeps its secrets: ${why}`);
		} finally {
			reading = false;
		}
	}
	setInterval(reread, 1000).unref();
	process.on("SIGHUP", reread);
}

// ---- The cluster (docs/scaling-out.md): unset TRANSPORTER, the broker runs alone -----------

// TRANSPORTER is Moleculer's transporter string ("nats://host:4222", "redis://...", "TCP").
// These defaults lose no request when an api node is killed or restarted, or NATS is down for
// a few seconds: test/cluster.test.ts injects each fault, and docs/scaling-out.md says why each.
function clusterOptions(url: string | undefined): Partial<BrokerOptions> {
	if (!url) return {};
	return {
		transporter: readTransporter(url),
		requestTimeout: 500,
		// Only the actions clusterMiddlewares() marks are retried: a write may have run already.
		retryPolicy: { enabled: false, retries: 5, delay: 100, maxDelay: 1000, factor: 2 },
		disableBalancer: url.startsWith("nats://"),
		heartbeatInterval: 2,
		heartbeatTimeout: 6,
		// Moleculer's types omit this option.
		transit: { serviceChangedDebounceTime: 0 } as BrokerOptions["transit"],
		tracking: { enabled: true, shutdownTimeout: 5000 },
	};
}

// A "tcp://host:port/nodeID,..." list names every node, so the UDP discovery of plain "TCP" is
// off. A NATS token goes in NATS_TOKEN: in the URL, moleculer would read it as a user name.
function readTransporter(url: string): BrokerOptions["transporter"] {
	if (url.startsWith("tcp://")) {
		return { type: "TCP", options: { urls: url, udpDiscovery: false } };
	}
	if (!url.startsWith("nats://")) return url as BrokerOptions["transporter"];
	return { type: "NATS", options: { url, token: config.natsToken, reconnectTimeWait: 500 } };
}

// In a cluster, the services change as they are created. A call lost with a dying node is retried
// on another, for the actions that service.ts lists. A gateway-only node listens once `api` can
// answer from another node, and answers 503 when no api node is left.
function clusterMiddlewares(url: string | undefined) {
	if (!url) return [];
	function serviceCreating(_service: Service, schema: ServiceSchema) {
		if (schema.name === "api") {
			const actions = { ...schema.actions } as Record<string, object>;
			for (const name of retrySafeActions) {
				const action = actions[name] as object | (() => unknown);
				const asObject = typeof action === "function" ? { handler: action } : action;
				actions[name] = { ...asObject, retryPolicy: { enabled: true } };
			}
			schema.actions = actions;
		} else if (schema.name === "gateway") {
			schema.dependencies = runsApi ? [] : ["api"];
			schema.hooks = { ...schema.hooks, error: { rest: waitForApiOr503 } };
		}
	}
	return [{ serviceCreating }];
}

type Waited = { waitedForApi?: boolean };
type Meta = { $responseHeaders?: Record<string, string> };

// With no api node known, Moleculer's "service not available" becomes moleculer-web's 404. This
// waits up to 2 s for one and routes the request again, once; else a 503 with Retry-After,
// which a load balancer reads as "try another origin, or again shortly".
async function waitForApiOr503(this: Service, ctx: Context<Waited, Meta>, error: Error) {
	const noApi = error instanceof Errors.ServiceNotAvailableError ||
		error instanceof Errors.ServiceNotFoundError;
	if (!noApi) throw error;
	if (!ctx.params.waitedForApi) {
		ctx.params.waitedForApi = true;
		const apiIsBack = this.broker.waitForServices("api", 2000).then(() => true, () => false);
		if (await apiIsBack) return this.actions.rest(ctx.params, { parentCtx: ctx });
	}
	ctx.meta.$responseHeaders = { "Retry-After": "1" };
	const message = "No api node is available; try again shortly.";
	throw new Errors.MoleculerServerError(message, 503, "SERVICE_UNAVAILABLE");
}

// Moleculer retries a transporter it cannot reach forever, and a gateway node would never
// listen. A credentials error ends the node at once, any other after 30 s from the process's
// start. One line, without the password or token, and exit 1. (On Deno, the NATS client can
// also throw an uncaught socket error while refused: until connected, that ends it the same way.)
async function startOrFailFast(broker: ServiceBroker) {
	const deadline = config.transporter ? failFastUntilJoined(config.transporter) : undefined;
	await broker.start();
	clearTimeout(deadline);
}

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
	for (const secret of [config.natsToken, URL.parse(url)?.password]) {
		if (secret) safe = safe.replaceAll(secret, "***");
	}
	return safe;
}

// ---- Metrics and the graceful stop ---------------------------------------------------------

// METRICS_PORT turns on Moleculer's Prometheus reporter, the door's counters included. That port
// is NOT behind the door, so it listens on 127.0.0.1 unless METRICS_HOST names another address.
function metricsOptions(port: number): BrokerOptions["metrics"] {
	if (!port) return false;
	const reporter = { type: "Prometheus" as const, options: { host: config.metricsHost, port } };
	return { enabled: true, reporter };
}

// For deploys: refuse new connections at once, let the requests in flight finish with their
// real answers (the broker stays up, as they may wait on other nodes), then stop the broker and
// exit 0. Idle keep-alive connections close at once; after 8 s, all do. Ctrl+C reaches npm, tsx
// and Node alike, and each may pass it on again, so a repeat within a second is the same press;
// a press after that ends the process at once.
function stopGracefullyOnSignals(server: Server | undefined) {
	let stoppingSince = 0;
	async function stop(signal: string) {
		if (stoppingSince) {
			if (Date.now() - stoppingSince > 1000) process.exit(130);
			return;
		}
		stoppingSince = Date.now();
		broker.logger.info(`${signal}: refusing new connections, finishing those in flight.`);
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
