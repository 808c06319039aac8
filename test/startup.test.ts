/**
 * Fail closed at start. SharedSecretMiddleware(options) checks its options at the call, so
 * those cases run in-process. A few cases spawn index.ts, to see its one FATAL line and exit 1.
 */
import assert from "node:assert/strict";
import { describe, test } from "node:test";
import { ServiceBroker } from "moleculer";
import { SharedSecretMiddleware, type SharedSecretOptions } from "../middleware.ts";
import { join } from "node:path";
import { once } from "node:events";
import { type AddressInfo, createServer } from "node:net";
import { spawn } from "node:child_process";
import { appendFileSync, cpSync, mkdtempSync, readFileSync, symlinkSync } from "node:fs";
import { emptyFolder, projectRoot, runOriginToExit, SECRET, waitFor } from "./origin.ts";

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

// index.ts checks every variable before anything starts: one FATAL line that names the variable,
// and exit 1. index.ts is the program itself, so each row is a process of its own.
const exits: [string, Record<string, string | undefined>, RegExp][] = [
	[
		"SHARED_SECRET unset",
		{ SHARED_SECRET: undefined },
		/FATAL origin: Neither SHARED_SECRET nor SHARED_SECRET_FILE is set\. Run `npm run setup` to write \.env with a fresh secret, or make one: openssl rand/,
	],
	[
		"SHARED_SECRET_SIGNATURES unknown",
		{ SHARED_SECRET_SIGNATURES: "sometimes" },
		/FATAL origin: SHARED_SECRET_SIGNATURES is "sometimes"; it needs accept or require\./,
	],
	[
		"SHARED_SECRET short",
		{ SHARED_SECRET: "abc" },
		/FATAL origin: SHARED_SECRET: secrets entry 1 of 1 is 3 characters; it needs 32\. Make one/,
	],
	[
		"SHARED_SECRET with a short old entry",
		{ SHARED_SECRET: `${SECRET},short` },
		/FATAL origin: SHARED_SECRET: secrets entry 2 of 2 is 5 characters/,
	],
	[
		"PUBLIC_PATHS malformed",
		{ PUBLIC_PATHS: "/health" },
		/FATAL origin: PUBLIC_PATHS: publicPaths item "\/health" is not "METHOD \/path"\./,
	],
	[
		"SHARED_SECRET_REPORT_SECONDS=1m",
		{ SHARED_SECRET_REPORT_SECONDS: "1m" },
		/FATAL origin: SHARED_SECRET_REPORT_SECONDS is "1m"; it needs whole seconds, 1 or more\./,
	],
	[
		"SHARED_SECRET_QUIET_SECONDS=0",
		{ SHARED_SECRET_QUIET_SECONDS: "0" },
		/FATAL origin: SHARED_SECRET_QUIET_SECONDS is "0"; it needs whole seconds/,
	],
	["PORT=abc", { PORT: "abc" }, /FATAL origin: PORT is "abc"; it needs a whole number from 0/],
	["PORT=70000", { PORT: "70000" }, /FATAL origin: PORT is "70000"; it needs a whole number/],
	["METRICS_PORT=xyz", { METRICS_PORT: "xyz" }, /FATAL origin: METRICS_PORT is "xyz"; it needs/],
	["METRICS_HOST=a b", { METRICS_HOST: "a b" }, /FATAL origin: METRICS_HOST is "a b"; it needs/],
	[
		"LOGLEVEL=verbose",
		{ LOGLEVEL: "verbose" },
		/FATAL origin: LOGLEVEL is "verbose"; it needs fatal, error, warn, info, debug, trace\./,
	],
	["SERVICES=api2", { SERVICES: "api2" }, /FATAL origin: SERVICES is "api2"; it needs gateway/],
	[
		"TRANSPORTER=bogus://x, never shown",
		{ TRANSPORTER: "bogus://user:hunter2hunter2@x" },
		/FATAL origin: TRANSPORTER cannot be used; it needs nats:\/\/, /,
	],
	[
		"NATS_TOKEN without a NATS transporter",
		{ NATS_TOKEN: "token" },
		/FATAL origin: NATS_TOKEN is set, but TRANSPORTER is no nats:\/\/ URL/,
	],
	[
		"SHARED_SECRET and SHARED_SECRET_FILE both set",
		{ SHARED_SECRET: SECRET, SHARED_SECRET_FILE: "/run/secrets/shared-secret" },
		/FATAL origin: Set SHARED_SECRET or SHARED_SECRET_FILE, not both\./,
	],
	[
		"SHARED_SECRET_FILE missing",
		// In the origins' own folder, which Deno's test permissions let it read.
		{ SHARED_SECRET: undefined, SHARED_SECRET_FILE: join(emptyFolder, "no-such-file") },
		/FATAL origin: SHARED_SECRET_FILE \S+no-such-file cannot be read \(ENOENT\)\./,
	],
];

describe("the origin refuses to start", { concurrency: true }, () => {
	for (const [name, env, expected] of exits) {
		test(name, async () => {
			const { code, output } = await runOriginToExit({ SHARED_SECRET: SECRET, ...env });
			assert.equal(code, 1, output);
			assert.match(output, expected);
			assert.equal(output.trim().split("\n").length, 1, output);
			assert.doesNotMatch(output, /Origin ready|API Gateway listening/);
			for (const secret of [SECRET, env.SHARED_SECRET, "hunter2"]) {
				if (secret && secret.length > 5) assert.ok(!output.includes(secret), "a secret");
			}
		});
	}
});

test("a PORT in use ends the start with one line that names it", async () => {
	// Another process's server holds the port.
	const holder = createServer().listen(0, "0.0.0.0");
	await once(holder, "listening");
	const { port } = holder.address() as AddressInfo;
	try {
		const { code, output } = await runOriginToExit({
			SHARED_SECRET: SECRET,
			PORT: String(port),
		});
		assert.equal(code, 1, output);
		const fatal = output.split("\n").filter((line) => /FATAL|at /.test(line));
		assert.deepEqual(fatal.length, 1, output);
		assert.match(
			fatal[0]!,
			new RegExp(`FATAL origin: PORT ${port} is in use: set PORT to a free one\\.`),
		);
		assert.doesNotMatch(output, /Origin ready/);
	} finally {
		holder.close();
	}
});

// The README's `npm run dev`, as package.json gives it: `tsx watch index.ts`, in a copy of the
// project, so that a change to a file of its own can be made. Node only: tsx is Node's loader.
const onNode = !("Deno" in globalThis) && !process.versions.bun;
test("npm run dev (tsx watch) restarts the origin when a file changes", {
	skip: !onNode && "tsx watch runs on Node",
	timeout: 60_000,
}, async () => {
	const folder = mkdtempSync(join(emptyFolder, "dev-"));
	for (const file of ["index.ts", "middleware.ts", "service.ts", "package.json"]) {
		cpSync(join(projectRoot, file), join(folder, file));
	}
	symlinkSync(join(projectRoot, "node_modules"), join(folder, "node_modules"));
	const script = /"dev": "tsx (watch [^"]+)"/.exec(
		readFileSync(join(folder, "package.json"), "utf8"),
	);
	assert.ok(script, "package.json has a dev script that runs tsx watch");
	const tsx = join(projectRoot, "node_modules/tsx/dist/cli.mjs");
	const child = spawn(process.execPath, [tsx, ...script[1]!.split(" ")], {
		cwd: folder,
		env: { ...process.env, SHARED_SECRET: SECRET, PORT: "0", LOGLEVEL: "info" },
		stdio: ["ignore", "pipe", "pipe"],
		detached: true,
	});
	let output = "";
	child.stdout!.on("data", (chunk) => (output += chunk));
	child.stderr!.on("data", (chunk) => (output += chunk));
	const starts = () => output.split("Origin ready at").length - 1;
	try {
		await waitFor(() => starts() === 1, "the first start", 30_000);
		// tsx learns what to watch from the run it started: a change may come before it
		// watches, so one is made each second until the origin restarts.
		const change = () => appendFileSync(join(folder, "service.ts"), "\n// A change.\n");
		const changes = setInterval(change, 1000);
		try {
			await waitFor(() => starts() === 2, "the start after a change", 30_000);
		} finally {
			clearInterval(changes);
		}
	} finally {
		// The whole group: tsx watch and the origin it started.
		process.kill(-child.pid!, "SIGKILL");
	}
});
