/**
 * The comparison alone: equal only for a configured secret, whatever else
 * arrives, and it never throws.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { createSecretMatcher } from "../middleware.ts";
import { OLD_SECRET, SECRET } from "./origin.ts";

test("matches each configured secret exactly", () => {
	const matches = createSecretMatcher([SECRET, OLD_SECRET]);
	assert.equal(matches(SECRET), true);
	assert.equal(matches(OLD_SECRET), true);
});

test("refuses near misses: prefix, suffix, case, one byte off, the list joined", () => {
	const matches = createSecretMatcher([SECRET, OLD_SECRET]);
	const nearMisses = [
		"",
		SECRET.slice(0, -1),
		SECRET.slice(1),
		`${SECRET}0`,
		`${SECRET}\0`,
		`${SECRET}${"\0".repeat(256 - SECRET.length)}`,
		SECRET.toUpperCase(),
		`${SECRET.slice(0, 10)}${SECRET[10] === "a" ? "b" : "a"}${SECRET.slice(11)}`,
		` ${SECRET}`,
		`${SECRET},${OLD_SECRET}`,
		`${SECRET}, ${SECRET}`
	];
	for (const value of nearMisses) assert.equal(matches(value), false, JSON.stringify(value));
});

test("refuses non-ASCII that a byte-length or UTF-16-length check would let through", () => {
	const matches = createSecretMatcher([SECRET]);
	// Same UTF-16 length as the secret, more bytes.
	assert.equal(matches(`${SECRET.slice(0, -1)}ü`), false);
	// Characters whose low byte is an ASCII letter of the secret.
	const lowByteTwins = [...SECRET].map(char => String.fromCharCode(0x100 + char.charCodeAt(0))).join("");
	assert.equal(matches(lowByteTwins), false);
	// Latin-1 as Node decodes raw header bytes >= 0x80.
	assert.equal(matches(Buffer.from([0xc3, 0xbc, 0xff]).toString("latin1")), false);
	// A lone surrogate cannot be encoded; it must not throw either.
	assert.equal(matches(`${SECRET.slice(0, -1)}\ud800`), false);
});

test("never throws, whatever it is given", () => {
	const matches = createSecretMatcher([SECRET]);
	const odd: unknown[] = [undefined, null, 0, 1n, {}, [SECRET], [SECRET, SECRET], Symbol("s"), () => SECRET, "x".repeat(1 << 20)];
	for (const value of odd) assert.equal(matches(value), false, String(typeof value));
	// A seeded stream of random UTF-16 strings of random lengths.
	let seed = 0x5eed;
	const random = () => ((seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32);
	for (let i = 0; i < 5000; i++) {
		const length = Math.floor(random() * 300);
		let value = "";
		for (let j = 0; j < length; j++) value += String.fromCharCode(Math.floor(random() * 0x10000));
		assert.equal(matches(value), false);
	}
});

test("a secret longer than the compare width still matches only itself", () => {
	const long = `${SECRET}${SECRET}${SECRET}${SECRET}${SECRET}`; // 320 characters
	const matches = createSecretMatcher([long]);
	assert.equal(matches(long), true);
	assert.equal(matches(long.slice(0, 256)), false);
	assert.equal(matches(long.slice(0, -1)), false);
	assert.equal(matches(`${long}a`), false);
});

test("compares against every secret: a match on the last one counts", () => {
	const secrets = Array.from({ length: 5 }, (_, i) => `${SECRET.slice(0, 60)}${i}${i}${i}${i}`);
	const matches = createSecretMatcher(secrets);
	for (const secret of secrets) assert.equal(matches(secret), true, secret);
});
