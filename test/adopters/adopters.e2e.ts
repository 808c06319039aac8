/**
 * `npm run test:adopters`: the door copied into the Moleculer projects people already have,
 * built from the npm registry in a scratch folder (about a minute, most of it the install).
 *
 * - A JavaScript project run by moleculer-runner (moleculer 0.14, moleculer-web 0.10), given
 *   only dist/middleware.cjs, on Node 18 and 20, metrics off and on.
 * - The same project's own `authenticate` and `authorize`, which decide exactly as they do
 *   without the door, while the gateway's consumer still reaches the services.
 * - moleculer-web mounted in Express 4 and Express 5.
 * - middleware.ts unchanged under `tsc --strict`, TypeScript 5 and the repo's own, module
 *   resolution node16 and bundler, against moleculer 0.14 + 0.10 and 0.15 + 0.11.
 *
 * Not part of `npm test` (it installs from the registry); .ci/run runs it.
 */
import assert from "node:assert/strict";
import { execFileSync, spawn, spawnSync } from "node:child_process";
import { createRequire } from "node:module";
import {
	cpSync,
	existsSync,
	mkdirSync,
	mkdtempSync,
	readFileSync,
	rmSync,
	symlinkSync,
	writeFileSync,
} from "node:fs";
import { connect } from "node:net";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { freePort, projectRoot, SECRET } from "../origin.ts";

const here = join(projectRoot, "test/adopters");
const scratch = mkdtempSync(join(tmpdir(), "adopters-"));
const STANDALONE_BODY =
	'{"name":"UnAuthorizedError","message":"No secret provided","code":401,"type":"NO_TOKEN"}';
const CHALLENGE = 'SharedSecret header="x-shared-secret"';

/** A Node major from the registry, as .ci/run gets each runtime: the binary itself. */
function nodeBinary(major: number): string {
	const script = 'readlink -f "$(command -v node)"';
	return execFileSync("npx", ["-y", "-p", `node@${major}`, "--", "sh", "-c", script], {
		encoding: "utf8",
	}).trim();
}

before(() => {
	// The projects' dependencies, as an adopter has them today.
	writeFileSync(
		join(scratch, "package.json"),
		JSON.stringify({
			private: true,
			dependencies: {
				moleculer: "0.14.36",
				"moleculer-web": "0.10.8",
				express: "^4.21.0",
				express5: "npm:express@^5.1.0",
				typescript: "~5.9.0",
				"@types/node": "^22.0.0",
				"@tsconfig/strictest": "2.0.8",
				"moleculer-io": "2.2.0",
				"socket.io-client": "^4.8.0",
				ws: "^8.18.0",
			},
		}),
	);
	execFileSync("npm", ["install", "--no-audit", "--no-fund", "--loglevel=error"], {
		cwd: scratch,
		stdio: "inherit",
	});
	// What a JavaScript project copies: the CommonJS door.
	execFileSync("npm", ["run", "--silent", "build:middleware"], {
		cwd: projectRoot,
		stdio: "inherit",
	});
	for (const project of ["runner", "express", "socketio"]) {
		cpSync(join(here, project), join(scratch, project), { recursive: true });
		cpSync(
			join(projectRoot, "dist/middleware.cjs"),
			join(scratch, project, "shared-secret.cjs"),
		);
	}
});

after(() => rmSync(scratch, { recursive: true, force: true }));

type Running = { url: string; stop(): Promise<void>; output(): string };

/** Starts a command that serves HTTP on `port`, and resolves once the port answers. */
async function serve(
	command: string[],
	cwd: string,
	env: Record<string, string>,
	port: number,
	readyPath: string,
): Promise<Running> {
	const child = spawn(command[0], command.slice(1), {
		cwd,
		env: { ...process.env, ...env },
		stdio: ["ignore", "pipe", "pipe"],
	});
	let output = "";
	child.stdout!.on("data", (chunk) => (output += chunk));
	child.stderr!.on("data", (chunk) => (output += chunk));
	const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
	const url = `http://127.0.0.1:${port}`;
	const deadline = Date.now() + 20_000;
	for (;;) {
		if (child.exitCode !== null) throw new Error(`exited before it served:\n${output}`);
		if (Date.now() > deadline) throw new Error(`not serving after 20 s:\n${output}`);
		const answered = await fetch(`${url}${readyPath}`).then(() => true, () => false);
		if (answered) break;
		await new Promise((resolve) => setTimeout(resolve, 100));
	}
	return {
		url,
		output: () => output,
		stop: async () => void (child.kill("SIGKILL"), await exited),
	};
}

async function request(url: string, headers: Record<string, string> = {}, method = "GET") {
	const response = await fetch(url, { method, headers });
	return {
		status: response.status,
		challenge: response.headers.get("www-authenticate"),
		body: await response.text(),
	};
}

async function post(url: string, headers: Record<string, string>, body: string) {
	const response = await fetch(url, { method: "POST", headers, body });
	return {
		status: response.status,
		challenge: response.headers.get("www-authenticate"),
		body: await response.text(),
	};
}

/** Announces a 50 MB body and keeps sending: resolves with whether the server closed before it was all sent. */
function refusedBodyCloses(
	url: string,
	path: string,
): Promise<{ answer: string; closedEarly: boolean }> {
	const { port } = new URL(url);
	return new Promise((resolve) => {
		const socket = connect(Number(port), "127.0.0.1");
		socket.on("error", () => {});
		let [answer, sent, closed] = ["", 0, false];
		socket.setEncoding("latin1").on("data", (chunk: string) => (answer += chunk));
		socket.once("close", () => {
			closed = true;
			resolve({ answer, closedEarly: sent < 25_000_000 });
		});
		socket.once("connect", async () => {
			socket.write(
				`POST ${path} HTTP/1.1\r\nHost: origin\r\nContent-Length: 50000000\r\n\r\n`,
			);
			const chunk = Buffer.alloc(64 * 1024, "a");
			while (!closed && sent < 50_000_000) {
				if (socket.write(chunk)) sent += chunk.length;
				else await new Promise((next) => setTimeout(next, 20));
			}
			setTimeout(
				() => closed || (socket.destroy(), resolve({ answer, closedEarly: false })),
				3000,
			);
		});
	});
}

describe("a JavaScript project under moleculer-runner, given dist/middleware.cjs (moleculer 0.14)", () => {
	const runner = join(scratch, "runner");
	async function startRunner(node: string, env: Record<string, string>) {
		const port = await freePort();
		const command = [
			node,
			join(scratch, "node_modules/moleculer/bin/moleculer-runner.js"),
			"--config",
			"moleculer.config.js",
			"services",
		];
		return serve(
			command,
			runner,
			{ SHARED_SECRET: SECRET, PUBLIC_PATHS: "", PORT: String(port), ...env },
			port,
			"/api/greeter/hello",
		);
	}

	for (const major of [18, 20]) {
		for (const metrics of ["off", "on"]) {
			test(
				`Node ${major}, metrics ${metrics}: 200 with the secret, 401 without, internal calls untouched`,
				{ timeout: 120_000 },
				async () => {
					const app = await startRunner(nodeBinary(major), { METRICS: metrics });
					try {
						const granted = await request(`${app.url}/api/greeter/hello`, {
							"x-shared-secret": SECRET,
						});
						assert.deepEqual([granted.status, granted.body], [
							200,
							'"Hello Moleculer"',
						]);
						const refused = await request(`${app.url}/api/greeter/hello`);
						assert.deepEqual([refused.status, refused.challenge, refused.body], [
							401,
							CHALLENGE,
							STANDALONE_BODY,
						]);
						// orders.create calls greeter.hello inside the broker.
						const order = await request(`${app.url}/authn/orders`, {
							"x-shared-secret": SECRET,
							authorization: "Bearer app-token",
						}, "POST");
						assert.equal(order.status, 200, order.body);
						assert.equal(JSON.parse(order.body).greeting, "Hello Moleculer");
					} finally {
						await app.stop();
					}
				},
			);
		}
	}

	test("the app's own authenticate and authorize decide as they do without the door", {
		timeout: 120_000,
	}, async () => {
		const node = nodeBinary(20);
		// Every request comes through the gateway: it carries the secret and a consumer.
		const fromGateway = { "x-shared-secret": SECRET, "x-consumer": "acme-corp" };
		const cases: [string, Record<string, string>][] = [
			["/authn/orders", {}],
			["/authn/orders", { authorization: "Bearer wrong" }],
			["/authn/orders", { authorization: "Bearer app-token" }],
			["/authz/orders", {}],
			["/authz/orders", { authorization: "Bearer app-token" }],
		];
		const answers: Record<
			string,
			{ status: number; user?: unknown; consumer?: unknown; body: string }[]
		> = {};
		for (const door of ["off", "on"]) {
			const app = await startRunner(node, { DOOR: door });
			try {
				answers[door] = [];
				for (const [path, headers] of cases) {
					const { status, body } = await request(`${app.url}${path}`, {
						...fromGateway,
						...headers,
					}, "POST");
					const parsed = status === 200 ? JSON.parse(body) : {};
					answers[door].push({
						status,
						user: parsed.user,
						consumer: parsed.consumer,
						body: status === 200 ? "" : body,
					});
				}
			} finally {
				await app.stop();
			}
		}
		const decisions = (door: string) =>
			answers[door].map(({ status, user, body }) => ({ status, user, body }));
		assert.deepEqual(decisions("on"), decisions("off"));
		// The authorization-only route refuses a request with no user of the app's own,
		// consumer or not: the door never sets ctx.meta.user.
		assert.deepEqual(answers.on.slice(3).map((answer) => answer.status), [401, 401]);
		// With the app's own authenticate, its user and the gateway's consumer both arrive.
		assert.deepEqual(answers.on[2], {
			status: 200,
			user: { id: "app-user" },
			consumer: "acme-corp",
			body: "",
		});
		assert.equal(answers.off[2].consumer, null);
	});
});

describe("moleculer-web mounted in Express (moleculer 0.14, dist/middleware.cjs)", () => {
	for (const express of ["express", "express5"]) {
		const name = express === "express" ? "Express 4" : "Express 5";
		test(
			`${name}: the door answers its own 401, PUBLIC_PATHS are full paths, a refused body is not read`,
			{ timeout: 120_000 },
			async () => {
				const started = await startExpress(express, {});
				try {
					const refused = await request(`${started.url}/api/greeter/hello`);
					assert.deepEqual([refused.status, refused.challenge, refused.body], [
						401,
						CHALLENGE,
						STANDALONE_BODY,
					]);
					const granted = await request(`${started.url}/api/greeter/hello`, {
						"x-shared-secret": SECRET,
					});
					assert.deepEqual([granted.status, granted.body], [200, '"Hello Moleculer"']);
					assert.equal(
						(await request(`${started.url}/api/status`)).status,
						200,
						"GET /api/status is public",
					);
					// A logger before the gateway built headersDistinct, with the secret in it.
					const meta = await request(`${started.url}/api/meta`, {
						"x-shared-secret": SECRET,
					});
					assert.equal(meta.status, 200);
					assert.match(meta.body, /"rawHeaders"/, "the route hook did copy the headers");
					assert.ok(!meta.body.includes(SECRET), "the secret reached a service");
					const { answer, closedEarly } = await refusedBodyCloses(
						started.url,
						"/api/greeter/hello",
					);
					assert.match(answer, /^HTTP\/1\.1 401 /);
					assert.ok(closedEarly, "the refused body was read");
				} finally {
					await started.stop();
				}
			},
		);

		test(
			`${name}: door.express(), door.guard(server) and ws: nothing answers without the secret`,
			{
				timeout: 60_000,
			},
			async () => {
				const started = await startExpress(express, {
					DOOR_IN_FRONT: "on",
					PUBLIC_PATHS: "GET /api/status",
				});
				try {
					const json = { "content-type": "application/json" };
					const without = [
						await request(`${started.url}/express-status`),
						await request(`${started.url}/nope`),
						await request(`${started.url}/api/greeter/hello`),
						await post(`${started.url}/api/greeter/hello`, json, "{not json"),
						await post(
							`${started.url}/api/greeter/hello`,
							json,
							`"${"a".repeat(200_000)}"`,
						),
					];
					for (const answer of without) {
						assert.deepEqual([answer.status, answer.challenge, answer.body], [
							401,
							CHALLENGE,
							STANDALONE_BODY,
						]);
					}
					// The app's public path is the app's own: /api included.
					assert.equal((await request(`${started.url}/api/status`)).status, 200);
					const withSecret = { "x-shared-secret": SECRET, "x-consumer": "acme" };
					const own = await request(`${started.url}/express-status`, withSecret);
					assert.deepEqual([own.status, own.body], [200, '{"express":"up"}']);
					assert.equal((await request(`${started.url}/nope`, withSecret)).status, 404);
					const routed = await request(`${started.url}/api/greeter/hello`, withSecret);
					assert.deepEqual([routed.status, routed.body], [200, '"Hello Moleculer"']);
					const tooBig = await post(
						`${started.url}/api/greeter/hello`,
						{ ...json, ...withSecret },
						`"${"a".repeat(200_000)}"`,
					);
					assert.equal(tooBig.status, 413, "with the secret, Express's parser answers");
					assert.match(started.output(), /request headers/, "the logger ran");
					assert.ok(!started.output().includes(SECRET), "the logger saw the secret");
					assert.ok(!started.output().includes("acme"), "the logger saw the consumer");
					// The WebSocket server on the app's server: guarded, and told the consumer.
					const ws = `ws${started.url.slice(4)}/live`;
					assert.deepEqual(await webSocket(ws, {}), { status: 401 });
					assert.deepEqual(await webSocket(`${ws.slice(0, -5)}/api/status`, {}), {
						status: 401,
					});
					assert.deepEqual(await webSocket(ws, withSecret), {
						message: { consumer: "acme" },
					});
				} finally {
					await started.stop();
				}
			},
		);

		test(`${name}: a gateway onError still gets the refusal`, { timeout: 60_000 }, async () => {
			const started = await startExpress(express, { ON_ERROR: "on" });
			try {
				const refused = await request(`${started.url}/api/greeter/hello`);
				assert.deepEqual([refused.status, refused.challenge, refused.body], [
					401,
					CHALLENGE,
					"custom No secret provided",
				]);
			} finally {
				await started.stop();
			}
		});
	}
});

/** A WebSocket from the scratch install's `ws`: its first message, or the refusal's status. */
function webSocket(url: string, headers: Record<string, string>) {
	type Client = {
		on(event: string, listener: (...args: never[]) => void): void;
		close(): void;
		terminate(): void;
	};
	const WebSocket = createRequire(join(scratch, "package.json"))("ws") as new (
		url: string,
		options: object,
	) => Client;
	return new Promise<{ status?: number; message?: unknown }>((resolve) => {
		const socket = new WebSocket(url, { headers });
		socket.on("unexpected-response", (_req: unknown, res: { statusCode: number }) => {
			resolve({ status: res.statusCode });
			socket.terminate();
		});
		socket.on("error", () => {});
		socket.on("message", (data: unknown) => {
			resolve({ message: JSON.parse(String(data)) });
			socket.close();
		});
	});
}

/** app.js prints the address it listens on. */
async function startExpress(express: string, env: Record<string, string>): Promise<Running> {
	const child = spawn(nodeBinary(20), ["app.js"], {
		cwd: join(scratch, "express"),
		env: {
			...process.env,
			EXPRESS: express,
			SHARED_SECRET: SECRET,
			PUBLIC_PATHS: "GET /api/status",
			...env,
		},
		stdio: ["ignore", "pipe", "pipe"],
	});
	let output = "";
	const exited = new Promise<void>((resolve) => child.once("exit", () => resolve()));
	const url = await new Promise<string>((resolve, reject) => {
		const onData = (chunk: Buffer) => {
			output += chunk;
			const ready = /Express ready at (\S+)/.exec(output);
			if (ready) resolve(ready[1]);
		};
		child.stdout!.on("data", onData);
		child.stderr!.on("data", onData);
		child.once("exit", () => reject(new Error(`exited before it served:\n${output}`)));
	});
	return {
		url,
		output: () => output,
		stop: async () => void (child.kill("SIGKILL"), await exited),
	};
}

describe("socket.io through moleculer-io on the gateway's server (moleculer 0.14)", () => {
	// The client, from the scratch install.
	const { io } = createRequire(join(scratch, "package.json"))("socket.io-client") as {
		io(url: string, options: object): ClientSocket;
	};
	type ClientSocket = {
		on(event: string, listener: (value: unknown) => void): void;
		emit(event: string, ...args: unknown[]): void;
		close(): void;
	};
	/**
	 * Connects, waits for the consumer the server tells, and resolves with it and the `call`
	 * event's answer, or with the connection's error.
	 */
	function callOver(url: string, transport: string, headers: Record<string, string>) {
		return new Promise<{ connected: boolean; answer: unknown; consumer?: unknown }>(
			(resolve) => {
				const socket = io(url, {
					transports: [transport],
					extraHeaders: headers,
					reconnection: false,
				});
				socket.on("connect_error", (error) => {
					socket.close();
					resolve({ connected: false, answer: String((error as Error).message) });
				});
				socket.on("consumer", (consumer) => {
					socket.emit("call", "api.protectedAction", {}, (...answer: unknown[]) => {
						socket.close();
						resolve({ connected: true, answer, consumer });
					});
				});
			},
		);
	}

	for (const transport of ["polling", "websocket"]) {
		test(
			`${transport}: no connection and no action without the secret; with it, the call works and door.consumerOf reads the consumer`,
			{
				timeout: 60_000,
			},
			async () => {
				const port = await freePort();
				const child = spawn(nodeBinary(20), ["app.js"], {
					cwd: join(scratch, "socketio"),
					env: { ...process.env, SHARED_SECRET: SECRET, PORT: String(port) },
					stdio: ["ignore", "pipe", "pipe"],
				});
				let output = "";
				child.stdout!.on("data", (chunk) => (output += chunk));
				child.stderr!.on("data", (chunk) => (output += chunk));
				try {
					const deadline = Date.now() + 20_000;
					while (!output.includes("socket.io ready")) {
						if (Date.now() > deadline) throw new Error(`not ready:\n${output}`);
						await new Promise((resolve) => setTimeout(resolve, 100));
					}
					const url = `http://127.0.0.1:${port}`;
					for (
						const headers of [{}, { "x-shared-secret": "wrong" }] as Record<
							string,
							string
						>[]
					) {
						const refused = await callOver(url, transport, headers);
						assert.equal(refused.connected, false, JSON.stringify(refused));
					}
					const granted = await callOver(url, transport, {
						"x-shared-secret": SECRET,
						"x-consumer": "acme",
					});
					assert.deepEqual(granted, {
						connected: true,
						answer: [null, { message: "Access granted" }],
						consumer: "acme",
					});
				} finally {
					child.kill("SIGKILL");
				}
			},
		);
	}
});

describe("middleware.ts copied into TypeScript projects, under @tsconfig/strictest", () => {
	// A folder whose modules resolve to each pair: the scratch install (0.14 + 0.10), or this
	// project's own (0.15 + 0.11), through a link to its node_modules. (Not inside them: tsc
	// writes no output for a file under node_modules.)
	const folders = {
		"moleculer 0.14 + moleculer-web 0.10": join(scratch, "typescript"),
		"moleculer 0.15 + moleculer-web 0.11": join(scratch, "typescript-0.15"),
	};
	before(() => {
		mkdirSync(join(scratch, "typescript-0.15"), { recursive: true });
		symlinkSync(
			join(projectRoot, "node_modules"),
			join(scratch, "typescript-0.15/node_modules"),
		);
	});
	const compilers = {
		"TypeScript 5.9": join(scratch, "node_modules/typescript/bin/tsc"),
		"the repo's TypeScript": join(projectRoot, "node_modules/typescript/bin/tsc"),
	};
	const strictest = join(scratch, "node_modules/@tsconfig/strictest/tsconfig.json");
	// The import lines that README.md and docs/copy-the-door.md give, each with its setup.
	const setups = {
		"tsx, Node, Deno or Bun: ./middleware.ts": {
			importLine: 'import { SharedSecretMiddleware } from "./middleware.ts";',
			type: "module",
			compilerOptions: {
				module: "esnext",
				moduleResolution: "bundler",
				allowImportingTsExtensions: true,
				noEmit: true,
			},
		},
		"tsc writing output: ./middleware.ts, rewriteRelativeImportExtensions": {
			importLine: 'import { SharedSecretMiddleware } from "./middleware.ts";',
			type: "module",
			compilerOptions: {
				module: "nodenext",
				moduleResolution: "nodenext",
				rewriteRelativeImportExtensions: true,
				outDir: "dist",
			},
		},
		"tsc writing output with NodeNext: ./middleware.js": {
			importLine: 'import { SharedSecretMiddleware } from "./middleware.js";',
			type: "module",
			compilerOptions: { module: "nodenext", moduleResolution: "nodenext", outDir: "dist" },
		},
	};
	const app = (importLine: string) =>
		[
			'import { ServiceBroker } from "moleculer";',
			'import ApiGateway from "moleculer-web";',
			importLine,
			// Under strictest, process.env is read with brackets.
			'const door = SharedSecretMiddleware({ secrets: process.env["SHARED_SECRET"] });',
			"const broker = new ServiceBroker({ middlewares: [door] });",
			'broker.createService({ name: "api", mixins: [ApiGateway] });',
		].join("\n");

	function compile(folder: string, tsc: string, tsconfig: object) {
		mkdirSync(folder, { recursive: true });
		cpSync(join(projectRoot, "middleware.ts"), join(folder, "middleware.ts"));
		writeFileSync(join(folder, "tsconfig.json"), JSON.stringify(tsconfig));
		const { status, stdout, stderr } = spawnSync(process.execPath, [tsc, "-p", "."], {
			cwd: folder,
			encoding: "utf8",
		});
		assert.equal(status, 0, `${stdout}${stderr}`);
	}

	for (const [versions, folder] of Object.entries(folders)) {
		for (const [compiler, tsc] of Object.entries(compilers)) {
			for (const [setup, { importLine, type, compilerOptions }] of Object.entries(setups)) {
				test(`${versions}, ${compiler}, ${setup}`, { timeout: 60_000 }, () => {
					const project = join(folder, setup.replace(/\W+/g, "-"));
					mkdirSync(project, { recursive: true });
					writeFileSync(join(project, "package.json"), JSON.stringify({ type }));
					writeFileSync(join(project, "app.ts"), app(importLine));
					compile(project, tsc, {
						extends: strictest,
						// moleculer 0.14's own .d.ts has errors, as strictest's skipLibCheck allows.
						compilerOptions: { target: "es2022", types: ["node"], ...compilerOptions },
						files: ["app.ts"],
					});
					// Where tsc writes output, the app it wrote imports the door it wrote.
					if ("outDir" in compilerOptions) {
						const written = readFileSync(join(project, "dist/app.js"), "utf8");
						assert.match(written, /from "\.\/middleware\.js"/);
						assert.ok(existsSync(join(project, "dist/middleware.js")));
					}
				});
			}
		}
	}

	test("a tsc build to CommonJS without esModuleInterop answers 401 and 200", {
		timeout: 60_000,
	}, async () => {
		const project = join(scratch, "typescript-commonjs");
		mkdirSync(project, { recursive: true });
		writeFileSync(join(project, "package.json"), "{}");
		writeFileSync(
			join(project, "app.ts"),
			[
				'import { ServiceBroker } from "moleculer";',
				'import ApiGateway = require("moleculer-web");',
				'import { SharedSecretMiddleware } from "./middleware";',
				'const door = SharedSecretMiddleware({ secrets: process.env["SHARED_SECRET"] });',
				"const broker = new ServiceBroker({ logLevel: 'warn', middlewares: [door] });",
				"const settings = { port: Number(process.env['PORT']), routes: [{ path: '/' }] };",
				'broker.createService({ name: "api", mixins: [ApiGateway], settings });',
				'broker.createService({ name: "greeter", actions: { hello: () => "Hello" } });',
				"broker.start();",
			].join("\n"),
		);
		compile(project, compilers["TypeScript 5.9"], {
			extends: strictest,
			compilerOptions: {
				esModuleInterop: false,
				module: "commonjs",
				target: "es2022",
				types: ["node"],
				outDir: "out",
			},
			files: ["app.ts"],
		});
		const port = await freePort();
		const app = await serve(
			[nodeBinary(20), "out/app.js"],
			project,
			{ SHARED_SECRET: SECRET, PORT: String(port) },
			port,
			"/",
		);
		try {
			const refused = await request(`${app.url}/greeter/hello`);
			assert.deepEqual([refused.status, refused.challenge, refused.body], [
				401,
				CHALLENGE,
				STANDALONE_BODY,
			]);
			const granted = await request(`${app.url}/greeter/hello`, {
				"x-shared-secret": SECRET,
			});
			assert.deepEqual([granted.status, granted.body], [200, '"Hello"']);
		} finally {
			await app.stop();
		}
	});
});
