/**
 * `npm test` and `bun run test`: every test file, on the runtime that runs this
 * script. Node runs them with its own test runner (node:test) and tsx for the
 * TypeScript; Bun with `bun test`, which runs the same node:test files. (Deno
 * has its own task: `deno task test`, in deno.json.)
 *
 * Not a test, and plain JavaScript, for the same reasons as setup.mjs.
 */
import { spawnSync } from "node:child_process";

const [command, ...args] = process.versions.bun
	// Bun's default of 5 s per test and hook is too short for a whole origin's start and stop.
	? [process.execPath, "test", "--timeout", "120000", "test/"]
	: [process.execPath, "--import", "tsx", "--test", "test/*.test.ts"];
const { status } = spawnSync(command, args, { stdio: "inherit" });
process.exit(status ?? 1);
