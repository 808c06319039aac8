/**
 * Load: 20,000 requests over 100 keep-alive connections, right and wrong
 * secrets interleaved. Every answer must be the right one for its request, with
 * no transport error, and the server must not keep what it served.
 */
import assert from "node:assert/strict";
import { readFileSync } from "node:fs";
import { Agent, request } from "node:http";
import { test } from "node:test";
import { freePort, SECRET, startOrigin } from "./origin.ts";

const REQUESTS = 20_000;
const CONNECTIONS = 100;
// Resident memory may grow this much over the run: 20,000 requests kept alive
// at even 2 KB each would be 40 MiB more.
const RSS_BOUND_MIB = 32;
// Before the run, warm up until resident memory settles: each runtime's V8
// grows its heap, in steps, to its own working size first (measured here: Node
// about +4 MiB, Bun +15, Deno +110 over the first 45,000 requests, flat after).
// Settled: three batches in a row that grew it less than SETTLED_MIB each.
const WARMUP_BATCH = 5_000;
const WARMUP_MAX_BATCHES = 14;
const SETTLED_MIB = 4;

const residentMiB = (pid: number) =>
	Number(/VmRSS:\s+(\d+) kB/.exec(readFileSync(`/proc/${pid}/status`, "utf8"))![1]) / 1024;

test(
	`${REQUESTS} requests over ${CONNECTIONS} keep-alive connections: every answer right, memory bounded`,
	{ timeout: 90_000 },
	async (t) => {
		const diagnostic = (message: string) => t.diagnostic(message);
		// LOGLEVEL=warn: 40,000 per-request log lines would measure the logger.
		const origin = await startOrigin({ LOGLEVEL: "warn" }, { pollPort: await freePort() });
		const agent = new Agent({ keepAlive: true, maxSockets: CONNECTIONS });
		const wrongSecret = `${SECRET.slice(0, -2)}zz`;
		const tally = { granted: 0, refused: 0, wrong: [] as string[], transportErrors: 0 };

		const send = (index: number) =>
			new Promise<void>((resolve) => {
				const right = index % 2 === 0;
				request(`${origin.url}/api/protected`, {
					agent,
					headers: { "x-shared-secret": right ? SECRET : wrongSecret },
				}, (response) => {
					let body = "";
					response.setEncoding("utf8").on("data", (chunk) => (body += chunk));
					response.on("end", () => {
						const expected = right ? 200 : 401;
						const expectedBody = right ? '"Access granted"' : '"Invalid secret"';
						if (response.statusCode === expected && body.includes(expectedBody)) {
							right ? tally.granted++ : tally.refused++;
						} else {tally.wrong.push(
								`#${index} ${
									right ? "right" : "wrong"
								} secret got ${response.statusCode} ${body}`,
							);}
						resolve();
					});
				})
					.on("error", () => {
						tally.transportErrors++;
						resolve();
					})
					.end();
			});
		const run = async (count: number) => {
			let next = 0;
			const connection = async () => {
				while (next < count) await send(next++);
			};
			await Promise.all(Array.from({ length: CONNECTIONS }, connection));
		};

		try {
			let before = residentMiB(origin.child.pid!);
			for (let batch = 0, calm = 0; batch < WARMUP_MAX_BATCHES && calm < 3; batch++) {
				await run(WARMUP_BATCH);
				const now = residentMiB(origin.child.pid!);
				calm = now - before < SETTLED_MIB ? calm + 1 : 0;
				before = now;
			}
			Object.assign(tally, { granted: 0, refused: 0 });
			await run(REQUESTS);
			const after = residentMiB(origin.child.pid!);

			assert.deepEqual(tally.wrong.slice(0, 5), [], `${tally.wrong.length} wrong answers`);
			assert.equal(tally.transportErrors, 0);
			assert.equal(tally.granted, REQUESTS / 2);
			assert.equal(tally.refused, REQUESTS / 2);
			diagnostic(`resident memory ${before.toFixed(1)} MiB -> ${after.toFixed(1)} MiB`);
			assert.ok(
				after - before <= RSS_BOUND_MIB,
				`resident memory grew ${(after - before).toFixed(1)} MiB (${before.toFixed(1)} -> ${
					after.toFixed(1)
				})`,
			);
		} finally {
			agent.destroy();
			await origin.stop();
		}
	},
);
