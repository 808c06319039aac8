/**
 * Fuzz: 10,000 x-shared-secret values over raw sockets, from a seeded generator
 * so that a failure can be replayed (FUZZ_SEED=<seed> npm test).
 * Every answer is a 401, or a 400 where the runtime's own HTTP parser refuses
 * the bytes. Nothing is granted, nothing is 5xx, and afterwards the real
 * secret still works.
 */
import assert from "node:assert/strict";
import { after, before, test } from "node:test";
import { getWithSecretBytes, type Origin, SECRET, startOrigin } from "./origin.ts";

const COUNT = 10_000;
const PARALLEL = 16;
const SEED = Number(process.env.FUZZ_SEED ?? 20261128);

// mulberry32: small, seeded, good enough to spread bytes.
function seededRandom(seed: number) {
	let state = seed >>> 0;
	return () => {
		state = (state + 0x6d2b79f5) >>> 0;
		let t = state;
		t = Math.imul(t ^ (t >>> 15), t | 1);
		t ^= t + Math.imul(t ^ (t >>> 7), t | 61);
		return ((t ^ (t >>> 14)) >>> 0) / 2 ** 32;
	};
}

const random = seededRandom(SEED);
const integer = (below: number) => Math.floor(random() * below);
const secretBytes = Buffer.from(SECRET);

// CR and LF would end the header line and test the framing, not the value.
const noLineBreaks = (bytes: Buffer) =>
	Buffer.from(bytes.map((byte) => (byte === 0x0d || byte === 0x0a ? 0x2e : byte)));

const kinds = {
	"random visible ASCII": () =>
		Buffer.from(Array.from({ length: 1 + integer(300) }, () => 0x21 + integer(0x5e))),
	"random bytes, ASCII and >= 0x80": () =>
		Buffer.from(
			Array.from(
				{ length: 1 + integer(300) },
				() => (random() < 0.5 ? 0x20 + integer(0x5f) : 0x80 + integer(0x80)),
			),
		),
	"the secret with one bit flipped": () => {
		const flipped = Buffer.from(secretBytes);
		flipped[integer(flipped.length)] ^= 1 << integer(8);
		return flipped;
	},
	"a prefix of the secret, then junk": () =>
		Buffer.concat([
			secretBytes.subarray(0, integer(secretBytes.length)),
			Buffer.from(Array.from({ length: 1 + integer(40) }, () => integer(256))),
		]),
};
const names = Object.keys(kinds) as (keyof typeof kinds)[];
const cases = Array.from({ length: COUNT }, (_, index) => {
	const kind = names[index % names.length];
	return { kind, value: noLineBreaks(kinds[kind]()) };
});

let origin: Origin;
before(async () => {
	origin = await startOrigin();
});
after(() => origin.stop());

test(
	`${COUNT} fuzzed secrets (seed ${SEED}): only 401 or a parser's 400, never granted, never 5xx`,
	{ timeout: 60_000 },
	async () => {
		const statuses: Record<number, number> = {};
		let next = 0;
		const worker = async () => {
			while (next < cases.length) {
				const { kind, value } = cases[next++];
				const { status, body } = await getWithSecretBytes(
					origin.port,
					"/api/protected",
					value,
				);
				statuses[status] = (statuses[status] ?? 0) + 1;
				if (status !== 401 && status !== 400) {
					assert.fail(
						`${kind} ${value.toString("hex")} (seed ${SEED}) got ${status}: ${body}`,
					);
				}
			}
		};
		await Promise.all(Array.from({ length: PARALLEL }, worker));
		assert.equal((statuses[401] ?? 0) + (statuses[400] ?? 0), COUNT, JSON.stringify(statuses));
		// Most values are plain bytes a parser accepts: the door, not the parser, answered them.
		assert.ok((statuses[401] ?? 0) > COUNT / 2, JSON.stringify(statuses));
	},
);

test("afterwards the real secret still gets in", async () => {
	const response = await fetch(`${origin.url}/api/protected`, {
		headers: { "x-shared-secret": SECRET },
	});
	assert.equal(response.status, 200);
	assert.deepEqual(await response.json(), { message: "Access granted" });
});
