/**
 * Scale-out: two origins on loopback over Moleculer's built-in TCP transporter.
 * A gateway node holds the door and the gateway but not `api`; a service node
 * holds `api` and no secret. The door must hold across the cluster.
 */
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { ServiceBroker } from "moleculer";
import { freePort, type Origin, SECRET, startOrigin, waitFor } from "./origin.ts";

let gatewayNode: Origin;
let apiNode: Origin;
let gatewayAddress: string;

before(async () => {
	// A static list of both nodes on 127.0.0.1: no multicast discovery, and no
	// traffic leaves the loopback interface.
	gatewayAddress = `127.0.0.1:${await freePort()}`;
	const TRANSPORTER = `tcp://${gatewayAddress}/gateway-1,127.0.0.1:${await freePort()}/api-1`;
	// LOGLEVEL=debug: the service node logs every request it receives.
	apiNode = await startOrigin(
		{
			SERVICES: "api",
			NODE_ID: "api-1",
			TRANSPORTER,
			LOGLEVEL: "debug",
			SHARED_SECRET: undefined,
		},
		{ readyLine: /Node ready: api on api-1/ },
	);
	gatewayNode = await startOrigin({ SERVICES: "gateway", NODE_ID: "gateway-1", TRANSPORTER });
});

after(async () => {
	await gatewayNode?.stop();
	await apiNode?.stop();
});

const callsReceivedByApiNode = () =>
	apiNode.output().match(/<= Request 'api\.protectedAction' .*received from 'gateway-1' node/g)
		?.length ?? 0;

test(
	"the right secret reaches api.protectedAction on the other node; a wrong one never causes a call",
	{ timeout: 30_000 },
	async () => {
		const protectedUrl = `${gatewayNode.url}/api/protected`;
		for (let i = 0; i < 5; i++) {
			const wrong = await fetch(protectedUrl, {
				headers: { "x-shared-secret": `${SECRET.slice(0, -1)}x` },
			});
			assert.equal(wrong.status, 401);
			const missing = await fetch(protectedUrl);
			assert.equal(missing.status, 401);
		}
		assert.equal(callsReceivedByApiNode(), 0, "a refused request reached the service node");

		for (let i = 0; i < 3; i++) {
			const right = await fetch(protectedUrl, { headers: { "x-shared-secret": SECRET } });
			assert.equal(right.status, 200);
			assert.deepEqual(await right.json(), { message: "Access granted" });
		}
		// The service node's log lines arrive through a pipe, a moment after the answers.
		await waitFor(() => callsReceivedByApiNode() >= 3, "the service node to log 3 requests");
		assert.equal(callsReceivedByApiNode(), 3);
		assert.ok(!apiNode.output().includes(SECRET), "the secret reached the service node");
	},
);

test(
	"a node that joins the cluster cannot change the gateway's routes, not even by a crafted packet",
	{
		timeout: 30_000,
	},
	async () => {
		// Not in the gateway's list: it joins by naming the gateway in its own.
		const urls = `tcp://${gatewayAddress}/gateway-1,127.0.0.1:${await freePort()}/intruder`;
		const intruder = new ServiceBroker({
			nodeID: "intruder",
			logger: false,
			transporter: { type: "TCP", options: { urls, udpDiscovery: false } },
		});
		await intruder.start();
		try {
			await intruder.waitForServices("gateway", 10_000);
			const attempts: [string, object][] = [
				["gateway.removeRoute", { path: "/" }],
				["gateway.addRoute", { route: { path: "/open", mappingPolicy: "all" } }],
			];
			for (const [action, params] of attempts) {
				await assert.rejects(
					intruder.call(action, params),
					{ name: "ServiceNotFoundError" },
					action,
				);
			}
			// A REQUEST packet written by hand, which no registry lookup stands in front of.
			for (const [action, params] of attempts) {
				const publish = intruder.transit!.publish as unknown as (packet: object) => unknown;
				publish.call(intruder.transit, {
					type: "REQ",
					target: "gateway-1",
					payload: {
						id: `crafted-${action}`,
						action,
						params,
						meta: {},
						timeout: 0,
						level: 1,
						tracing: false,
						parentID: null,
						requestID: `crafted-${action}`,
						caller: null,
						stream: false,
					},
				});
			}
			// A call answered after the crafted packets, on the same connection, means they arrived.
			await intruder.call("gateway.listAliases", {});
			await new Promise((resolve) => setTimeout(resolve, 300));
			// The routes are as they were: /health answers, and nothing new is open.
			assert.equal((await fetch(`${gatewayNode.url}/health`)).status, 200);
			const opened = await fetch(`${gatewayNode.url}/open/api/protectedAction`, {
				headers: { "x-shared-secret": SECRET },
			});
			assert.equal(opened.status, 404);
			assert.match(gatewayNode.output(), /dropped a call to gateway\.removeRoute from the/);
			assert.match(gatewayNode.output(), /dropped a call to gateway\.addRoute from the/);
		} finally {
			await intruder.stop();
		}
	},
);

test(
	"the gateway node does not hold `api`: without the service node it answers 503 with Retry-After",
	{ timeout: 30_000 },
	async () => {
		await apiNode.stop();
		const response = await fetch(`${gatewayNode.url}/api/protected`, {
			headers: { "x-shared-secret": SECRET },
		});
		// A load balancer reads 503 as "try another origin"; a 404 would say the route is gone.
		assert.equal(response.status, 503);
		assert.equal(response.headers.get("retry-after"), "1");
		assert.deepEqual(await response.json(), {
			name: "MoleculerServerError",
			message: "No api node is available; try again shortly.",
			code: 503,
			type: "SERVICE_UNAVAILABLE",
		});
		// The door still answers first.
		assert.equal((await fetch(`${gatewayNode.url}/api/protected`)).status, 401);
	},
);
