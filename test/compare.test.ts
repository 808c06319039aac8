/**
 * The comparison alone: it names the configured secret a value equals (its
 * entry number, 1 for the first) and 0 for anything else, whatever arrives,
 * and it never throws.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { createSecretMatcher } from "../middleware.ts";
import { OLD_SECRET, SECRET } from "./origin.ts";

test("names each configured secret by its entry number", () => {
	const whichSecret = createSecretMatcher([SECRET, OLD_SECRET]);
	assert.equal(whichSecret(SECRET), 1);
	assert.equal(whichSecret(OLD_SECRET), 2);
});

test("refuses near misses: prefix, suffix, case, one byte off, the list joined", () => {
	const whichSecret = createSecretMatcher([SECRET, OLD_SECRET]);
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
		`${SECRET}, ${SECRET}`,
	];
	for (const value of nearMisses) assert.equal(whichSecret(value), 0, JSON.stringify(value));
});

test("refuses non-ASCII that a byte-length or UTF-16-length check would let through", () => {
	const whichSecret = createSecretMatcher([SECRET]);
	// Same UTF-16 length as the secret, more bytes.
	assert.equal(whichSecret(`${SECRET.slice(0, -1)}ü`), 0);
	// Characters whose low byte is an ASCII letter of the secret.
	const lowByteTwins = [...SECRET].map((char) => String.fromCharCode(0x100 + char.charCodeAt(0)))
		.join("");
	assert.equal(whichSecret(lowByteTwins), 0);
	// Latin-1 as Node decodes raw header bytes >= 0x80.
	assert.equal(whichSecret(Buffer.from([0xc3, 0xbc, 0xff]).toString("latin1")), 0);
	// A lone surrogate cannot be encoded; it must not throw either.
	assert.equal(whichSecret(`${SECRET.slice(0, -1)}\ud800`), 0);
});

test("never throws, whatever it is given", () => {
	const whichSecret = createSecretMatcher([SECRET]);
	const odd: unknown[] = [
		undefined,
		null,
		0,
		1n,
		{},
		[SECRET],
		[SECRET, SECRET],
		Symbol("s"),
		() => SECRET,
		"x".repeat(1 << 20),
	];
	for (const value of odd) assert.equal(whichSecret(value), 0, String(typeof value));
	// A seeded stream of random UTF-16 strings of random lengths.
	let seed = 0x5eed;
	const random = () => ((seed = (seed * 1103515245 + 12345) >>> 0) / 2 ** 32);
	for (let i = 0; i < 5000; i++) {
		const length = Math.floor(random() * 300);
		let value = "";
		for (let j = 0; j < length; j++) {
			value += String.fromCharCode(Math.floor(random() * 0x10000));
		}
		assert.equal(whichSecret(value), 0);
	}
});

test("a secret longer than the compare width still matches only itself", () => {
	const long = `${SECRET}${SECRET}${SECRET}${SECRET}${SECRET}`; // 320 characters
	const whichSecret = createSecretMatcher([long]);
	assert.equal(whichSecret(long), 1);
	assert.equal(whichSecret(long.slice(0, 256)), 0);
	assert.equal(whichSecret(long.slice(0, -1)), 0);
	assert.equal(whichSecret(`${long}a`), 0);
});

test("compares against every secret: each entry, the last one too, is named by its number", () => {
	const secrets = Array.from({ length: 5 }, (_, i) => `${SECRET.slice(0, 60)}${i}${i}${i}${i}`);
	const whichSecret = createSecretMatcher(secrets);
	secrets.forEach((secret, index) => assert.equal(whichSecret(secret), index + 1, secret));
});
