/**
 * The cluster under faults (`npm run test:cluster`, and part of `npm test`): a
 * real nats-server, one gateway node and two api nodes, each started as its own
 * process (never through npm or npx, so signals reach the broker itself). Under
 * a steady keep-alive load, one fault at a time; every request must still get
 * its 200. Then the start-up failures, and NATS authentication.
 *
 * Needs Debian's nats-server (`apt-get install nats-server`). Without it the
 * suite is skipped and says so, except under CI=true, where that is a failure.
 */
import assert from "node:assert/strict";
import { type ChildProcess, execFileSync, spawn } from "node:child_process";
import { Agent, request } from "node:http";
import { connect } from "node:net";
import { after, before, describe, test } from "node:test";
import { setTimeout as sleep } from "node:timers/promises";
import { freePort, type Origin, runOriginToExit, SECRET, startOrigin } from "./origin.ts";

// Debian puts it in /usr/sbin, which a user's PATH may leave out.
function findNatsServer(): string | undefined {
	try {
		return execFileSync("sh", [
			"-c",
			"PATH=$PATH:/usr/sbin:/usr/local/sbin command -v nats-server",
		], { encoding: "utf8" }).trim() || undefined;
	} catch {
		return undefined;
	}
}
const natsServer = findNatsServer();
const missing =
	"nats-server is not installed (Debian: apt-get install nats-server), so the cluster suite is skipped";
if (!natsServer && process.env.CI !== "true") console.log(`# ${missing}`);
const skip = natsServer || process.env.CI === "true" ? false : missing;

test("nats-server is there when CI runs", { skip: process.env.CI !== "true" }, () => {
	assert.ok(natsServer, "CI must install nats-server: apt-get install -y nats-server");
});

/** A nats-server on loopback; `stop` and `start` again keep its port. */
function nats(port: number, auth: string[] = []) {
	let child: ChildProcess | undefined;
	return {
		url: `nats://127.0.0.1:${port}`,
		async start() {
			child = spawn(natsServer!, ["-a", "127.0.0.1", "-p", String(port), ...auth], {
				stdio: "ignore",
			});
			// Ready once it accepts a connection.
			for (let attempt = 0; attempt < 100; attempt++) {
				const up = await new Promise<boolean>((resolve) => {
					const socket = connect(port, "127.0.0.1", () => (socket.end(), resolve(true)));
					socket.on("error", () => resolve(false));
				});
				if (up) return;
				await sleep(50);
			}
			throw new Error("nats-server did not start");
		},
		async stop() {
			const exited = new Promise((resolve) => child?.once("exit", resolve));
			child?.kill("SIGKILL");
			await exited;
		},
	};
}

type LoadResult = { ok: number; failed: string[]; worstMs: number };

/** CONNECTIONS keep-alive connections sending GET /api/protected back to back until `stop()`. */
function steadyLoad(url: string, connections = 20) {
	const agent = new Agent({ keepAlive: true, maxSockets: connections });
	const result: LoadResult = { ok: 0, failed: [], worstMs: 0 };
	let running = true;
	const one = () =>
		new Promise<void>((resolve) => {
			const started = performance.now();
			const finish = (outcome: number | string) => {
				result.worstMs = Math.max(result.worstMs, performance.now() - started);
				if (outcome === 200) result.ok++;
				else result.failed.push(String(outcome));
				resolve();
			};
			const req = request(`${url}/api/protected`, {
				agent,
				headers: { "x-shared-secret": SECRET },
			}, (response) => {
				response.resume().once("end", () => finish(response.statusCode!));
			});
			// A request that hangs is a lost request: the client gives up at 15 s.
			req.setTimeout(15_000, () => req.destroy(new Error("no answer in 15 s")));
			req.once("error", (error) => finish(error.message));
			req.end();
		});
	const loops = Array.from({ length: connections }, async () => {
		while (running) await one();
	});
	return {
		result,
		async stop(): Promise<LoadResult> {
			running = false;
			await Promise.all(loops);
			agent.destroy();
			return result;
		},
	};
}

describe("a gateway and two api nodes on NATS, under load, one fault at a time", { skip }, () => {
	const worst: Record<string, number> = {};
	let broker: ReturnType<typeof nats>;
	let gateway: Origin;
	const apiNodes: Record<string, Origin> = {};

	const startApi = async (nodeID: string) => {
		apiNodes[nodeID] = await startOrigin(
			{ SERVICES: "api", NODE_ID: nodeID, TRANSPORTER: broker.url },
			{ readyLine: new RegExp(`Node ready: api on ${nodeID}`) },
		);
	};

	/** Runs `fault` under load, then lets the load run on for `settleMs`; asserts nothing was lost. */
	const underLoad = async (name: string, fault: () => Promise<void>, settleMs = 2000) => {
		const load = steadyLoad(gateway.url);
		await sleep(1000);
		await fault();
		await sleep(settleMs);
		const { ok, failed, worstMs } = await load.stop();
		worst[name] = worstMs;
		assert.ok(ok > 100, `${name}: only ${ok} requests were answered`);
		assert.deepEqual(
			failed,
			[],
			`${name}: ${failed.length} of ${ok + failed.length} requests failed`,
		);
	};

	before(async () => {
		broker = nats(await freePort());
		await broker.start();
		await startApi("api-1");
		await startApi("api-2");
		gateway = await startOrigin({
			SERVICES: "gateway",
			NODE_ID: "gateway-1",
			TRANSPORTER: broker.url,
		});
	});

	after(async () => {
		// Cleanup only: no need to wait for graceful stops.
		await Promise.all(
			[gateway, ...Object.values(apiNodes)].map((node) => node?.stop("SIGKILL")),
		);
		await broker?.stop();
		console.log(
			"# worst request latency per fault (ms):",
			JSON.stringify(
				Object.fromEntries(Object.entries(worst).map(([k, v]) => [k, Math.round(v)])),
			),
		);
	});

	test("no fault", { timeout: 30_000 }, () => underLoad("none", async () => {}));

	test("SIGTERM of one api node", { timeout: 30_000 }, () =>
		underLoad("SIGTERM", async () => {
			await apiNodes["api-1"].stop("SIGTERM");
			await startApi("api-1");
		}));

	test(
		"kill -9 of one api node, back after 5 s",
		{ timeout: 40_000 },
		() =>
			underLoad("kill -9, back after 5 s", async () => {
				await apiNodes["api-1"].stop("SIGKILL");
				await sleep(5000);
				await startApi("api-1");
			}),
	);

	test("kill -9 of one api node, never back (until its heartbeat times out and after)", {
		timeout: 40_000,
	}, async () => {
		// 6 s of heartbeat timeout, and 2 s more.
		await underLoad(
			"kill -9, never back",
			async () => void (await apiNodes["api-2"].stop("SIGKILL")),
			8000,
		);
		await startApi("api-2");
	});

	test(
		"rolling restart of both api nodes",
		{ timeout: 40_000 },
		() =>
			underLoad("rolling restart", async () => {
				for (const nodeID of ["api-1", "api-2"]) {
					await apiNodes[nodeID].stop("SIGTERM");
					await startApi(nodeID);
				}
			}),
	);

	test("nats-server down for 2 s", { timeout: 40_000 }, () =>
		underLoad(
			"NATS down 2 s",
			async () => {
				await broker.stop();
				await sleep(2000);
				await broker.start();
			},
			3000,
		));
});

describe("start-up against NATS", { skip }, () => {
	const PASSWORD = "c0rrect-h0rse-battery";
	const TOKEN = "t0ken-f0r-nats-4f9a";
	let secured: ReturnType<typeof nats>;
	let tokenServer: ReturnType<typeof nats>;
	before(async () => {
		secured = nats(await freePort(), ["--user", "origin", "--pass", PASSWORD]);
		tokenServer = nats(await freePort(), ["--auth", TOKEN]);
		await Promise.all([secured.start(), tokenServer.start()]);
	});
	after(() => Promise.all([secured.stop(), tokenServer.stop()]));

	test(
		"user and password in the URL, or NATS_TOKEN, join the cluster",
		{ timeout: 30_000 },
		async () => {
			const withPassword = await startOrigin(
				{
					SERVICES: "api",
					NODE_ID: "api-auth",
					TRANSPORTER: `nats://origin:${PASSWORD}@127.0.0.1:${new URL(secured.url).port}`,
				},
				{ readyLine: /Node ready: api on api-auth/ },
			);
			const withToken = await startOrigin(
				{
					SERVICES: "api",
					NODE_ID: "api-token",
					TRANSPORTER: tokenServer.url,
					NATS_TOKEN: TOKEN,
				},
				{ readyLine: /Node ready: api on api-token/ },
			);
			assert.ok(!withPassword.output().includes(PASSWORD));
			assert.ok(!withToken.output().includes(TOKEN));
			await Promise.all([withPassword.stop(), withToken.stop()]);
		},
	);

	test("an unreachable NATS: exit 1 within 30 s of the start, one line, no password", {
		timeout: 60_000,
	}, async () => {
		const nobodyThere = `nats://origin:${PASSWORD}@127.0.0.1:${await freePort()}`;
		const unreachable = await runOriginToExit(
			{ SERVICES: "api", TRANSPORTER: nobodyThere },
			45_000,
		);
		assert.equal(unreachable.code, 1, unreachable.output);
		assert.match(
			unreachable.output,
			/FATAL .*Cannot join the cluster at nats:\/\/\*\*\*@127\.0\.0\.1:\d+: .*\(not connected within 30 s\)/,
		);
		assert.equal(unreachable.output.match(/Cannot join the cluster/g)?.length, 1);
		assert.ok(!unreachable.output.includes(PASSWORD), unreachable.output);
	});

	test("a wrong password or token ends the node at once, one line, no password or token", {
		timeout: 60_000,
	}, async () => {
		const wrongPassword = `nats://origin:wr0ng-${PASSWORD}@127.0.0.1:${
			new URL(secured.url).port
		}`;
		const exits = await Promise.all([
			// 15 s: far under the 30 s an unreachable server gets, so a wait for it fails here.
			runOriginToExit({ SERVICES: "api", TRANSPORTER: wrongPassword }, 15_000),
			runOriginToExit({
				SERVICES: "api",
				TRANSPORTER: tokenServer.url,
				NATS_TOKEN: `wr0ng-${TOKEN}`,
			}, 15_000),
		]);
		for (const exit of exits) {
			assert.equal(exit.code, 1, exit.output);
			assert.match(
				exit.output,
				/FATAL .*Cannot join the cluster at nats:\/\/\S+: '?Authorization Violation'?$/m,
			);
			assert.equal(exit.output.match(/Cannot join the cluster/g)?.length, 1);
			assert.ok(!exit.output.includes(PASSWORD) && !exit.output.includes(TOKEN), exit.output);
		}
	});
});
