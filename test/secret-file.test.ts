/**
 * Rotation without a restart: index.ts reads SHARED_SECRET_FILE, and reads it again every second
 * and on SIGHUP. Against the real origin, in its own process: a Kubernetes-style swap under load,
 * a bad file, a deleted file, an editor's plain rewrite, and SIGHUP. Then the door's own
 * setSecrets, the call a project with a vault makes, in-process.
 */
import assert from "node:assert/strict";
import {
	appendFileSync,
	mkdirSync,
	mkdtempSync,
	renameSync,
	rmSync,
	symlinkSync,
	writeFileSync,
} from "node:fs";
import { join } from "node:path";
import { test } from "node:test";
import { ServiceBroker } from "moleculer";
import ApiGateway from "moleculer-web";
import { SharedSecretMiddleware } from "../middleware.ts";
import { emptyFolder, OLD_SECRET, SECRET, startOrigin, waitFor } from "./origin.ts";

// The file is read every second: a change must show within this, with room for a machine busy
// with the other suites.
const NOTICED_WITHIN_MS = 5000;
const NEW_SECRET = "N3w5ecretF0rRotati0n-9f8e7d6c5b4a39281706f5e4d3c2b1a0";

// Inside the origins' own folder (outside the project), so Deno's narrow --allow-read covers it.
const secretsFolder = () => mkdtempSync(join(emptyFolder, "secrets-"));

const status = (url: string, secret: string) =>
	fetch(`${url}/api/protected`, { headers: { "x-shared-secret": secret } })
		.then(async (response) => (await response.arrayBuffer(), response.status));

/** Lays out a folder as Kubernetes mounts a secret, and swaps it the way Kubernetes does. */
function kubernetesSecret(contents: string) {
	const folder = secretsFolder();
	let version = 0;
	const writeVersion = (text: string) => {
		const name = `..version_${version++}`;
		mkdirSync(join(folder, name));
		writeFileSync(join(folder, name, "shared-secret"), text);
		return name;
	};
	symlinkSync(writeVersion(contents), join(folder, "..data"));
	symlinkSync(join("..data", "shared-secret"), join(folder, "shared-secret"));
	return {
		path: join(folder, "shared-secret"),
		// A new folder, then `..data` pointed at it in one rename: readers see old or new.
		swap(text: string) {
			symlinkSync(writeVersion(text), join(folder, "..data_tmp"));
			renameSync(join(folder, "..data_tmp"), join(folder, "..data"));
		},
	};
}

test("SHARED_SECRET_FILE starts the origin; its newline is not part of the secret, nor logged", async () => {
	const path = join(secretsFolder(), "shared-secret");
	writeFileSync(path, `${SECRET}\n`);
	const origin = await startOrigin({ SHARED_SECRET: undefined, SHARED_SECRET_FILE: path });
	try {
		assert.equal(await status(origin.url, SECRET), 200);
		assert.equal(await status(origin.url, OLD_SECRET), 401);
		assert.ok(!origin.output().includes(SECRET.slice(0, 12)), "the file's contents in the log");
	} finally {
		await origin.stop();
	}
});

test(
	"a Kubernetes swap to new,old, then to new, under load: no request with a then-valid secret is refused",
	{
		timeout: 60_000,
	},
	async () => {
		const mounted = kubernetesSecret(`${OLD_SECRET}\n`);
		const origin = await startOrigin({
			SHARED_SECRET: undefined,
			SHARED_SECRET_FILE: mounted.path,
		});
		// The API gateway's secret: what the load sends, switched as an operator would.
		let gatewaySends = OLD_SECRET;
		let running = true;
		const refused: string[] = [];
		let answered = 0;
		const loops = Array.from({ length: 8 }, async () => {
			while (running) {
				const sent = gatewaySends;
				const answer = await status(origin.url, sent);
				answered++;
				if (answer !== 200) {
					refused.push(`${answer} for ${sent === OLD_SECRET ? "old" : "new"}`);
				}
			}
		});
		const changedTo = (entries: string) =>
			waitFor(
				() => origin.output().includes(`the secrets changed: ${entries}, entry 1 current.`),
				`the door to take ${entries}`,
				NOTICED_WITHIN_MS,
			);
		try {
			await waitFor(() => answered > 200, "load with the old secret");
			mounted.swap(`${NEW_SECRET},${OLD_SECRET}\n`);
			await changedTo("2 entries");
			// Zuplo's step: the API gateway now sends the new secret.
			gatewaySends = NEW_SECRET;
			const switchedAt = answered;
			await waitFor(() => answered > switchedAt + 200, "load with the new secret");
			mounted.swap(`${NEW_SECRET}\n`);
			await changedTo("1 entry");
			const lastAt = answered;
			await waitFor(() => answered > lastAt + 200, "load after the last swap");
		} finally {
			running = false;
			await Promise.all(loops);
		}
		try {
			assert.deepEqual(refused, [], `${refused.length} of ${answered} refused`);
			assert.equal(
				await status(origin.url, OLD_SECRET),
				401,
				"the old secret after the last swap",
			);
			assert.ok(
				!origin.output().includes(NEW_SECRET.slice(0, 12)),
				"the new secret in the log",
			);
		} finally {
			await origin.stop();
		}
	},
);

test(
	"a bad or deleted file keeps the secrets, with one line per bad version; a plain rewrite takes",
	{
		timeout: 60_000,
	},
	async () => {
		const path = join(secretsFolder(), "shared-secret");
		writeFileSync(path, SECRET);
		const origin = await startOrigin({ SHARED_SECRET: undefined, SHARED_SECRET_FILE: path });
		const lines = (pattern: RegExp) =>
			origin.output().split("\n").filter((line) => pattern.test(line));
		try {
			// A bad version: too short. Kept, and said once, however many reads see it.
			writeFileSync(path, "short-secret");
			const bad = /: the door keeps its secrets: .*is 12 characters/;
			await waitFor(
				() => lines(bad).length === 1,
				"the bad version's line",
				NOTICED_WITHIN_MS,
			);
			await new Promise((resolve) => setTimeout(resolve, 2500));
			assert.equal(lines(bad).length, 1, "one line per bad version, not one per read");
			assert.equal(await status(origin.url, SECRET), 200);
			// A second bad version gets its own line: a duplicate entry.
			writeFileSync(path, `${OLD_SECRET},${OLD_SECRET}`);
			await waitFor(
				() => lines(/is the same as entry 1/).length === 1,
				"the duplicate's line",
			);
			// Deleted: kept, said once.
			rmSync(path);
			const gone = /: the door keeps its secrets: the file is gone\./;
			await waitFor(
				() => lines(gone).length === 1,
				"the deleted file's line",
				NOTICED_WITHIN_MS,
			);
			assert.equal(await status(origin.url, SECRET), 200);
			// An editor's plain rewrite, in place.
			writeFileSync(path, `${OLD_SECRET}\n`);
			await waitFor(
				() => origin.output().includes("the secrets changed: 1 entry, entry 1 current."),
				"the rewrite to take",
				NOTICED_WITHIN_MS,
			);
			assert.equal(await status(origin.url, OLD_SECRET), 200);
			assert.equal(await status(origin.url, SECRET), 401);
			assert.ok(
				!origin.output().includes("short-secret"),
				"a bad file's contents in the log",
			);
		} finally {
			await origin.stop();
		}
	},
);

test("SIGHUP reads the file again at once", { timeout: 60_000 }, async () => {
	const path = join(secretsFolder(), "shared-secret");
	writeFileSync(path, SECRET);
	const origin = await startOrigin({ SHARED_SECRET: undefined, SHARED_SECRET_FILE: path });
	try {
		// The file is also read every second, so one quick change could be that read. Four in a
		// row, each taken within 550 ms of its SIGHUP (250 ms of it the wait for the file to
		// settle), are not: by chance, that is under 1%.
		for (const [round, secret] of [OLD_SECRET, SECRET, OLD_SECRET, SECRET].entries()) {
			const changes = origin.output().split("the secrets changed").length;
			writeFileSync(path, secret);
			process.kill(origin.child.pid!, "SIGHUP");
			await waitFor(
				() => origin.output().split("the secrets changed").length > changes,
				`round ${round + 1} within 550 ms of SIGHUP`,
				550,
			);
			assert.equal(await status(origin.url, secret), 200);
		}
	} finally {
		await origin.stop();
	}
});

test("a rotation that lands during the start is applied: the file is read once", {
	timeout: 60_000,
}, async () => {
	const path = join(secretsFolder(), "shared-secret");
	writeFileSync(path, OLD_SECRET);
	// Resolves at the broker's first line: the door has read the file, and nothing watches it yet.
	const origin = await startOrigin({ SHARED_SECRET: undefined, SHARED_SECRET_FILE: path }, {
		readyLine: /Moleculer v\S+ is starting/,
	});
	writeFileSync(path, SECRET);
	try {
		await waitFor(() => /Origin ready at http/.test(origin.output()), "the origin, ready");
		const url = /Origin ready at (http:\/\/\S+)/.exec(origin.output())![1]!;
		await waitFor(
			() => origin.output().includes("the secrets changed: 1 entry"),
			"the file's secret, applied",
			NOTICED_WITHIN_MS,
		);
		assert.deepEqual([await status(url, SECRET), await status(url, OLD_SECRET)], [200, 401]);
	} finally {
		await origin.stop();
	}
});

test("a rotation written in two steps is applied only once the file has settled", {
	timeout: 60_000,
}, async () => {
	const path = join(secretsFolder(), "shared-secret");
	writeFileSync(path, OLD_SECRET);
	const origin = await startOrigin({ SHARED_SECRET: undefined, SHARED_SECRET_FILE: path });
	// What the API gateway sends throughout: the old secret, valid before and after.
	let running = true;
	const refused: number[] = [];
	const loops = Array.from({ length: 4 }, async () => {
		while (running) {
			const answer = await status(origin.url, OLD_SECRET);
			if (answer !== 200) refused.push(answer);
		}
	});
	try {
		// printf %s "$NEW" > f; printf ,%s "$OLD" >> f: the first step alone is a valid list.
		// SIGHUP reads the file at once, between the two steps.
		writeFileSync(path, NEW_SECRET);
		process.kill(origin.child.pid!, "SIGHUP");
		await new Promise((resolve) => setTimeout(resolve, 100));
		appendFileSync(path, `,${OLD_SECRET}`);
		await waitFor(
			() => origin.output().includes("the secrets changed: 2 entries"),
			"the whole rotation, applied",
			NOTICED_WITHIN_MS,
		);
	} finally {
		running = false;
		await Promise.all(loops);
	}
	try {
		assert.deepEqual(refused, [], "the old secret was refused mid-rotation");
		assert.doesNotMatch(origin.output(), /the secrets changed: 1 entry/);
		assert.equal(await status(origin.url, NEW_SECRET), 200);
	} finally {
		await origin.stop();
	}
});

type Door = ReturnType<typeof SharedSecretMiddleware>;

/** A broker with the door and a gateway in this process, for the calls a vault makes. */
async function startInProcess(metrics: boolean, beforeTheBroker?: (door: Door) => void) {
	const door = SharedSecretMiddleware({ secrets: SECRET });
	beforeTheBroker?.(door);
	const broker = new ServiceBroker({
		logger: false,
		metrics: { enabled: metrics },
		middlewares: [door],
	});
	broker.createService({ name: "api", actions: { protectedAction: () => "ok" } });
	const gateway = broker.createService({
		name: "gateway",
		mixins: [ApiGateway],
		settings: {
			port: 0,
			ip: "127.0.0.1",
			routes: [{ path: "/", aliases: { "GET /api/protected": "api.protectedAction" } }],
		},
	}) as unknown as { server: import("node:http").Server };
	await broker.start();
	const url = `http://127.0.0.1:${(gateway.server.address() as { port: number }).port}`;
	return { door, broker, url };
}

test("setSecrets, the call for a vault: new secrets at once, a bad set refused and the old kept", async () => {
	const { door, broker, url } = await startInProcess(false);
	try {
		door.setSecrets([NEW_SECRET, SECRET]);
		assert.deepEqual(
			await Promise.all([
				status(url, NEW_SECRET),
				status(url, SECRET),
				status(url, OLD_SECRET),
			]),
			[200, 200, 401],
		);
		assert.throws(() => door.setSecrets("too-short"), /is 9 characters/);
		assert.throws(() => door.setSecrets(undefined as never), /no secret is set/);
		assert.equal(await status(url, NEW_SECRET), 200, "a refused set changes nothing");
		door.setSecrets(NEW_SECRET);
		assert.equal(await status(url, SECRET), 401);
	} finally {
		await broker.stop();
	}
});

test("after setSecrets, an entry keeps its count only if its position holds the same secret", async () => {
	const { door, broker, url } = await startInProcess(true);
	const accepted = (entry: number) =>
		broker.metrics.getMetric("shared_secret.accepted.total")?.get({ entry })?.value ?? 0;
	// The door copies its counts into the metrics once a second.
	const afterCopy = () => new Promise((resolve) => setTimeout(resolve, 1200));
	try {
		await status(url, SECRET);
		await status(url, SECRET);
		door.setSecrets([SECRET, NEW_SECRET]);
		await status(url, NEW_SECRET);
		await afterCopy();
		assert.deepEqual([accepted(1), accepted(2)], [2, 1], "entry 1 kept its count");
		door.setSecrets([NEW_SECRET, SECRET]);
		await status(url, SECRET);
		await afterCopy();
		assert.deepEqual(
			[accepted(1), accepted(2)],
			[0, 1],
			"both positions changed: counted anew",
		);
	} finally {
		await broker.stop();
	}
});

test("setSecrets before the broker exists (a vault read at start) counts every entry", async () => {
	const { broker, url } = await startInProcess(
		true,
		(door) => door.setSecrets([SECRET, NEW_SECRET]),
	);
	const accepted = (entry: number) =>
		broker.metrics.getMetric("shared_secret.accepted.total")?.get({ entry })?.value;
	try {
		assert.equal(await status(url, NEW_SECRET), 200);
		assert.equal(await status(url, SECRET), 200);
		// The door copies its counts into the metrics once a second.
		await new Promise((resolve) => setTimeout(resolve, 1200));
		assert.deepEqual([accepted(1), accepted(2)], [1, 1]);
	} finally {
		await broker.stop();
	}
});
