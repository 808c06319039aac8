/**
 * Part of `npm run bench`: what each way of running the origin costs, so you
 * can choose one. For each row of docs/run-and-deploy.md's table, and the bundle:
 * the time from spawn to the "Origin ready" line, the resident memory (RSS) at
 * that moment, and the RSS after REQUESTS requests with the secret. Medians of
 * RUNS starts. RSS is the whole process tree's (`npm start` runs tsx, which
 * runs Node in a child process).
 *
 * Deno and Bun are looked up on the PATH, or taken from DENO and BUN; a runtime
 * that is not there is reported as missing, not failed. Linux only: it reads
 * /proc. Measured, never asserted.
 */
import { execFileSync } from "node:child_process";
import { copyFileSync, mkdtempSync, readdirSync, readFileSync } from "node:fs";
import { Agent, request } from "node:http";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { projectRoot, SECRET, startOrigin } from "./origin.ts";

const RUNS = Number(process.env.BENCH_RUNTIME_RUNS ?? 5);
const REQUESTS = Number(process.env.BENCH_RUNTIME_REQUESTS ?? 5000);

function find(name: string, fromEnvironment: string | undefined): string | undefined {
	if (fromEnvironment) return fromEnvironment;
	try {
		return execFileSync("sh", ["-c", `command -v ${name}`], { encoding: "utf8" }).trim() ||
			undefined;
	} catch {
		return undefined;
	}
}
const deno = find("deno", process.env.DENO);
const bun = find("bun", process.env.BUN);

// The bundle, built by `npm run build` as docs/run-and-deploy.md says, alone in a folder.
execFileSync("npm", ["run", "--silent", "build"], { cwd: projectRoot, stdio: "ignore" });
const bundleDir = mkdtempSync(join(tmpdir(), "origin-bundle-"));
const bundle = join(bundleDir, "index.js");
copyFileSync(join(projectRoot, "dist/index.js"), bundle);

const tsx = join(projectRoot, "node_modules/.bin/tsx");
const denoFlags = [
	"run",
	"--allow-net=0.0.0.0",
	"--allow-env",
	"--allow-read=.",
	"--allow-sys=hostname,networkInterfaces",
];
const ways: { name: string; command?: string[]; cwd?: string }[] = [
	{ name: "tsx (`npm start`)", command: [tsx, "index.ts"], cwd: projectRoot },
	{
		name: `Node ${process.version}, type stripping`,
		command: process.features.typescript ? [process.execPath, "index.ts"] : undefined,
		cwd: projectRoot,
	},
	{
		name: `the bundle on Node ${process.version}`,
		command: [process.execPath, bundle],
		cwd: bundleDir,
	},
	{
		name: "Deno",
		command: deno ? [deno, ...denoFlags, "index.ts"] : undefined,
		cwd: projectRoot,
	},
	{
		name: "Bun",
		command: bun ? [bun, "--no-env-file", "index.ts"] : undefined,
		cwd: projectRoot,
	},
	{
		name: "the bundle on Bun",
		command: bun ? [bun, "--no-env-file", bundle] : undefined,
		cwd: bundleDir,
	},
];

/** Resident memory of a process and all its descendants, in MiB. */
function treeRssMiB(pid: number): number {
	const children = new Map<number, number[]>();
	for (const entry of readdirSync("/proc")) {
		if (!/^\d+$/.test(entry)) continue;
		try {
			const parent = Number(
				readFileSync(`/proc/${entry}/stat`, "utf8").split(") ")[1].split(" ")[1],
			);
			children.set(parent, [...(children.get(parent) ?? []), Number(entry)]);
		} catch {
			// The process ended while we looked.
		}
	}
	let kib = 0;
	const visit = (id: number) => {
		try {
			kib += Number(
				/VmRSS:\s+(\d+)/.exec(readFileSync(`/proc/${id}/status`, "utf8"))?.[1] ?? 0,
			);
		} catch {
			// Ended.
		}
		for (const child of children.get(id) ?? []) visit(child);
	};
	visit(pid);
	return kib / 1024;
}

async function load(url: string, amount: number): Promise<void> {
	const agent = new Agent({ keepAlive: true, maxSockets: 16 });
	let sent = 0;
	const connection = async () => {
		while (sent++ < amount) {
			await new Promise<void>((resolve, reject) =>
				request(
					`${url}/api/protected`,
					{ agent, headers: { "x-shared-secret": SECRET } },
					(response) => response.resume().once("end", resolve),
				)
					.once("error", reject)
					.end()
			);
		}
	};
	await Promise.all(Array.from({ length: 16 }, connection));
	agent.destroy();
}

const median = (values: number[]) =>
	[...values].sort((a, b) => a - b)[Math.floor(values.length / 2)];

console.log(
	`\nWhat each way of running costs: median of ${RUNS} starts; RSS of the whole process tree.\n`,
);
console.log(`| way of running | ready in | RSS at ready | RSS after ${REQUESTS} requests |`);
console.log("| --- | --- | --- | --- |");
for (const way of ways) {
	if (!way.command) {
		console.log(`| ${way.name} | not found here | | |`);
		continue;
	}
	const ready: number[] = [];
	const rssAtReady: number[] = [];
	const rssAfter: number[] = [];
	for (let run = 0; run < RUNS; run++) {
		const spawnedAt = performance.now();
		const origin = await startOrigin({ LOGLEVEL: "info" }, {
			command: way.command,
			cwd: way.cwd,
		});
		ready.push(performance.now() - spawnedAt);
		rssAtReady.push(treeRssMiB(origin.child.pid!));
		await load(origin.url, REQUESTS);
		rssAfter.push(treeRssMiB(origin.child.pid!));
		await origin.stop();
	}
	console.log(
		`| ${way.name} | ${median(ready).toFixed(0)} ms | ${median(rssAtReady).toFixed(0)} MiB | ${
			median(rssAfter).toFixed(0)
		} MiB |`,
	);
}
