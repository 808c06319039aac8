/**
 * middleware.ts copied alone into another project: another broker, another
 * gateway name, another route and service, a route that copies the headers
 * into ctx.meta. The door must hold there too, and stay out of internal calls.
 */
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import type { Server } from "node:http";
import { ServiceBroker, type Context } from "moleculer";
import ApiGateway from "moleculer-web";
import { SharedSecretMiddleware } from "../middleware.ts";
import { SECRET } from "./origin.ts";

let broker: ServiceBroker;
let base: string;
const eventsSeen: unknown[] = [];

before(async () => {
	process.env.SHARED_SECRET = SECRET;
	process.env.PUBLIC_PATHS = "GET /v2/status";
	broker = new ServiceBroker({ logger: false, middlewares: [SharedSecretMiddleware] });

	broker.createService({
		name: "orders",
		actions: {
			list: () => [{ id: 1 }],
			status: () => "up",
			// Shows what a service receives in ctx.meta.
			whatDoISee: (ctx: Context) => ctx.meta
		},
		events: {
			"order.created"(ctx: Context) {
				eventsSeen.push(ctx.params);
			}
		}
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
						"GET /meta": "orders.whatDoISee"
					},
					// Parses JSON bodies: a malformed one gets 400 once parsing runs.
					bodyParsers: { json: true },
					// A common pattern: hand every request header to the services.
					onBeforeCall(ctx: Context<unknown, Record<string, unknown>>, _route: unknown, req: { headers: unknown }) {
						ctx.meta.headers = req.headers;
					}
				}
			]
		}
	});
	await broker.start();
	const { port } = (gateway as unknown as { server: Server }).server.address() as { port: number };
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
	const wrong = await fetch(`${base}/v2/orders`, { headers: { "x-shared-secret": `${SECRET}!` } });
	assert.equal(wrong.status, 401);
	assert.equal((await wrong.json()).message, "Invalid secret");
});

test("the secret is checked before the body is parsed", async () => {
	const malformed = { method: "POST", headers: { "content-type": "application/json" }, body: "{not json" };
	const withoutSecret = await fetch(`${base}/v2/orders`, malformed);
	assert.equal(withoutSecret.status, 401);
	// With the secret, the same request reaches the parser, which refuses it.
	const withSecret = await fetch(`${base}/v2/orders`, { ...malformed, headers: { ...malformed.headers, "x-shared-secret": SECRET } });
	assert.equal(withSecret.status, 400);
});

test("its own public path is public, and the template's /health is not", async () => {
	assert.equal((await fetch(`${base}/v2/status`)).status, 200);
	assert.equal((await fetch(`${base}/health`)).status, 401);
});

test("services never see the secret, even when a route copies the headers into ctx.meta", async () => {
	const response = await fetch(`${base}/v2/meta`, { headers: { "x-shared-secret": SECRET, "x-trace": "kept" } });
	assert.equal(response.status, 200);
	const meta = await response.json();
	assert.equal(meta.headers["x-trace"], "kept", "the route did copy the headers");
	assert.equal("x-shared-secret" in meta.headers, false);
	assert.ok(!JSON.stringify(meta).includes(SECRET));
});

test("calls and events inside the broker carry no headers and are not affected", async () => {
	assert.deepEqual(await broker.call("orders.list"), [{ id: 1 }]);
	await broker.emit("order.created", { id: 2 });
	await new Promise(resolve => setImmediate(resolve));
	assert.deepEqual(eventsSeen, [{ id: 2 }]);
});
