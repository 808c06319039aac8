/**
 * Ctrl+C on `npm start` stops cleanly, every time. A terminal sends SIGINT to the
 * whole process group: npm, tsx and Node each get it, and npm and tsx may pass it
 * on again, so Node can see it twice. Node only: Deno and Bun have no npm here.
 */
import assert from "node:assert/strict";
import { spawn } from "node:child_process";
import { test } from "node:test";
import { projectRoot, SECRET } from "./origin.ts";

const RUNS = 10;
const underNode = !("Deno" in globalThis) && !("Bun" in globalThis);

// `npm test` names its own npm; run alone, the one on the PATH.
const npm = process.env.npm_execpath ? [process.execPath, process.env.npm_execpath] : ["npm"];

function ctrlC(scriptShell: string): Promise<{ code: number | null; output: string }> {
	const [command, ...args] = [...npm, "start"];
	// detached: a process group of its own, as a terminal's foreground job has.
	const child = spawn(command, args, {
		cwd: projectRoot,
		detached: true,
		env: {
			...process.env,
			npm_config_script_shell: scriptShell,
			SHARED_SECRET: SECRET,
			PORT: "0",
			LOGLEVEL: "info",
		},
		stdio: ["ignore", "pipe", "pipe"],
	});
	let [output, pressed] = ["", false];
	const collect = (chunk: Buffer) => {
		output += chunk;
		if (!pressed && /Origin ready at/.test(output)) {
			pressed = true;
			process.kill(-child.pid!, "SIGINT");
		}
	};
	child.stdout!.on("data", collect);
	child.stderr!.on("data", collect);
	return new Promise((resolve) => child.once("close", (code) => resolve({ code, output })));
}

test(`Ctrl+C on npm start stops cleanly, ${RUNS} times of ${RUNS}`, {
	skip: !underNode && "npm start is Node's",
	timeout: 120_000,
}, async () => {
	for (let run = 1; run <= RUNS; run++) {
		// npm runs the script through sh or, as many set it, bash, which execs tsx:
		// each passes the signal on differently.
		const { code, output } = await ctrlC(run % 2 ? "/bin/sh" : "/bin/bash");
		// The broker's last line: the stop ran to its end. (npm itself ends by the
		// signal it was sent, so its exit code says nothing about the origin's.)
		assert.match(
			output,
			/ServiceBroker is stopped\. Good bye\./,
			`run ${run} (npm: ${code}):\n${output}`,
		);
	}
});
