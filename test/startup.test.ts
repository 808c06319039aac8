/**
 * Fail closed at start. SharedSecretMiddleware(options) checks its options at the call, so
 * those cases run in-process. A few cases spawn index.ts, to see its one FATAL line and exit 1.
 */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { ServiceBroker } from "moleculer";
import { SharedSecretMiddleware, type SharedSecretOptions } from "../middleware.ts";
import { join } from "node:path";
import { emptyFolder, runOriginToExit, SECRET } from "./origin.ts";

const refused: [string, SharedSecretOptions, RegExp][] = [
	["no secret", { secrets: undefined }, /no secret is set/],
	["an empty secret", { secrets: "" }, /no secret is set/],
	["a blank secret", { secrets: "   " }, /no secret is set/],
	["an empty list", { secrets: [] }, /no secret is set/],
	["31 characters", { secrets: SECRET.slice(0, 31) }, /entry 1 of 1 is 31 characters/],
	["a short old secret", { secrets: `${SECRET},tooShortOldSecret` }, /entry 2 of 2 is 17/],
	["a trailing comma", { secrets: `${SECRET},` }, /entry 2 of 2 is 0 characters/],
	["a space inside", {
		secrets: `${SECRET.slice(0, 20)} ${SECRET.slice(20)}`,
	}, /holds a space or a non-ASCII character/],
	["non-ASCII", { secrets: `${SECRET}ü` }, /holds a space or a non-ASCII character/],
	["a placeholder", { secrets: "changeme".repeat(5) }, /uses fewer than 8 different characters/],
	["the same entry twice", { secrets: [SECRET, SECRET] }, /entry 2 of 2 is the same as entry 1/],
	[
		"a malformed public path",
		{ secrets: SECRET, publicPaths: "/health" },
		/publicPaths item "\/health" is not "METHOD \/path"/,
	],
	[
		"a public path with a query",
		{ secrets: SECRET, publicPaths: ["GET /health?x=1"] },
		/publicPaths item "GET \/health\?x=1" is not/,
	],
	// moleculer-web routes OPTIONS as another method: such an entry would open that one.
	[
		"an OPTIONS public path",
		{ secrets: SECRET, publicPaths: "GET /health,OPTIONS /api/protected" },
		/"OPTIONS \/api\/protected" opens every method: answer CORS preflights at the API gateway/,
	],
	["a report period of 0", { secrets: SECRET, reportSeconds: 0 }, /reportSeconds is 0/],
	["a quiet time of 1.5", { secrets: SECRET, quietSeconds: 1.5 }, /quietSeconds is 1.5/],
];

describe("SharedSecretMiddleware(options) throws at the call", () => {
	for (const [name, options, expected] of refused) {
		test(name, () => {
			assert.throws(() => SharedSecretMiddleware(options), (error: Error) => {
				assert.match(error.message, expected);
				// One line that says what to fix, without a stack trace or the value.
				assert.doesNotMatch(error.stack ?? "", /\n\s+at /);
				for (const part of [options.secrets ?? []].flat().join(",").split(/[, ]/)) {
					if (part.length >= 8) assert.ok(!error.message.includes(part), "the value");
				}
				return true;
			});
		});
	}

	test("strong secrets, as a string or a list, and public paths pass", () => {
		SharedSecretMiddleware({ secrets: SECRET });
		SharedSecretMiddleware({ secrets: [SECRET, SECRET.toUpperCase()], publicPaths: [] });
		SharedSecretMiddleware({ secrets: ` ${SECRET} `, publicPaths: "GET /health, POST /login" });
	});
});

test("the bare form, without the call, stops the broker with the call to write", () => {
	// Moleculer calls a function in `middlewares` with the broker; when that throws, the broker
	// logs a FATAL line and exits. process.exit is stubbed, so the test runner lives on.
	const lines: string[] = [];
	const exit = process.exit;
	process.exit = ((code: number) => {
		throw new Error(`process.exit(${code})`);
	}) as typeof process.exit;
	try {
		assert.throws(() =>
			new ServiceBroker({
				logger: {
					type: "Console",
					options: {
						formatter(_level: string, args: unknown[]) {
							lines.push(args.map(String).join(" "));
							return [];
						},
					},
				},
				middlewares: [SharedSecretMiddleware as never],
			}), /process\.exit\(1\)/);
	} finally {
		process.exit = exit;
	}
	assert.match(
		lines.join("\n"),
		/must be called: middlewares: \[SharedSecretMiddleware\(\{ secrets \}\)\]/,
	);
});

// index.ts turns the door's error into one FATAL line and exit 1. Each case is its own process.
const exits: [string, Record<string, string | undefined>, RegExp][] = [
	["SHARED_SECRET unset", { SHARED_SECRET: undefined }, /FATAL origin: .*no secret is set/],
	["SHARED_SECRET short", { SHARED_SECRET: SECRET.slice(0, 12) }, /is 12 characters/],
	["PUBLIC_PATHS malformed", { SHARED_SECRET: SECRET, PUBLIC_PATHS: "/health" }, /publicPaths/],
	[
		"SHARED_SECRET and SHARED_SECRET_FILE both set",
		{ SHARED_SECRET: SECRET, SHARED_SECRET_FILE: "/run/secrets/shared-secret" },
		/FATAL origin: Set SHARED_SECRET or SHARED_SECRET_FILE, not both\./,
	],
	[
		"SHARED_SECRET_FILE missing",
		// In the origins' own folder, which Deno's test permissions let it read.
		{ SHARED_SECRET_FILE: join(emptyFolder, "no-such-file") },
		/FATAL origin: SHARED_SECRET_FILE \S+no-such-file cannot be read \(ENOENT\)\./,
	],
];

describe("the origin refuses to start", { concurrency: true }, () => {
	for (const [name, env, expected] of exits) {
		test(name, async () => {
			const { code, output } = await runOriginToExit(env);
			assert.equal(code, 1, output);
			assert.match(output, expected);
			assert.equal(output.trim().split("\n").length, 1, output);
			assert.doesNotMatch(output, /Origin ready|API Gateway listening/);
			if (env.SHARED_SECRET) assert.ok(!output.includes(env.SHARED_SECRET), "the value");
		});
	}
});
