/**
 * A deploy must never drop requests: SIGTERM while slow requests are in flight.
 * The slow action runs on a test-only service node (test/slow-api-node.ts)
 * behind a gateway node started from index.ts.
 */
import assert from "node:assert/strict";
import { Agent, request } from "node:http";
import { test } from "node:test";
import {
	exitCodesAreReliable,
	freePort,
	projectRoot,
	SECRET,
	startOrigin,
	typeScriptCommand,
	waitFor,
} from "./origin.ts";

const SLOW_MS = 1500;

// One request; resolves with the status and body, or with the connection
// error's code. Without an agent, it opens a connection of its own.
function get(
	url: string,
	headers: Record<string, string>,
	agent: Agent | false = false,
): Promise<{ status?: number; body?: string; error?: string }> {
	return new Promise((resolve) => {
		request(url, { headers, agent }, (response) => {
			let body = "";
			response.setEncoding("utf8").on("data", (chunk) => (body += chunk));
			response.on("end", () => resolve({ status: response.statusCode, body }));
		})
			.on("error", (error: NodeJS.ErrnoException) => resolve({ error: error.code }))
			.end();
	});
}

test(
	"SIGTERM: requests in flight get their real answer, new connections are refused, exit 0 within 10 s",
	{ timeout: 60_000 },
	async () => {
		const gatewayPort = await freePort();
		const TRANSPORTER =
			`tcp://127.0.0.1:${await freePort()}/gateway-1,127.0.0.1:${await freePort()}/slow-api-1`;
		const apiNode = await startOrigin(
			{ NODE_ID: "slow-api-1", TRANSPORTER, SLOW_MS: String(SLOW_MS), LOGLEVEL: "debug" },
			{
				command: typeScriptCommand("test/slow-api-node.ts"),
				cwd: projectRoot,
				readyLine: /Node ready: slow api/,
			},
		);
		const gatewayNode = await startOrigin({
			SERVICES: "gateway",
			NODE_ID: "gateway-1",
			TRANSPORTER,
			PORT: String(gatewayPort),
		});
		try {
			const url = `http://127.0.0.1:${gatewayPort}/api/protected`;
			// Kept-alive connections, as an API gateway keeps them to its origin.
			const gatewayPool = new Agent({ keepAlive: true });
			const inFlight = Array.from(
				{ length: 5 },
				() => get(url, { "x-shared-secret": SECRET }, gatewayPool),
			);
			// Once all five are inside the slow action, stop the gateway node.
			const received = () =>
				apiNode.output().match(/<= Request 'api\.protectedAction'/g)?.length ?? 0;
			await waitFor(
				() => received() === 5,
				"five requests to reach the slow action",
				SLOW_MS,
			);
			const stoppedAt = Date.now();
			const exitCode = gatewayNode.stop("SIGTERM");
			await new Promise((resolve) => setTimeout(resolve, 200));

			const late = await get(url, { "x-shared-secret": SECRET });
			assert.equal(
				late.error,
				"ECONNREFUSED",
				`a new connection after SIGTERM got ${JSON.stringify(late)}`,
			);

			for (const answer of await Promise.all(inFlight)) {
				assert.equal(answer.status, 200, JSON.stringify(answer));
				assert.deepEqual(JSON.parse(answer.body!), { message: "Access granted" });
			}
			const code = await exitCode;
			gatewayPool.destroy();
			assert.ok(Date.now() - stoppedAt < 10_000, `took ${Date.now() - stoppedAt} ms to exit`);
			assert.match(gatewayNode.output(), /ServiceBroker is stopped\. Good bye\./);
			if (exitCodesAreReliable) assert.equal(code, 0, gatewayNode.output());
		} finally {
			await gatewayNode.stop();
			await apiNode.stop();
		}
	},
);
