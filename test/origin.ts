/**
 * Test helpers: start the real origin in its own process and speak real HTTP
 * to it, both through fetch and byte for byte over a raw socket.
 *
 * ORIGIN_COMMAND chooses how the origin runs, so the same tests cover every
 * runtime and the bundle (.ci/run sets it). Unset, it is this Node with tsx.
 */
import { type ChildProcess, spawn } from "node:child_process";
import { type AddressInfo, connect, createServer } from "node:net";
import { mkdtempSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { fileURLToPath } from "node:url";

export const projectRoot = fileURLToPath(new URL("..", import.meta.url));

// Origins start in a folder of their own, with no .env: index.ts reads one from the folder
// it starts in, and `npm run setup` may have left one in the project.
export const emptyFolder = mkdtempSync(join(tmpdir(), "origin-"));

// Two strong secrets, as during a rotation: "new,old".
export const SECRET = "a3f1c9e07b52d48e96f03a7c1b8e25d4c07f9a16e3b2d58f40a9c6e17b3d2f08";
export const OLD_SECRET = "Zq8pL2xV9mN4rT7wK1cF6hJ3sD5gB0yQeUaIoPzXlCvRnMtGbHkSjWdYfE";

export function originCommand(): string[] {
	const command = process.env.ORIGIN_COMMAND;
	if (command) return command.split(" ").filter(Boolean);
	return typeScriptCommand("index.ts");
}

// What Deno's --allow-sys must grant: moleculer reads the host name and the
// network interfaces; with metrics on, it also reads the OS's release, memory,
// uptime and load (docs/run-and-deploy.md says the same).
const DENO_SYS_WITH_METRICS =
	"hostname,networkInterfaces,osRelease,systemMemoryInfo,osUptime,loadavg";

/** How the runtime running the tests runs one of the project's .ts files, from any folder. */
export function typeScriptCommand(file: string): string[] {
	const path = join(projectRoot, file);
	if ("Deno" in globalThis) {
		return [
			process.execPath,
			"run",
			"--allow-net",
			"--allow-env",
			`--allow-read=${projectRoot},.`,
			`--allow-sys=${DENO_SYS_WITH_METRICS}`,
			path,
		];
	}
	// Bun would read .env itself: the tests check that index.ts does.
	if ("Bun" in globalThis) return [process.execPath, "--no-env-file", path];
	// tsx as found from here, since the origin's folder has no node_modules.
	return [process.execPath, "--import", import.meta.resolve("tsx"), path];
}

// Deno's node:child_process reports a child that exits on its own after
// catching a signal as killed by that signal (code null). Under `deno test`
// a clean stop is read from the broker's last log line instead; a test in
// origin.test.ts pins this limit down.
export const exitCodesAreReliable = !("Deno" in globalThis);

export type Origin = {
	url: string;
	port: number;
	child: ChildProcess;
	/** Everything the process printed so far, stdout and stderr. */
	output(): string;
	/** Sends a signal and resolves with the exit code. */
	stop(signal?: NodeJS.Signals): Promise<number | null>;
};

export type Exit = { code: number | null; output: string };

function spawnOrigin(
	env: Record<string, string | undefined>,
	commandLine = originCommand(),
	cwd = process.env.ORIGIN_CWD ?? emptyFolder,
): { child: ChildProcess; output(): string } {
	const [command, ...args] = commandLine;
	// The tests' environment is passed on except the origin's own variables,
	// which each test sets (or leaves unset) on purpose.
	const inherited = { ...process.env };
	for (
		const name of [
			"SHARED_SECRET",
			"SHARED_SECRET_FILE",
			"PUBLIC_PATHS",
			"PORT",
			"LOGLEVEL",
			"TRANSPORTER",
			"SERVICES",
			"NODE_ID",
			"NATS_TOKEN",
			"SHARED_SECRET_REPORT_SECONDS",
			"SHARED_SECRET_QUIET_SECONDS",
			"SHARED_SECRET_SIGNATURES",
			"METRICS_PORT",
			"METRICS_HOST",
		]
	) {
		delete inherited[name];
	}
	const child = spawn(command, args, {
		cwd,
		env: { ...inherited, PORT: "0", LOGLEVEL: "info", ...env },
		stdio: ["ignore", "pipe", "pipe"],
	});
	let output = "";
	child.stdout!.setEncoding("utf8").on("data", (chunk: string) => (output += chunk));
	child.stderr!.setEncoding("utf8").on("data", (chunk: string) => (output += chunk));
	return { child, output: () => output };
}

/**
 * Starts the origin (or another command that serves the same routes) and
 * resolves once it is ready: once it has logged "Origin ready at <url>" (or
 * another `readyLine`), or, with `pollPort` (for LOGLEVEL=warn, which hides
 * that line), once GET /health on that port gets any HTTP answer.
 */
export function startOrigin(
	env: Record<string, string | undefined> = {},
	{
		command = originCommand(),
		cwd = undefined as string | undefined,
		timeoutMs = 30_000,
		pollPort = 0,
		readyLine = /Origin ready at (http:\/\/\S+)/,
	} = {},
): Promise<Origin> {
	const { child, output } = spawnOrigin(
		{ SHARED_SECRET: SECRET, ...env, ...(pollPort && { PORT: String(pollPort) }) },
		command,
		cwd,
	);
	// Deno's child process reports a signal as its signalCode once it is sent (SIGHUP, say),
	// even if the process lives on: only the exit event says it has gone.
	let hasExited = false;
	const exited = new Promise<number | null>((resolve) =>
		child.once("exit", (code) => {
			hasExited = true;
			resolve(code);
		})
	);
	let settled = false;

	return new Promise((resolve, reject) => {
		const fail = (error: Error) => {
			if (settled) return;
			settled = true;
			clearTimeout(timer);
			child.kill("SIGKILL");
			reject(error);
		};
		const ready = (url: string) => {
			if (settled) return;
			settled = true;
			clearTimeout(timer);
			resolve({
				url,
				port: Number(new URL(url).port),
				child,
				output,
				stop(signal = "SIGTERM") {
					// process.kill, since Deno's child.kill sends no second signal.
					if (!hasExited) process.kill(child.pid!, signal);
					return exited;
				},
			});
		};
		const timer = setTimeout(
			() => fail(new Error(`origin not ready in ${timeoutMs} ms:\n${output()}`)),
			timeoutMs,
		);
		child.once(
			"exit",
			(code) =>
				fail(new Error(`origin exited with ${code} before it was ready:\n${output()}`)),
		);

		if (pollPort) {
			const url = `http://127.0.0.1:${pollPort}`;
			const poll = () =>
				fetch(`${url}/health`).then(
					() => ready(url),
					() => !settled && setTimeout(poll, 50),
				);
			poll();
		} else {
			const onData = () => {
				const line = readyLine.exec(output());
				if (line) ready(line[1] ?? "http://localhost:0");
			};
			child.stdout!.on("data", onData);
			child.stderr!.on("data", onData);
		}
	});
}

/** Resolves once `condition()` holds, polling; rejects with `what` after `timeoutMs`. */
export async function waitFor(
	condition: () => boolean,
	what: string,
	timeoutMs = 10_000,
): Promise<void> {
	const deadline = Date.now() + timeoutMs;
	while (!condition()) {
		if (Date.now() > deadline) throw new Error(`timed out waiting for ${what}`);
		await new Promise((resolve) => setTimeout(resolve, 20));
	}
}

/** A port that was free a moment ago, for a server that must be told its port. */
export function freePort(): Promise<number> {
	return new Promise((resolve, reject) => {
		const server = createServer().listen(0, "127.0.0.1", () => {
			const { port } = server.address() as AddressInfo;
			server.close(() => resolve(port));
		});
		server.on("error", reject);
	});
}

/** Runs the origin expecting it to refuse to start; resolves with its exit. */
export function runOriginToExit(
	env: Record<string, string | undefined>,
	timeoutMs = 30_000,
): Promise<Exit> {
	const { child, output } = spawnOrigin(env);
	return new Promise((resolve, reject) => {
		const timer = setTimeout(() => {
			child.kill("SIGKILL");
			reject(new Error(`origin still running after ${timeoutMs} ms:\n${output()}`));
		}, timeoutMs);
		child.once("exit", (code) => {
			clearTimeout(timer);
			resolve({ code, output: output() });
		});
	});
}

export type RawResponse = { status: number; headers: Record<string, string>; body: string };

/**
 * Sends one request byte for byte and reads the answer until the server closes.
 * fetch refuses to send many of the values an attacker would, so this is how
 * the tests send them.
 */
export function rawRequest(
	port: number,
	head: Buffer | string,
	body: Buffer | string = "",
): Promise<RawResponse> {
	return new Promise((resolve, reject) => {
		const socket = connect(port, "127.0.0.1");
		const chunks: Buffer[] = [];
		socket.setTimeout(10_000, () => socket.destroy(new Error("raw request timed out")));
		socket.on("data", (chunk) => chunks.push(chunk));
		socket.on("error", reject);
		socket.on("close", () => {
			const text = Buffer.concat(chunks).toString("latin1");
			const [headText, ...rest] = text.split("\r\n\r\n");
			const [statusLine, ...headerLines] = headText.split("\r\n");
			const headers: Record<string, string> = {};
			for (const line of headerLines) {
				const colon = line.indexOf(":");
				headers[line.slice(0, colon).toLowerCase()] = line.slice(colon + 1).trim();
			}
			let responseBody = rest.join("\r\n\r\n");
			if (headers["transfer-encoding"] === "chunked") responseBody = unchunk(responseBody);
			resolve({ status: Number(statusLine.split(" ")[1]), headers, body: responseBody });
		});
		const bytes = (
			part: Buffer | string,
		) => (typeof part === "string" ? Buffer.from(part, "latin1") : part);
		socket.end(Buffer.concat([bytes(head), bytes(body)]));
	});
}

function unchunk(text: string): string {
	let out = "";
	let rest = text;
	for (;;) {
		const lineEnd = rest.indexOf("\r\n");
		const size = parseInt(rest.slice(0, lineEnd), 16);
		if (!size) return out;
		out += rest.slice(lineEnd + 2, lineEnd + 2 + size);
		rest = rest.slice(lineEnd + 2 + size + 2);
	}
}

/** A GET with one x-shared-secret header whose value is exactly these bytes. */
export function getWithSecretBytes(
	port: number,
	path: string,
	value: Buffer,
): Promise<RawResponse> {
	return rawRequest(
		port,
		Buffer.concat([
			Buffer.from(`GET ${path} HTTP/1.1\r\nHost: origin\r\nx-shared-secret: `, "latin1"),
			value,
			Buffer.from("\r\nConnection: close\r\n\r\n", "latin1"),
		]),
	);
}
