/**
 * The rotation of docs/rotating-the-secret.md, driven against the real origin: which secret is in
 * use shows in the log and in Prometheus metrics, so an operator knows when
 * the old one can go. The report runs every second here (60 s by default) and
 * calls an entry quiet after 2 s unused (10 minutes by default).
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { freePort, OLD_SECRET, SECRET, startOrigin, waitFor } from "./origin.ts";

const FAST_REPORT = { SHARED_SECRET_REPORT_SECONDS: "1", SHARED_SECRET_QUIET_SECONDS: "2" };

async function send(url: string, secret: string | undefined, times: number): Promise<number[]> {
	const statuses: number[] = [];
	for (let i = 0; i < times; i++) {
		const headers: Record<string, string> = secret === undefined
			? {}
			: { "x-shared-secret": secret };
		const response = await fetch(`${url}/api/protected`, { headers });
		await response.arrayBuffer();
		statuses.push(response.status);
	}
	return statuses;
}

/** One sample from the Prometheus text format, or undefined. */
function sample(text: string, name: string, label: string): number | undefined {
	const line = text.split("\n").find((line) =>
		line.startsWith(`${name}{`) && line.includes(label)
	);
	return line === undefined ? undefined : Number(line.split(" ").at(-1));
}

/**
 * Scrapes until `name{label}` reads `value` (the door copies its counts into
 * the registry once a second), and returns the last scrape.
 */
async function scrapeUntil(
	port: number,
	name: string,
	label: string,
	value: number,
): Promise<string> {
	let text = "";
	for (let attempt = 0; attempt < 50; attempt++) {
		text = await (await fetch(`http://127.0.0.1:${port}/metrics`)).text();
		if (sample(text, name, label) === value) break;
		await new Promise((resolve) => setTimeout(resolve, 100));
	}
	return text;
}

test("rotation: entry 2 is reported while it arrives, then as removable; then it is refused", async () => {
	const metricsPort = await freePort();
	// 1. The origin holds new,old; the gateway still sends old.
	const both = await startOrigin({
		SHARED_SECRET: `${SECRET},${OLD_SECRET}`,
		METRICS_PORT: String(metricsPort),
		...FAST_REPORT,
	});
	try {
		assert.match(both.output(), /2 secrets; entry 1 is the current one\./);
		assert.deepEqual(await send(both.url, OLD_SECRET, 5), [200, 200, 200, 200, 200]);
		// A report period may end between two of the five: add the lines up.
		const inUse = () => [
			...both.output().matchAll(
				/secrets entry 2 of 2 is still in use: (\d+) requests in 1 s, the last at \S+Z\./g,
			),
		];
		await waitFor(
			() => inUse().reduce((sum, line) => sum + Number(line[1]), 0) === 5,
			"in-use lines adding up to 5",
		);

		let scraped = await scrapeUntil(
			metricsPort,
			"shared_secret_accepted_total",
			'entry="2"',
			5,
		);
		assert.equal(sample(scraped, "shared_secret_accepted_total", 'entry="2"'), 5, scraped);
		assert.equal(sample(scraped, "shared_secret_accepted_total", 'entry="1"'), 0);
		const lastSeen = sample(scraped, "shared_secret_last_seen_seconds", 'entry="2"')!;
		assert.ok(Math.abs(lastSeen - Date.now() / 1000) < 30, `last seen ${lastSeen}`);

		// 2. The gateway switches to new: entry 2's count stops, and after the
		// quiet time the origin says it can be removed.
		await send(both.url, SECRET, 3);
		const before = inUse().length;
		await waitFor(
			() =>
				/no request has used secrets entry 2 of 2 for 2 s; it can be removed\./.test(
					both.output(),
				),
			"the quiet line",
			10_000,
		);
		assert.equal(inUse().length, before, "no in-use line once old stopped arriving");
		scraped = await scrapeUntil(metricsPort, "shared_secret_accepted_total", 'entry="1"', 3);
		assert.equal(sample(scraped, "shared_secret_accepted_total", 'entry="1"'), 3, scraped);
		assert.equal(sample(scraped, "shared_secret_accepted_total", 'entry="2"'), 5);
	} finally {
		await both.stop();
	}

	// 3. The origin holds new only: old is refused.
	const newOnly = await startOrigin({ SHARED_SECRET: SECRET });
	try {
		assert.deepEqual(await send(newOnly.url, OLD_SECRET, 1), [401]);
		assert.deepEqual(await send(newOnly.url, SECRET, 1), [200]);
		assert.doesNotMatch(newOnly.output(), /\d+ secrets; entry 1 is/);
	} finally {
		await newOnly.stop();
	}
});

test("refusals are counted by reason as metrics, with one short log line each", async () => {
	const metricsPort = await freePort();
	const origin = await startOrigin({ METRICS_PORT: String(metricsPort), ...FAST_REPORT });
	try {
		await send(origin.url, undefined, 3);
		await send(origin.url, "x".repeat(64), 2);
		const scraped = await scrapeUntil(
			metricsPort,
			"shared_secret_refused_total",
			'reason="invalid"',
			2,
		);
		assert.equal(
			sample(scraped, "shared_secret_refused_total", 'reason="missing"'),
			3,
			scraped,
		);
		assert.equal(sample(scraped, "shared_secret_refused_total", 'reason="invalid"'), 2);
		await waitFor(
			() => (origin.output().match(/<= 401 GET \/api\/protected/g)?.length ?? 0) === 5,
			"five refusal lines",
		);
		// The log says that a request was refused, never what it presented.
		assert.doesNotMatch(origin.output(), /x{64}/);
	} finally {
		await origin.stop();
	}
});

test("with metrics off, nothing is registered and nothing listens", async () => {
	const metricsPort = await freePort();
	const origin = await startOrigin(FAST_REPORT);
	try {
		await send(origin.url, SECRET, 1);
		await assert.rejects(fetch(`http://127.0.0.1:${metricsPort}/metrics`));
		assert.doesNotMatch(origin.output(), /Prometheus/);
	} finally {
		await origin.stop();
	}
});

test("no secret reaches a log line or a metric, at trace level, with every report firing", async () => {
	const metricsPort = await freePort();
	const origin = await startOrigin({
		SHARED_SECRET: `${SECRET},${OLD_SECRET}`,
		LOGLEVEL: "trace",
		METRICS_PORT: String(metricsPort),
		...FAST_REPORT,
	});
	try {
		await send(origin.url, OLD_SECRET, 2);
		await send(origin.url, SECRET, 2);
		await send(origin.url, `${SECRET}x`, 1);
		await waitFor(() => /it can be removed/.test(origin.output()), "the quiet line", 10_000);
		const scraped = await (await fetch(`http://127.0.0.1:${metricsPort}/metrics`)).text();
		for (const secret of [SECRET, OLD_SECRET]) {
			for (const text of [origin.output(), scraped]) {
				assert.ok(!text.includes(secret), "the whole secret");
				assert.ok(!text.includes(secret.slice(0, 12)), "a prefix of it");
				assert.ok(!text.includes(secret.slice(-12)), "a suffix of it");
			}
		}
	} finally {
		await origin.stop();
	}
});
