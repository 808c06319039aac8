/**
 * `npm run test:zuplo`: the real Zuplo gateway (`zuplo dev`, the Zuplo runtime
 * in workerd) in front of the real origin, with this folder's routes, policies
 * and module, checked from the caller's side and from the origin's.
 *
 *   caller --HTTP--> zuplo dev --HTTP--> tap --HTTP--> origin (index.ts)
 *                       |
 *                       +--> stand-in for Zuplo's API key service
 *
 * The tap passes every request on to the origin unchanged and records its
 * headers: what the origin receives. The gateway signs each request (its
 * sign-for-origin policy), and the origin requires signatures: the secret never
 * travels. The rollout's earlier steps (docs/zuplo.md) run too, as copies of
 * this project with the header policy attached. Needs Node 24 and `npm ci` in
 * test/zuplo (.ci/run does both). Not in `npm test`, which needs neither.
 */
import assert from "node:assert/strict";
import { type ChildProcess, spawn } from "node:child_process";
import { cpSync, mkdtempSync, readFileSync, rmSync, symlinkSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { createServer, type IncomingHttpHeaders, request, type Server } from "node:http";
import type { AddressInfo } from "node:net";
import { join } from "node:path";
import { after, before, describe, test } from "node:test";
import { createHash } from "node:crypto";
import { ServiceBroker } from "moleculer";
import ApiGateway from "moleculer-web";
import { SharedSecretMiddleware } from "../../middleware.ts";
import { freePort, type Origin, projectRoot, SECRET, startOrigin, waitFor } from "../origin.ts";

const zuploProject = join(projectRoot, "test/zuplo");
const GOOD_KEY = "zpka_test_acme_0b9c4e";
const CONSUMER = "acme-corp";

/**
 * A STAND-IN, the one part of this suite that is not the real thing: Zuplo's
 * cloud service that validates API keys, which cannot be reached here. zuplo
 * 7.4.5's API key policy calls it when its .env holds these internal,
 * undocumented variables: ZUPLO_API_KEY_SERVICE_BUCKET_NAME, __ZUPLO_EDGE_API_URL
 * (this server) and __ZUPLO_AUTH_API_JWT. Its contract, as that version speaks
 * it: POST /v3/key-auth/validate with {"key", "bucketName"}; the answer is
 * {"authorized": true, "id", "name", "metadata"} (the name becomes the consumer)
 * or {"authorized": false}. Internal, so zuplo is pinned in package.json, and
 * the suite fails if the stand-in is never called: an upgrade that changes the
 * contract cannot pass unnoticed. It also answers Zuplo's request metrics
 * (__ZUPLO_REMOTE_LOG_URL) with 204, so the gateway's log stays clean.
 */
function startKeyServiceStandIn(bucketName: string) {
	const validations: { key: string; bucketName: string }[] = [];
	const server = createServer((req, res) => {
		let body = "";
		req.on("data", (chunk) => (body += chunk));
		req.on("end", () => {
			if (req.method === "POST" && req.url === "/v3/key-auth/validate") {
				const asked = JSON.parse(body) as { key: string; bucketName: string };
				validations.push(asked);
				const known = asked.key === GOOD_KEY && asked.bucketName === bucketName;
				res.writeHead(200, { "content-type": "application/json" });
				res.end(
					JSON.stringify(
						known
							? {
								authorized: true,
								id: "consumer-1",
								name: CONSUMER,
								metadata: {},
							}
							: { authorized: false },
					),
				);
			} else {
				res.writeHead(204).end();
			}
		});
	});
	return { server, validations };
}

/**
 * An origin with a WebSocket on its gateway's server, in this process: the door, a gateway, and
 * an upgrade listener that completes the handshake and sends one message.
 */
async function startSocketOrigin() {
	const upgrades: IncomingHttpHeaders[] = [];
	const sockets: { destroy(): void }[] = [];
	const broker = new ServiceBroker({
		logger: false,
		middlewares: [
			SharedSecretMiddleware({ secrets: SECRET, signatures: "require" }),
		],
	});
	const gateway = broker.createService({
		name: "gateway",
		mixins: [ApiGateway],
		settings: { port: 0, ip: "127.0.0.1", routes: [] },
	}) as unknown as { server: Server };
	gateway.server.on("upgrade", (req, socket) => {
		upgrades.push(req.headers);
		sockets.push(socket);
		const key = String(req.headers["sec-websocket-key"]);
		const accept = createHash("sha1").update(
			`${key}258EAFA5-E914-47DA-95CA-C5AB0DC85B11`,
		)
			.digest("base64");
		socket.write(
			"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n" +
				`Sec-WebSocket-Accept: ${accept}\r\n\r\n`,
		);
		const message = Buffer.from("welcome");
		socket.write(Buffer.concat([Buffer.from([0x81, message.length]), message]));
	});
	await broker.start();
	const port = (gateway.server.address() as AddressInfo).port;
	// An upgraded socket is the listener's own: the server's close would wait for it forever.
	const stop = () => (sockets.forEach((socket) => socket.destroy()), broker.stop());
	return { url: `http://127.0.0.1:${port}`, upgrades, stop };
}

/** Opens a WebSocket through the gateway: its first message, or why it failed. */
function firstMessage(
	url: string,
	headers: Record<string, string>,
): Promise<string> {
	return new Promise((resolve) => {
		const socket = new WebSocket(url, { headers } as never);
		socket.addEventListener("message", (event) => {
			resolve(`message: ${event.data}`);
			socket.close();
		});
		socket.addEventListener("error", () => resolve("failed"));
		socket.addEventListener("close", () => resolve("closed"));
	});
}

/** The tap: forwards to an origin and keeps the headers of every request it saw. */
function startTap(originPort: number) {
	const seen: IncomingHttpHeaders[] = [];
	const tap = {
		seen,
		// Which origin the tap forwards to: the rollout's steps switch it.
		originPort,
		server: createServer((req, res) => {
			seen.push(req.headers);
			const upstream = request({
				host: "127.0.0.1",
				port: tap.originPort,
				method: req.method,
				path: req.url,
				headers: req.headers,
			}, (answer) => {
				res.writeHead(answer.statusCode!, answer.headers);
				answer.pipe(res);
			});
			upstream.on("error", (error) => res.destroy(error));
			req.pipe(upstream);
		}),
	};
	return tap;
}

/**
 * A copy of this Zuplo project whose routes run `inbound` instead of config/'s policies: a
 * step of the rollout. Its node_modules is a link to this project's.
 */
function projectWith(inbound: string[]): string {
	const copy = mkdtempSync(join(tmpdir(), "zuplo-step-"));
	for (
		const entry of [
			"config",
			"modules",
			"package.json",
			"tsconfig.json",
			"zuplo.jsonc",
		]
	) {
		cpSync(join(zuploProject, entry), join(copy, entry), { recursive: true });
	}
	symlinkSync(join(zuploProject, "node_modules"), join(copy, "node_modules"));
	const routes = JSON.parse(
		readFileSync(join(copy, "config/routes.oas.json"), "utf8"),
	);
	for (const path of Object.values(routes.paths) as Record<string, Route>[]) {
		for (const operation of Object.values(path)) {
			if (operation["x-zuplo-route"]) {
				operation["x-zuplo-route"].policies.inbound = inbound;
			}
		}
	}
	writeFileSync(
		join(copy, "config/routes.oas.json"),
		JSON.stringify(routes, null, 2),
	);
	return copy;
}
type Route = { "x-zuplo-route"?: { policies: { inbound: string[] } } };

const listen = (server: Server) =>
	new Promise<number>((resolve) =>
		server.listen(
			0,
			"127.0.0.1",
			() => resolve((server.address() as AddressInfo).port),
		)
	);

/**
 * Starts `zuplo dev` with this .env (the only place its worker reads variables
 * from), on a port checked free first: a taken port shows only as a workerd log
 * line. Started with Node itself, in its own process group, so stopping it
 * stops workerd too.
 */
async function startZuplo(
	env: Record<string, string | undefined>,
	project = zuploProject,
): Promise<{ url: string; stop(): Promise<void> }> {
	const lines = Object.entries(env).flatMap((
		[name, value],
	) => (value === undefined ? [] : [`${name}=${value}`]));
	writeFileSync(join(project, ".env"), `${lines.join("\n")}\n`);
	const port = await freePort();
	const child: ChildProcess = spawn(
		process.execPath,
		[
			"node_modules/zuplo/zuplo.js",
			"dev",
			"--port",
			String(port),
			"--no-start-editor",
			"--no-start-docs",
		],
		{
			cwd: project,
			detached: true,
			stdio: ["ignore", "pipe", "pipe"],
			// No analytics and no update check: nothing leaves this machine.
			env: {
				...process.env,
				ZUPLO_DO_NOT_TRACK: "1",
				ZUPLO_DISABLE_UPDATE_CHECK: "1",
			},
		},
	);
	let output = "";
	child.stdout!.on("data", (chunk) => (output += chunk));
	child.stderr!.on("data", (chunk) => (output += chunk));
	const url = `http://127.0.0.1:${port}`;
	await waitFor(
		() => output.includes(`localhost:${port}`) || child.exitCode !== null,
		"zuplo dev to start",
		90_000,
	);
	assert.equal(child.exitCode, null, `zuplo dev exited:\n${output}`);
	// Listening once an unknown path gets Zuplo's own answer.
	let answered = false;
	for (let attempt = 0; attempt < 100 && !answered; attempt++) {
		answered = await fetch(`${url}/not-a-route`).then(() => true, () => false);
		if (!answered) await new Promise((resolve) => setTimeout(resolve, 200));
	}
	assert.ok(answered, `zuplo dev does not answer:\n${output}`);
	return {
		url,
		async stop() {
			process.kill(-child.pid!, "SIGTERM");
			// Gone when no process of its group is left (workerd and the build
			// watcher too): one still cleaning up would break the next start.
			const groupAlive = () => {
				try {
					return process.kill(-child.pid!, 0);
				} catch {
					return false;
				}
			};
			await waitFor(() => !groupAlive(), "zuplo dev to stop", 30_000);
		},
	};
}

/** The signature the origin received, as the gateway wrote it. */
const signatureOf = (received: IncomingHttpHeaders) => ({
	input: String(received["signature-input"]),
	signature: String(received["signature"]),
});

describe("Zuplo in front of the origin", () => {
	const BUCKET = "local-test-bucket";
	const keyService = startKeyServiceStandIn(BUCKET);
	// The origin that requires signatures, and one that still accepts the header (the default).
	let origin: Origin;
	let acceptingOrigin: Origin;
	let socketOrigin: Awaited<ReturnType<typeof startSocketOrigin>>;
	let tap: ReturnType<typeof startTap>;
	let zuploEnv: Record<string, string | undefined>;

	before(async () => {
		origin = await startOrigin({
			SHARED_SECRET: SECRET,
			SHARED_SECRET_SIGNATURES: "require",
		});
		acceptingOrigin = await startOrigin({ SHARED_SECRET: SECRET });
		socketOrigin = await startSocketOrigin();
		tap = startTap(origin.port);
		const [tapPort, keyServicePort] = await Promise.all([
			listen(tap.server),
			listen(keyService.server),
		]);
		zuploEnv = {
			SHARED_SECRET: SECRET,
			ORIGIN_URL: `http://127.0.0.1:${tapPort}`,
			ORIGIN_SOCKET_URL: socketOrigin.url,
			ZUPLO_API_KEY_SERVICE_BUCKET_NAME: BUCKET,
			__ZUPLO_EDGE_API_URL: `http://127.0.0.1:${keyServicePort}`,
			__ZUPLO_AUTH_API_JWT: "local-stand-in",
			__ZUPLO_REMOTE_LOG_URL: `http://127.0.0.1:${keyServicePort}/metrics`,
		};
	});

	after(async () => {
		await origin?.stop();
		await acceptingOrigin?.stop();
		await socketOrigin?.stop();
		tap?.server.close();
		keyService.server.close();
		rmSync(join(zuploProject, ".env"), { force: true });
	});

	const withKey = { authorization: `Bearer ${GOOD_KEY}` };

	describe('a gateway configured as config/ says, in front of an origin in "require" mode', () => {
		let gateway: Awaited<ReturnType<typeof startZuplo>>;
		before(async () => (gateway = await startZuplo(zuploEnv)));
		after(() => gateway?.stop());

		test("no API key, or a wrong one: the gateway's 401, and the origin sees nothing", async () => {
			const before = tap.seen.length;
			const noKey = await fetch(`${gateway.url}/api/protected`);
			const wrongKey = await fetch(`${gateway.url}/api/protected`, {
				headers: { authorization: "Bearer zpka_not_a_key" },
			});
			for (const response of [noKey, wrongKey]) {
				assert.equal(response.status, 401);
				assert.match(
					response.headers.get("content-type") ?? "",
					/problem\+json/,
					"Zuplo's own 401, not the origin's",
				);
				await response.arrayBuffer();
			}
			assert.equal(tap.seen.length, before);
			assert.ok(
				keyService.validations.some((asked) =>
					asked.key === "zpka_not_a_key" && asked.bucketName === BUCKET
				),
				"the wrong key was checked with the key service",
			);
		});

		test("a good API key: the origin's 200 for a signed request; neither the secret nor the caller's API key travels", async () => {
			const response = await fetch(`${gateway.url}/api/protected?b=2&a=1`, {
				headers: withKey,
			});
			assert.equal(response.status, 200);
			assert.deepEqual(await response.json(), { message: "Access granted" });
			const received = tap.seen.at(-1)!;
			const { input, signature } = signatureOf(received);
			assert.match(
				input,
				/^zuplo=\("@method" "@path" "@query" "x-consumer"\);created=\d+;nonce="[\w-]+";keyid="[\w-]{8}";alg="hmac-sha256"$/,
			);
			assert.match(signature, /^zuplo=:[A-Za-z0-9+/]{43}=:$/);
			assert.equal(
				received["x-shared-secret"],
				undefined,
				"the secret travelled",
			);
			assert.equal(received["x-consumer"], CONSUMER);
			assert.equal(
				received.authorization,
				undefined,
				"the caller's API key reached the origin",
			);
			assert.ok(!JSON.stringify(received).includes(GOOD_KEY));
			assert.ok(!JSON.stringify(received).includes(SECRET));
		});

		test("a WebSocket through the gateway is signed, and reaches the origin's server with a good API key only", async () => {
			const socketUrl = `${gateway.url.replace("http", "ws")}/socket`;
			assert.equal(
				await firstMessage(socketUrl, {}),
				"failed",
				"without an API key",
			);
			assert.equal(socketOrigin.upgrades.length, 0);
			assert.equal(await firstMessage(socketUrl, withKey), "message: welcome");
			assert.equal(socketOrigin.upgrades.length, 1);
			const upgrade = socketOrigin.upgrades[0]!;
			for (
				const field of [
					"x-shared-secret",
					"signature",
					"signature-input",
					"x-consumer",
				]
			) {
				assert.equal(upgrade[field], undefined, `${field}: wiped by the door`);
			}
		});

		test("the origin's services learn which consumer called", async () => {
			const response = await fetch(`${gateway.url}/api/whoami`, {
				headers: withKey,
			});
			assert.deepEqual(await response.json(), { consumer: CONSUMER });
		});

		test("a caller's own secret, consumer and signature never win", async () => {
			const forged = {
				...withKey,
				"x-shared-secret": "forged-by-the-caller-0123456789abcdef",
				"x-consumer": "mallory",
				signature: "zuplo=:AAAA:",
				"signature-input":
					'zuplo=("@method");created=1;nonce="n";keyid="k";alg="hmac-sha256"',
			};
			const response = await fetch(`${gateway.url}/api/whoami`, {
				headers: forged,
			});
			assert.equal(response.status, 200);
			assert.deepEqual(await response.json(), { consumer: CONSUMER });
			const received = tap.seen.at(-1)!;
			assert.equal(received["x-consumer"], CONSUMER);
			assert.notEqual(signatureOf(received).signature, "zuplo=:AAAA:");
		});

		test("the rollout's step 3: an origin that still takes the header takes the signature", async () => {
			tap.originPort = acceptingOrigin.port;
			try {
				const response = await fetch(`${gateway.url}/api/whoami`, { headers: withKey });
				assert.deepEqual([response.status, await response.json()], [200, {
					consumer: CONSUMER,
				}]);
			} finally {
				tap.originPort = origin.port;
			}
		});

		test("a request the origin received, sent again, is refused: a replay", async () => {
			await (await fetch(`${gateway.url}/api/protected`, { headers: withKey }))
				.arrayBuffer();
			const captured = { ...tap.seen.at(-1)! } as Record<string, string>;
			delete captured.host;
			const replay = await fetch(`${origin.url}/api/protected`, {
				headers: captured,
			});
			assert.equal(replay.status, 401);
			assert.equal((await replay.json()).message, "Invalid signature");
		});
	});

	// docs/zuplo.md's rollout, each step safe on its own: the origin accepts, then Zuplo signs
	// beside the header, then the header goes, then the origin requires signatures.
	const steps = [
		["the page's setup: the header alone", [
			"origin-shared-secret",
			"forward-consumer",
		], 401],
		["Zuplo signs beside the header", [
			"origin-shared-secret",
			"forward-consumer",
			"sign-for-origin",
		], 200],
	] as const;
	for (const [step, last, whenRequired] of steps) {
		test(
			`the rollout, ${step}: "accept" lets it in, "require" answers ${whenRequired}`,
			{
				timeout: 120_000,
			},
			async () => {
				const inbound = [
					"api-key-auth",
					"remove-caller-authorization",
					...last,
				];
				const project = projectWith(inbound);
				const gateway = await startZuplo(zuploEnv, project);
				try {
					for (
						const [target, expected] of [[acceptingOrigin, 200], [
							origin,
							whenRequired,
						]] as const
					) {
						tap.originPort = target.port;
						const response = await fetch(`${gateway.url}/api/whoami`, {
							headers: withKey,
						});
						const body = await response.json();
						assert.equal(response.status, expected, JSON.stringify(body));
						if (expected === 200) {
							assert.deepEqual(body, { consumer: CONSUMER });
						} else assert.equal(body.message, "No signature provided");
					}
				} finally {
					tap.originPort = origin.port;
					await gateway.stop();
					rmSync(project, { recursive: true, force: true });
				}
			},
		);
	}

	test("a gateway holding a wrong secret gets the origin's 401 back", {
		timeout: 120_000,
	}, async () => {
		const gateway = await startZuplo({
			...zuploEnv,
			SHARED_SECRET: "0123456789abcdef0123456789abcdef-not-the-origins",
		});
		try {
			const response = await fetch(`${gateway.url}/api/protected`, {
				headers: withKey,
			});
			assert.equal(response.status, 401);
			assert.deepEqual(await response.json(), {
				name: "UnAuthorizedError",
				message: "Invalid signature",
				code: 401,
				type: "INVALID_TOKEN",
			});
			// A WebSocket with a good API key meets the origin's door, which refuses it.
			const upgradesBefore = socketOrigin.upgrades.length;
			const socketUrl = `${gateway.url.replace("http", "ws")}/socket`;
			assert.equal(await firstMessage(socketUrl, withKey), "failed");
			assert.equal(socketOrigin.upgrades.length, upgradesBefore);
		} finally {
			await gateway.stop();
		}
	});

	test(
		"a gateway without SHARED_SECRET forwards nothing",
		{ timeout: 120_000 },
		async () => {
			// $env(SHARED_SECRET) of a variable that is not set reaches the policy as "undefined".
			const gateway = await startZuplo({
				...zuploEnv,
				SHARED_SECRET: undefined,
			});
			try {
				const before = tap.seen.length;
				const response = await fetch(`${gateway.url}/api/protected`, {
					headers: withKey,
				});
				assert.equal(response.status, 500);
				await response.arrayBuffer();
				assert.equal(tap.seen.length, before, "the origin saw a request");
			} finally {
				await gateway.stop();
			}
		},
	);

	test("the stand-in key service was really called (its contract still holds)", () => {
		assert.ok(
			keyService.validations.length >= 4,
			`the API key policy called the stand-in ${keyService.validations.length} times`,
		);
		assert.ok(
			keyService.validations.every((asked) => asked.bucketName === BUCKET),
		);
	});
});
