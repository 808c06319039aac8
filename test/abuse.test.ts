/**
 * The abuse suite: refused clients that end their connection every way they can (never read,
 * half-close, reset, abort mid-body), on HTTP/1, on upgrades and on HTTP/2, while the origin
 * keeps serving requests with the secret. A crash would end this test process, and fail it. After
 * each group, the server holds no refused connection, and closes in time.
 */
import assert from "node:assert/strict";
import { after, before, describe, test } from "node:test";
import { connect, type Socket } from "node:net";
import http, { type IncomingMessage, type Server } from "node:http";
import http2 from "node:http2";
import { createRequire } from "node:module";
import { ServiceBroker } from "moleculer";
import WebSocket, { WebSocketServer } from "ws";
import ApiGateway from "moleculer-web";
import { SharedSecretMiddleware } from "../middleware.ts";
import { OLD_SECRET, SECRET } from "./origin.ts";

type Started = { broker: ServiceBroker; server: Server; port: number };

/** A broker with the door and a gateway; GET /health is public, and an upgrade listener echoes. */
async function start(settings: Record<string, unknown> = {}): Promise<Started> {
	const broker = new ServiceBroker({
		logger: false,
		middlewares: [SharedSecretMiddleware({ secrets: SECRET, publicPaths: "GET /health" })],
	});
	broker.createService({ name: "api", actions: { hello: () => "hello", health: () => "ok" } });
	const gateway = broker.createService({
		name: "gateway",
		mixins: [ApiGateway],
		settings: {
			port: 0,
			ip: "127.0.0.1",
			routes: [{
				path: "/",
				bodyParsers: { json: true },
				aliases: { "GET /health": "api.health", "POST /hello": "api.hello" },
			}],
			...settings,
		},
	});
	await broker.start();
	const server = (gateway as unknown as { server: Server }).server;
	// What a WebSocket server does on upgrade: switch, with the secret only.
	server.on("upgrade", (_req: IncomingMessage, socket: Socket) => {
		socket.on("error", () => {});
		socket.end(
			"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n",
		);
	});
	return { broker, server, port: (server.address() as { port: number }).port };
}

/** Opens a socket, writes `bytes`, then misbehaves with it at once, before any answer. */
function misbehave(port: number, bytes: string, then: (socket: Socket) => void) {
	let answer = "";
	const socket = connect(port, "127.0.0.1", () => {
		socket.write(bytes);
		then(socket);
	});
	socket.setEncoding("latin1").on("data", (chunk: string) => (answer += chunk));
	socket.on("error", () => {});
	const closed = new Promise<string>((resolve) => socket.on("close", () => resolve(answer)));
	return { socket, answer: () => answer, closed };
}

const neverRead = (socket: Socket) => socket.pause();
const halfClose = (socket: Socket) => socket.end();
const reset = (socket: Socket) => socket.resetAndDestroy();

/** Resolves once the server has no connection left, or rejects after `ms`. */
async function drained(server: Server, ms = 3000): Promise<void> {
	const deadline = Date.now() + ms;
	for (;;) {
		const count = await new Promise<number>((resolve) =>
			server.getConnections((_error, n) => resolve(n))
		);
		if (count === 0) return;
		if (Date.now() > deadline) throw new Error(`${count} connections still held`);
		server.closeIdleConnections();
		await new Promise((resolve) => setTimeout(resolve, 50));
	}
}

async function withSecret(port: number): Promise<number> {
	const response = await fetch(`http://127.0.0.1:${port}/hello`, {
		method: "POST",
		headers: { "x-shared-secret": SECRET, "content-type": "application/json" },
		body: "{}",
	});
	await response.text();
	return response.status;
}

describe("HTTP/1 and upgrades: refused clients that misbehave", () => {
	let started: Started;
	before(async () => (started = await start()));
	after(() => started.broker.stop());

	const get = "GET /hello HTTP/1.1\r\nHost: x\r\n\r\n";
	const post = "POST /hello HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n" +
		"a".repeat(50_000);
	const upgrade = (path: string, extra = "") =>
		`GET ${path} HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n${extra}\r\n`;

	const cases: [string, string, (socket: Socket) => void][] = [
		["a request, never read", get, neverRead],
		["a request, half-closed", get, halfClose],
		["a request, reset", get, reset],
		["a body, aborted midway with a reset", post, reset],
		["a body, never read", post, neverRead],
		["an upgrade, never read", upgrade("/socket"), neverRead],
		["an upgrade, half-closed", upgrade("/socket"), halfClose],
		["an upgrade, reset", upgrade("/socket"), reset],
		["an upgrade on the public path, reset", upgrade("/health"), reset],
	];
	for (const [name, bytes, then] of cases) {
		test(name, async () => {
			const clients = Array.from({ length: 20 }, () => misbehave(started.port, bytes, then));
			await new Promise((resolve) => setTimeout(resolve, 100));
			assert.equal(await withSecret(started.port), 200);
			// The server lets go of every refused connection, however the client behaves: the
			// door closes what it refused, and closeIdleConnections() the refused keep-alive
			// requests, as a graceful stop does.
			await drained(started.server);
			for (const client of clients) {
				assert.doesNotMatch(client.answer(), /^HTTP\/1\.1 (101|100|200)/);
				client.socket.destroy();
			}
		});
	}

	test("an upgrade on a public path needs the secret, and switches with it", async () => {
		const refused = await misbehave(started.port, upgrade("/health"), halfClose).closed;
		assert.match(refused, /^HTTP\/1\.1 401 /);
		const switched = await misbehave(
			started.port,
			upgrade("/health", `x-shared-secret: ${SECRET}\r\n`),
			halfClose,
		).closed;
		assert.match(switched, /^HTTP\/1\.1 101 /);
	});

	test("the secret with Expect: 100-continue gets 100 Continue, then its answer", async () => {
		const head = "POST /hello HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" +
			`Content-Length: 2\r\nExpect: 100-continue\r\nx-shared-secret: ${SECRET}\r\n\r\n`;
		const client = misbehave(started.port, head, (socket) => socket.write("{}"));
		const deadline = Date.now() + 5000;
		while (!/200 OK[^]*"hello"/.test(client.answer()) && Date.now() < deadline) {
			await new Promise((resolve) => setTimeout(resolve, 20));
		}
		client.socket.destroy();
		assert.match(client.answer(), /^HTTP\/1\.1 100 Continue\r\n\r\nHTTP\/1\.1 200 OK/);
	});

	test("another Expect meets the door before a checkExpectation listener", async () => {
		const seen: unknown[] = [];
		const listener = (req: IncomingMessage, res: http.ServerResponse) => {
			seen.push(req.headers["x-consumer"]);
			res.writeHead(417).end();
		};
		started.server.on("checkExpectation", listener);
		try {
			const head = (extra: string) =>
				`GET /hello HTTP/1.1\r\nHost: x\r\nExpect: something\r\nx-consumer: a\r\n${extra}\r\n`;
			assert.match(
				await misbehave(started.port, head(""), halfClose).closed,
				/^HTTP\/1\.1 401 /,
			);
			assert.deepEqual(seen, []);
			const passed = await misbehave(
				started.port,
				head(`x-shared-secret: ${SECRET}\r\n`),
				halfClose,
			).closed;
			assert.match(passed, /^HTTP\/1\.1 417 /);
			assert.deepEqual(seen, [undefined], "the door's headers are gone");
		} finally {
			started.server.off("checkExpectation", listener);
		}
	});

	test("a graceful stop ends in time after all of it", async () => {
		const closed = new Promise((resolve) => started.server.close(resolve));
		started.server.closeIdleConnections();
		const late = setTimeout(() => assert.fail("the server did not close within 3 s"), 3000);
		await closed;
		clearTimeout(late);
	});
});

describe("HTTP/2: refused streams that misbehave", () => {
	let started: Started;
	before(async () => (started = await start({ http2: true })));
	after(() => started.broker.stop());

	/** One request on a session of its own; `then` misbehaves with the stream and session. */
	function ask(
		headers: http2.OutgoingHttpHeaders,
		then: (stream: http2.ClientHttp2Stream, session: http2.ClientHttp2Session) => void,
	): Promise<number> {
		return new Promise((resolve) => {
			const session = http2.connect(`http://127.0.0.1:${started.port}`);
			session.on("error", () => {});
			const stream = session.request(headers, { endStream: false });
			let status = 0;
			stream.on("response", (head) => (status = Number(head[":status"])));
			stream.on("error", () => {}).resume();
			stream.on("close", () => {
				session.close();
				resolve(status);
			});
			// At once: a reset or GOAWAY that races the door's 401 is what an attacker sends.
			then(stream, session);
		});
	}

	const cases: [string, http2.OutgoingHttpHeaders, Parameters<typeof ask>[1]][] = [
		["HEAD", { ":method": "HEAD", ":path": "/hello" }, (stream) => stream.end()],
		["a reset right after its headers", { ":path": "/hello" }, (stream) => stream.close(8)],
		["a GOAWAY with an error code", { ":path": "/hello" }, (_s, session) => session.goaway(1)],
		["a body never ended", { ":method": "POST", ":path": "/hello" }, (s) => s.write("{")],
		["CONNECT on the public path", { ":method": "CONNECT", ":authority": "x" }, () => {}],
	];
	for (const [name, headers, then] of cases) {
		test(name, async () => {
			const statuses = await Promise.all(
				Array.from({ length: 10 }, () => ask(headers, then)),
			);
			for (const status of statuses) assert.ok(status === 0 || status === 401, `${status}`);
			const session = http2.connect(`http://127.0.0.1:${started.port}`);
			const status = await new Promise((resolve) => {
				const stream = session.request({ ":path": "/health" });
				stream.on("response", (head) => resolve(head[":status"])).resume();
			});
			session.close();
			assert.equal(status, 200);
		});
	}
});

// Express 5 is `express`, Express 4 the alias `express4`: both export the same app factory.
const expressOf = (name: string) =>
	createRequire(import.meta.url)(name) as typeof import("express");

/**
 * docs/copy-the-door.md's Express setup, exactly: the door in the broker and first in the app,
 * moleculer-web mounted at /api, and door.guard(server) for the WebSocket server on the app's
 * server. Its handler reads the consumer with door.consumerOf(req).
 */
async function startExpressApp(express: typeof import("express")) {
	const door = SharedSecretMiddleware({ secrets: SECRET, publicPaths: "GET /api/status" });
	const broker = new ServiceBroker({ logger: false, middlewares: [door] });
	broker.createService({
		name: "greeter",
		actions: { hello: () => "hello", status: () => "up", meta: (ctx) => ctx.meta },
	});
	const gateway = broker.createService({
		name: "gateway",
		mixins: [ApiGateway],
		settings: {
			server: false,
			routes: [{
				path: "/",
				aliases: {
					"GET /hello": "greeter.hello",
					"GET /status": "greeter.status",
					"GET /meta": "greeter.meta",
				},
			}],
		},
	}) as unknown as { express(): http.RequestListener };
	await broker.start();
	const app = express();
	app.use(door.express());
	app.get("/app-status", (_req, res) => void res.json({ app: "up" }));
	app.use("/api", gateway.express());
	const server = http.createServer(app);
	door.guard(server);
	const sockets = new WebSocketServer({ server });
	sockets.on("connection", (socket, req) => {
		socket.send(JSON.stringify({ consumer: door.consumerOf(req) ?? null }));
	});
	await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
	const port = (server.address() as { port: number }).port;
	const stop = async () => {
		sockets.close();
		server.close();
		await broker.stop();
	};
	return { server, port, stop };
}

/** A WebSocket to `path`: the first message, or the refusal's status. */
function webSocket(port: number, path: string, headers: Record<string, string>) {
	return new Promise<{ status?: number; message?: unknown }>((resolve) => {
		const socket = new WebSocket(`ws://127.0.0.1:${port}${path}`, { headers });
		socket.on("unexpected-response", (_req, res) => {
			resolve({ status: res.statusCode });
			socket.terminate();
		});
		socket.on("error", () => {});
		socket.on("message", (data) => {
			resolve({ message: JSON.parse(String(data)) });
			socket.close();
		});
	});
}

for (const name of ["express4", "express"]) {
	describe(`${name === "express" ? "Express 5" : "Express 4"}: door.express(), door.guard(server) and a ws server together`, () => {
		let app: Awaited<ReturnType<typeof startExpressApp>>;
		before(async () => (app = await startExpressApp(expressOf(name))));
		after(() => app.stop());
		const url = (path: string) => `http://127.0.0.1:${app.port}${path}`;
		const withSecret = { "x-shared-secret": SECRET, "x-consumer": "acme" };

		test("the secret passes both pieces; the app's public path is its full path", async () => {
			const granted = await fetch(url("/api/hello"), { headers: withSecret });
			assert.deepEqual([granted.status, await granted.text()], [200, '"hello"']);
			const own = await fetch(url("/app-status"), { headers: withSecret });
			assert.deepEqual([own.status, await own.json()], [200, { app: "up" }]);
			const meta = await (await fetch(url("/api/meta"), { headers: withSecret })).json();
			assert.equal(meta.consumer, "acme");
			assert.equal(
				(await fetch(url("/api/status"))).status,
				200,
				"GET /api/status is public",
			);
			for (const path of ["/api/hello", "/app-status", "/status", "/nope"]) {
				assert.equal((await fetch(url(path))).status, 401, path);
			}
		});

		test("a WebSocket needs the secret, on the public path too; its handler reads the consumer", async () => {
			assert.deepEqual(await webSocket(app.port, "/live", {}), { status: 401 });
			assert.deepEqual(await webSocket(app.port, "/api/status", {}), { status: 401 });
			assert.deepEqual(await webSocket(app.port, "/live", withSecret), {
				message: { consumer: "acme" },
			});
			const anonymous = { "x-shared-secret": SECRET };
			assert.deepEqual(await webSocket(app.port, "/live", anonymous), {
				message: { consumer: null },
			});
		});

		const upgrade =
			"GET /live HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n" +
			"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n";
		const post = "POST /api/hello HTTP/1.1\r\nHost: x\r\nContent-Length: 1000000\r\n\r\n" +
			"a".repeat(50_000);
		const cases: [string, string, (socket: Socket) => void][] = [
			["an upgrade, never read", upgrade, neverRead],
			["an upgrade, half-closed", upgrade, halfClose],
			["an upgrade, reset", upgrade, reset],
			["a body, never read", post, neverRead],
		];
		for (const [what, bytes, then] of cases) {
			test(`refused clients that misbehave: ${what}`, async () => {
				const clients = Array.from({ length: 20 }, () => misbehave(app.port, bytes, then));
				await new Promise((resolve) => setTimeout(resolve, 100));
				assert.equal((await fetch(url("/api/hello"), { headers: withSecret })).status, 200);
				await drained(app.server);
				for (const client of clients) {
					assert.doesNotMatch(client.answer(), /^HTTP\/1\.1 (101|100|200)/);
					client.socket.destroy();
				}
			});
		}
	});
}

describe("each door keeps its own verdict", () => {
	test("door A's express() in front of a gateway guarded by door B lets in neither secret alone", async () => {
		const doorA = SharedSecretMiddleware({ secrets: OLD_SECRET });
		const broker = new ServiceBroker({
			logger: false,
			middlewares: [SharedSecretMiddleware({ secrets: SECRET })],
		});
		broker.createService({ name: "api", actions: { hello: () => "hello" } });
		const gateway = broker.createService({
			name: "gateway",
			mixins: [ApiGateway],
			settings: { server: false, routes: [{ path: "/" }] },
		}) as unknown as { httpHandler: http.RequestListener };
		await broker.start();
		const atA = doorA.express();
		const server = http.createServer((req, res) =>
			atA(req, res, () => gateway.httpHandler(req, res))
		);
		await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
		const url = `http://127.0.0.1:${(server.address() as { port: number }).port}/api/hello`;
		try {
			for (const secret of [SECRET, OLD_SECRET]) {
				const response = await fetch(url, { headers: { "x-shared-secret": secret } });
				assert.equal(
					response.status,
					401,
					`with ${secret === SECRET ? "B's" : "A's"} secret`,
				);
			}
		} finally {
			server.close();
			await broker.stop();
		}
	});

	test("a method changed after the door (methodOverride) is refused, on a public path too", async () => {
		const door = SharedSecretMiddleware({ secrets: SECRET, publicPaths: "POST /api/users" });
		const broker = new ServiceBroker({ logger: false, middlewares: [door] });
		broker.createService({
			name: "api",
			actions: { list: () => "everyone", add: () => "added" },
		});
		const gateway = broker.createService({
			name: "gateway",
			mixins: [ApiGateway],
			settings: {
				server: false,
				routes: [{
					path: "/api",
					aliases: { "GET /users": "api.list", "POST /users": "api.add" },
				}],
			},
		}) as unknown as { httpHandler: http.RequestListener };
		await broker.start();
		const atDoor = door.express();
		// What methodOverride() does: the method from a header the caller chose.
		const server = http.createServer((req, res) =>
			atDoor(req, res, () => {
				const override = req.headers["x-http-method-override"];
				if (typeof override === "string") req.method = override;
				gateway.httpHandler(req, res);
			})
		);
		await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
		const url = `http://127.0.0.1:${(server.address() as { port: number }).port}/api/users`;
		try {
			const plain = await fetch(url, { method: "POST" });
			assert.equal(await plain.text(), '"added"');
			const overridden = await fetch(url, {
				method: "POST",
				headers: { "x-http-method-override": "GET" },
			});
			assert.equal(overridden.status, 401, await overridden.text());
		} finally {
			server.close();
			await broker.stop();
		}
	});

	test("door.guard(server) puts the door in front of an Express app's own server", async () => {
		const door = SharedSecretMiddleware({ secrets: SECRET });
		// An app's server with a WebSocket server attached: its upgrades never pass through Express.
		const server = http.createServer((_req, res) => res.end("the app"));
		server.on("upgrade", (_req: IncomingMessage, socket: Socket) => {
			socket.end(
				"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n",
			);
		});
		door.guard(server);
		await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
		const port = (server.address() as { port: number }).port;
		const upgrade = (extra: string) =>
			`GET /ws HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n${extra}\r\n`;
		try {
			assert.match(await misbehave(port, upgrade(""), halfClose).closed, /^HTTP\/1\.1 401 /);
			const switched = misbehave(port, upgrade(`x-shared-secret: ${SECRET}\r\n`), halfClose);
			assert.match(await switched.closed, /^HTTP\/1\.1 101 /);
		} finally {
			server.close();
		}
	});
});
