/**
 * middleware.ts copied alone into another project: another broker, another
 * gateway name, another route and service, a route that copies the headers
 * into ctx.meta. The door must hold there too, and stay out of internal calls.
 */
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import type { IncomingMessage, Server } from "node:http";
import {
	type BrokerOptions,
	type Context,
	Errors,
	ServiceBroker,
	type ServiceSchema,
} from "moleculer";
import ApiGateway from "moleculer-web";
import { SharedSecretMiddleware } from "../middleware.ts";
import { readFileSync } from "node:fs";
import { join } from "node:path";
import { OLD_SECRET, projectRoot, SECRET } from "./origin.ts";

let broker: ServiceBroker;
let base: string;
const eventsSeen: unknown[] = [];

before(async () => {
	const door = SharedSecretMiddleware({
		secrets: SECRET,
		publicPaths: "GET /v2/status,GET /v2/public-meta",
	});
	broker = new ServiceBroker({ logger: false, middlewares: [door] });

	broker.createService({
		name: "orders",
		actions: {
			list: () => [{ id: 1 }],
			status: () => "up",
			// Shows what a service receives in ctx.meta.
			whatDoISee: (ctx: Context) => ctx.meta,
		},
		events: {
			"order.created"(ctx: Context) {
				eventsSeen.push(ctx.params);
			},
		},
	});

	const gateway = broker.createService({
		name: "edge",
		mixins: [ApiGateway],
		settings: {
			port: 0,
			ip: "127.0.0.1",
			routes: [
				{
					path: "/v2",
					mappingPolicy: "restrict",
					aliases: {
						"GET /orders": "orders.list",
						"POST /orders": "orders.list",
						"GET /status": "orders.status",
						"GET /meta": "orders.whatDoISee",
						"GET /public-meta": "orders.whatDoISee",
					},
					// Parses JSON bodies: a malformed one gets 400 once parsing runs.
					bodyParsers: { json: true },
					// A common pattern: hand every request header to the services, in
					// every form Node offers them.
					onBeforeCall(
						ctx: Context<unknown, Record<string, unknown>>,
						_route: unknown,
						req: IncomingMessage,
					) {
						ctx.meta.headers = req.headers;
						ctx.meta.rawHeaders = req.rawHeaders;
						ctx.meta.headersDistinct = req.headersDistinct;
					},
				},
			],
		},
	});
	await broker.start();
	const { port } = (gateway as unknown as { server: Server }).server.address() as {
		port: number;
	};
	base = `http://127.0.0.1:${port}`;
});

after(() => broker.stop());

test("the right secret passes on another gateway's route", async () => {
	const response = await fetch(`${base}/v2/orders`, { headers: { "x-shared-secret": SECRET } });
	assert.equal(response.status, 200);
	assert.deepEqual(await response.json(), [{ id: 1 }]);
});

test("no secret and a wrong one are refused there too", async () => {
	const missing = await fetch(`${base}/v2/orders`);
	assert.equal(missing.status, 401);
	assert.equal((await missing.json()).message, "No secret provided");
	const wrong = await fetch(`${base}/v2/orders`, {
		headers: { "x-shared-secret": `${SECRET}!` },
	});
	assert.equal(wrong.status, 401);
	assert.equal((await wrong.json()).message, "Invalid secret");
});

test("the secret is checked before the body is parsed", async () => {
	const malformed = {
		method: "POST",
		headers: { "content-type": "application/json" },
		body: "{not json",
	};
	const withoutSecret = await fetch(`${base}/v2/orders`, malformed);
	assert.equal(withoutSecret.status, 401);
	// With the secret, the same request reaches the parser, which refuses it.
	const withSecret = await fetch(`${base}/v2/orders`, {
		...malformed,
		headers: { ...malformed.headers, "x-shared-secret": SECRET },
	});
	assert.equal(withSecret.status, 400);
});

test("its own public path is public, and the template's /health is not", async () => {
	assert.equal((await fetch(`${base}/v2/status`)).status, 200);
	assert.equal((await fetch(`${base}/health`)).status, 401);
});

test("services and route hooks never see the secret in req.headers, rawHeaders or headersDistinct", async () => {
	// Sent as "X-Shared-Secret": rawHeaders keeps the case the caller used.
	const response = await fetch(`${base}/v2/meta`, {
		headers: { "X-Shared-Secret": SECRET, "x-trace": "kept" },
	});
	assert.equal(response.status, 200);
	const meta = await response.json();
	assert.equal(meta.headers["x-trace"], "kept", "the route did copy the headers");
	assert.ok(meta.rawHeaders.includes("kept"), "the route did copy the raw headers");
	assert.equal("x-shared-secret" in meta.headers, false);
	assert.ok(!JSON.stringify(meta).includes(SECRET));
});

test("with the secret, the gateway's x-consumer reaches services as ctx.meta.consumer, and no header copy of it", async () => {
	const response = await fetch(`${base}/v2/meta`, {
		headers: { "x-shared-secret": SECRET, "x-consumer": "acme-corp" },
	});
	const meta = await response.json();
	assert.equal(meta.consumer, "acme-corp");
	assert.equal("user" in meta, false, "ctx.meta.user is left to the app's own auth");
	assert.equal(
		"x-consumer" in meta.headers,
		false,
		"the header itself is wiped, so only the door's word reaches services",
	);
	assert.equal(
		JSON.stringify(meta).split("acme-corp").length,
		2,
		"only ctx.meta.consumer holds it",
	);
	// With the secret and no consumer header: let through, no consumer.
	const anonymous =
		await (await fetch(`${base}/v2/meta`, { headers: { "x-shared-secret": SECRET } })).json();
	assert.equal("consumer" in anonymous, false);
});

test("without the secret, a forged x-consumer never reaches a service, not even on a public path", async () => {
	const publicMeta =
		await (await fetch(`${base}/v2/public-meta`, { headers: { "x-consumer": "mallory" } }))
			.json();
	assert.equal("consumer" in publicMeta, false);
	assert.equal("x-consumer" in publicMeta.headers, false);
	assert.ok(!JSON.stringify(publicMeta).includes("mallory"));
	const refused = await fetch(`${base}/v2/meta`, {
		headers: { "x-shared-secret": "wrong", "x-consumer": "mallory" },
	});
	assert.equal(refused.status, 401);
});

test("calls and events inside the broker carry no headers and are not affected", async () => {
	assert.deepEqual(await broker.call("orders.list"), [{ id: 1 }]);
	await broker.emit("order.created", { id: 2 });
	await new Promise((resolve) => setImmediate(resolve));
	assert.deepEqual(eventsSeen, [{ id: 2 }]);
});

/** Another broker with the middleware and one gateway route, for the tests below. */
async function startGateway(
	brokerOptions: BrokerOptions,
	gatewaySettings: Record<string, unknown>,
	actions: ServiceSchema["actions"],
) {
	const other = new ServiceBroker({
		logger: false,
		...brokerOptions,
		middlewares: [SharedSecretMiddleware({ secrets: SECRET, publicPaths: "GET /v2/status" })],
	});
	other.createService({ name: "jobs", actions });
	const gateway = other.createService({
		name: "edge",
		mixins: [ApiGateway],
		settings: {
			port: 0,
			ip: "127.0.0.1",
			routes: [{ path: "/", aliases: { "GET /run": "jobs.run" } }],
			...gatewaySettings,
		},
	});
	await other.start();
	const { port } = (gateway as unknown as { server: Server }).server.address() as {
		port: number;
	};
	return { broker: other, url: `http://127.0.0.1:${port}/run` };
}

test("under a broker retryPolicy, the right secret gets the service's own error on every attempt, never a 401", async () => {
	let attempts = 0;
	const { broker: other, url } = await startGateway(
		{ retryPolicy: { enabled: true, retries: 2, delay: 10 } },
		{},
		{
			run() {
				attempts++;
				throw new Errors.MoleculerRetryableError("busy, try again", 503, "BUSY");
			},
		},
	);
	try {
		const response = await fetch(url, { headers: { "x-shared-secret": SECRET } });
		assert.equal(response.status, 503);
		assert.equal((await response.json()).type, "BUSY");
		// The broker retries jobs.run twice, then retries the gateway's `rest`
		// twice, and each attempt of `rest` calls jobs.run three times: 3 × 3.
		assert.equal(attempts, 9, "every attempt of the gateway's rest passed the door");

		attempts = 0;
		const wrong = await fetch(url, { headers: { "x-shared-secret": OLD_SECRET } });
		assert.equal(wrong.status, 401);
		assert.equal(attempts, 0, "a refused request never reaches the service, on any attempt");
	} finally {
		await other.stop();
	}
});

test("a gateway-wide onError sees each refusal, and what it changes stays with that request", async () => {
	const { broker: other, url } = await startGateway(
		{},
		{
			onError(
				_req: unknown,
				res: import("node:http").ServerResponse,
				error: Error & { code: number },
			) {
				const first = error.message;
				// A careless onError that changes the error it was handed.
				error.message = `changed: ${error.message}`;
				res.writeHead(error.code, { "Content-Type": "text/plain" });
				res.end(`custom ${first}`);
			},
		},
		{ run: () => "ran" },
	);
	try {
		for (let i = 0; i < 2; i++) {
			const response = await fetch(url, { headers: { "x-shared-secret": "wrong" } });
			assert.equal(response.status, 401);
			assert.equal(
				response.headers.get("www-authenticate"),
				'SharedSecret header="x-shared-secret"',
			);
			assert.equal(await response.text(), "custom Invalid secret");
		}
	} finally {
		await other.stop();
	}
});

test("the door's metrics are registered only when the broker's metrics are on", async () => {
	const names = [
		"shared_secret.accepted.total",
		"shared_secret.refused.total",
		"shared_secret.last_seen.seconds",
	];
	const withMetrics = await startGateway({ metrics: { enabled: true } }, {}, {
		run: () => "ran",
	});
	try {
		for (const name of names) assert.ok(withMetrics.broker.metrics.getMetric(name), name);
	} finally {
		await withMetrics.broker.stop();
	}
	const without = await startGateway({}, {}, { run: () => "ran" });
	try {
		for (const name of names) assert.equal(without.broker.metrics.getMetric(name), null, name);
	} finally {
		await without.broker.stop();
	}
});

test("with a shared rootCallOptions.meta, no request sees another's consumer, even interleaved", async () => {
	// moleculer-web hands every request this one object as its ctx.meta.
	const sharedMeta = {};
	const { broker: other, url } = await startGateway(
		{},
		{
			rootCallOptions: { meta: sharedMeta },
			routes: [{
				path: "/",
				aliases: {
					"GET /run": "jobs.run",
					"POST /run": "jobs.run",
					"GET /v2/status": "jobs.run",
				},
			}],
		},
		{
			// Answers with the consumer it sees, after a pause that lets requests overlap.
			async run(ctx: Context<{ waitMs?: string }, { consumer?: string }>) {
				await new Promise((resolve) => setTimeout(resolve, Number(ctx.params.waitMs ?? 0)));
				return { consumer: ctx.meta.consumer ?? null };
			},
		},
	);
	const call = async (path: string, headers: Record<string, string>, method = "GET") =>
		(await (await fetch(`${new URL(url).origin}${path}`, { method, headers })).json()).consumer;
	try {
		assert.equal(
			await call("/run", { "x-shared-secret": SECRET, "x-consumer": "alice" }),
			"alice",
		);
		assert.equal(
			await call("/run", { "x-shared-secret": SECRET }),
			null,
			"a request without a consumer",
		);
		assert.equal(await call("/v2/status", {}), null, "a public path");
		const [alice, bob] = await Promise.all([
			call("/run?waitMs=150", { "x-shared-secret": SECRET, "x-consumer": "alice" }, "POST"),
			call("/run?waitMs=0", { "x-shared-secret": SECRET, "x-consumer": "bob" }, "POST"),
		]);
		assert.deepEqual([alice, bob], ["alice", "bob"]);
		assert.deepEqual(sharedMeta, {}, "the door never wrote into the shared object");
	} finally {
		await other.stop();
	}
});

test("a copy names its version: middleware.ts's header holds package.json's, and the docs list it", () => {
	const read = (file: string) => readFileSync(join(projectRoot, file), "utf8");
	const { version } = JSON.parse(read("package.json")) as { version: string };
	assert.match(read("middleware.ts").slice(0, 1000), new RegExp(` \\* Version ${version} of `));
	assert.match(read("docs/copy-the-door.md"), new RegExp(`^- \\*\\*${version}\\*\\*: `, "m"));
});
