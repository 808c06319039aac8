/**
 * Part of `npm run bench`: does the comparison's time tell an attacker anything
 * about the secret? A dudect-style check (Reparaz, Balasch and Verbauwhede,
 * "Dude, is my code constant time?", 2017): time the comparison on two classes
 * of input, interleaved in random order, and ask Welch's t-test whether their
 * means differ. |t| above 4.5 says they do, with overwhelming confidence; below
 * it, this many samples found no difference.
 *
 * The classes, all the secret's length, all wrong:
 *   - a near miss sharing the secret's first 60 characters (an early-exit
 *     compare would take longest on it);
 *   - a near miss sharing its last 60;
 *   - random hex;
 * and, with two secrets configured, the right one as either entry.
 *
 * It measures the comparison in this process, not the network: it says that
 * `createSecretMatcher` takes the same time whatever part of the secret a guess
 * gets right, and nothing about what a remote attacker can or cannot measure
 * through HTTP, the event loop and a gateway. Measured, never asserted.
 */
import { randomBytes, randomInt } from "node:crypto";
import { createSecretMatcher } from "../middleware.ts";
import { SECRET } from "./origin.ts";

const CALLS_PER_PAIR = Number(process.env.LEAK_CALLS ?? 1_000_000);
const POOL = 1024;
const CHUNK = 65_536;
const THRESHOLD = 4.5;
// Rotations (`new,old`): POOL pairs of random secrets as long as SECRET, each
// pair with its own matcher. One fixed pair alone showed |t| from 0.5 to 7
// between its two values over six runs, and with the positions swapped the
// faster value stayed the faster one (in one of two runs; the other showed
// nothing): an effect of the particular bytes, below a nanosecond, not of
// which entry matched. Many pairs average it out, so what is left is the
// position.
const rotations = Array.from({ length: 1024 }, () => {
	const [current, old] = [
		randomBytes(SECRET.length / 2).toString("hex"),
		randomBytes(SECRET.length / 2).toString("hex"),
	];
	return { current, old, whichOfTwo: createSecretMatcher([current, old]) };
});

const hex = (characters: number) => randomBytes(characters).toString("hex").slice(0, characters);
function differentHex(from: string): string {
	for (;;) {
		const candidate = hex(from.length);
		if ([...candidate].every((char, index) => char !== from[index])) return candidate;
	}
}

const makers: Record<string, () => string> = {
	"first 60 shared": () => SECRET.slice(0, 60) + differentHex(SECRET.slice(60)),
	"last 60 shared": () => differentHex(SECRET.slice(0, 4)) + SECRET.slice(4),
	random: () => hex(SECRET.length),
	// An A/A check: two classes drawn alike must show no difference.
	"random, again": () => hex(SECRET.length),
};
// During a rotation: the right secret, as entry 1 or as entry 2 of its pair.
const rotationClasses = {
	"entry 1 of 2": rotations.map((pair) => Buffer.from(pair.current, "latin1")),
	"entry 2 of 2": rotations.map((pair) => Buffer.from(pair.old, "latin1")),
};
// Each class is kept as bytes. Before each timed call, the value is decoded
// into a fresh string, as Node's HTTP parser makes one for every request: flat
// (a string built with + is a V8 "rope", flattened on first use; mixing the two
// kinds alone gives classes that differ in nothing else a large |t|).
const classes: Record<string, Buffer[]> = Object.fromEntries(
	Object.entries(makers).map((
		[name, make],
	) => [name, Array.from({ length: POOL }, () => Buffer.from(make(), "latin1"))]),
);

const whichSecret = createSecretMatcher([SECRET]);
// The value at pool index i is checked by pair i's matcher.
const whichOfTwo = (value: string, index: number) => rotations[index].whichOfTwo(value);

/** Welch's t over the samples at or below the pooled 99th percentile (dudect crops outliers too). */
function welch(a: Float64Array, b: Float64Array): number {
	const pooled = new Float64Array(a.length + b.length);
	pooled.set(a);
	pooled.set(b, a.length);
	const cut = pooled.sort()[Math.floor(pooled.length * 0.99)];
	const stats = (samples: Float64Array) => {
		let n = 0;
		let mean = 0;
		let m2 = 0;
		for (const x of samples) {
			if (x > cut) continue;
			n++;
			const delta = x - mean;
			mean += delta / n;
			m2 += delta * (x - mean);
		}
		return { n, mean, variance: m2 / (n - 1) };
	};
	const [x, y] = [stats(a), stats(b)];
	return (x.mean - y.mean) / Math.sqrt(x.variance / x.n + y.variance / y.n);
}

function measurePair(
	compare: (value: string, index: number) => unknown,
	first: Buffer[],
	second: Buffer[],
): number {
	const length = SECRET.length;
	const times = [new Float64Array(2 * CALLS_PER_PAIR), new Float64Array(2 * CALLS_PER_PAIR)];
	const counts = [0, 0];
	const chunk = Buffer.alloc(CHUNK * length);
	const chosen = new Uint8Array(CHUNK);
	const indexes = new Uint16Array(CHUNK);
	for (let done = 0; done < 2 * CALLS_PER_PAIR; done += CHUNK) {
		// Random interleaving, so a drift in the machine's speed hits both
		// classes alike. The chunk's values are copied side by side first, so
		// each call reads the next bytes of one buffer, whatever its class:
		// values read from each class's own pool gave |t| ≈ 20 between two
		// pools of random values, from where they sat in memory alone.
		for (let slot = 0; slot < CHUNK; slot++) {
			chosen[slot] = randomInt(2);
			indexes[slot] = randomInt(POOL);
			(chosen[slot] === 0 ? first : second)[indexes[slot]].copy(chunk, slot * length);
		}
		for (let slot = 0; slot < Math.min(CHUNK, 2 * CALLS_PER_PAIR - done); slot++) {
			const value = chunk.toString("latin1", slot * length, (slot + 1) * length);
			const start = process.hrtime.bigint();
			compare(value, indexes[slot]);
			const elapsed = Number(process.hrtime.bigint() - start);
			times[chosen[slot]][counts[chosen[slot]]++] = elapsed;
		}
	}
	return welch(times[0].subarray(0, counts[0]), times[1].subarray(0, counts[1]));
}

// Warm up, so that the optimising compiler has settled before anything counts.
const naive = (value: string) => value === SECRET;
for (let call = 0; call < 200_000; call++) {
	const value = classes.random[call % POOL].toString("latin1");
	whichSecret(value);
	whichOfTwo(value, call % POOL);
	naive(value);
}

console.log(
	`\nTiming leak check: ${
		CALLS_PER_PAIR.toLocaleString("en")
	} timed calls per class and pair; |t| > ${THRESHOLD} is a leak.\n`,
);
console.log("| comparison | classes | Welch's t | verdict |");
console.log("| --- | --- | --- | --- |");
const row = (
	compare: (value: string, index: number) => unknown,
	label: string,
	first: string,
	second: string,
) => {
	const pools: Record<string, Buffer[]> = { ...classes, ...rotationClasses };
	const t = measurePair(compare, pools[first], pools[second]);
	const verdict = Math.abs(t) > THRESHOLD ? "DIFFERENT: a leak" : "no difference found";
	console.log(`| ${label} | ${first} vs ${second} | ${t.toFixed(2)} | ${verdict} |`);
};
row(whichSecret, "this template's", "first 60 shared", "last 60 shared");
row(whichSecret, "this template's", "first 60 shared", "random");
row(whichSecret, "this template's", "last 60 shared", "random");
row(whichSecret, "this template's (A/A)", "random", "random, again");
row(whichOfTwo, "this template's, with new,old", "entry 1 of 2", "entry 2 of 2");
// The control: JavaScript's ===, which stops at the first differing character.
// If the check cannot see that leak, its silence above means nothing.
row(naive, "control: ===, stops early", "first 60 shared", "random");
