/**
 * Fail closed at start: without a strong SHARED_SECRET the origin never serves.
 * Each case spawns index.ts and watches it exit.
 */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { runOriginToExit, SECRET } from "./origin.ts";

const cases: [string, Record<string, string | undefined>, RegExp][] = [
	["SHARED_SECRET unset", { SHARED_SECRET: undefined }, /SHARED_SECRET is not set/],
	["SHARED_SECRET empty", { SHARED_SECRET: "" }, /SHARED_SECRET is not set/],
	["SHARED_SECRET blank", { SHARED_SECRET: "   " }, /SHARED_SECRET is not set/],
	[
		"SHARED_SECRET of 31 characters",
		{ SHARED_SECRET: SECRET.slice(0, 31) },
		/SHARED_SECRET is 31 characters; it needs at least 32/,
	],
	[
		"SHARED_SECRET with a short old secret",
		{ SHARED_SECRET: `${SECRET},tooShortOldSecret` },
		/SHARED_SECRET entry 2 of 2 is 17 characters/,
	],
	[
		"SHARED_SECRET with a trailing comma",
		{ SHARED_SECRET: `${SECRET},` },
		/SHARED_SECRET entry 2 of 2 is 0 characters/,
	],
	["SHARED_SECRET with a space inside", {
		SHARED_SECRET: `${SECRET.slice(0, 20)} ${SECRET.slice(20)}`,
	}, /SHARED_SECRET holds a space or a non-ASCII character/],
	[
		"SHARED_SECRET with non-ASCII",
		{ SHARED_SECRET: `${SECRET}ü` },
		/SHARED_SECRET holds a space or a non-ASCII character/,
	],
	[
		"SHARED_SECRET that is a placeholder",
		{ SHARED_SECRET: "changeme".repeat(5) },
		/SHARED_SECRET uses fewer than 8 different characters/,
	],
	[
		"PUBLIC_PATHS malformed",
		{ SHARED_SECRET: SECRET, PUBLIC_PATHS: "/health" },
		/PUBLIC_PATHS entry "\/health" is not "METHOD \/exact\/path"/,
	],
	// moleculer-web routes OPTIONS as another method: such an entry would open that one.
	[
		"PUBLIC_PATHS with an OPTIONS entry",
		{ SHARED_SECRET: SECRET, PUBLIC_PATHS: "GET /health,OPTIONS /api/protected" },
		/PUBLIC_PATHS "OPTIONS \/api\/protected" opens every method: answer CORS preflights at the gateway/,
	],
];

// Each case is its own process, so they run side by side.
describe("the origin refuses to start", { concurrency: true }, () => {
	for (const [name, env, expected] of cases) {
		test(name, async () => {
			const { code, output } = await runOriginToExit(env);
			assert.equal(code, 1, output);
			assert.match(output, expected);
			// One line that says what to fix, not a stack trace.
			assert.doesNotMatch(output, /^\s+at /m);
			if (name.startsWith("SHARED_SECRET")) {
				assert.match(output, /Make one with: openssl rand -hex 32/);
			}
			assert.doesNotMatch(output, /Origin ready|API Gateway listening/);
			// The message names the problem, never the value.
			if (env.SHARED_SECRET && env.SHARED_SECRET.trim().length > 0) {
				for (
					const part of env.SHARED_SECRET.split(",").filter((part) => part.length >= 8)
				) {
					assert.ok(!output.includes(part), "the configured value appears in the output");
				}
			}
		});
	}
});
