/**
 * Every way into a gateway's server meets the door: upgrades, `Expect: 100-continue`, HTTP/2,
 * your own server with `server: false`, and the code that runs around moleculer-web's `rest`
 * (hooks, outer middlewares, rootCallOptions, retries). Each test starts a real broker and
 * gateway in this process and speaks real HTTP to it.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { connect } from "node:net";
import http, { type IncomingMessage, type Server } from "node:http";
import http2 from "node:http2";
import { type BrokerOptions, type Context, Errors, ServiceBroker } from "moleculer";
import ApiGateway from "moleculer-web";
import { SharedSecretMiddleware, type SharedSecretOptions } from "../middleware.ts";
import { OLD_SECRET, SECRET } from "./origin.ts";

type Started = { broker: ServiceBroker; server: Server; base: string; lines: string[] };

/** A broker with the door, one `api` service and one gateway; `lines` holds every log line. */
async function start(
	settings: Record<string, unknown>,
	actions: Record<string, unknown> = {},
	doorOptions: Partial<SharedSecretOptions> = {},
	brokerOptions: BrokerOptions = {},
): Promise<Started> {
	const lines: string[] = [];
	const door = SharedSecretMiddleware({ secrets: SECRET, ...doorOptions });
	const broker = new ServiceBroker({
		logger: {
			type: "Console",
			options: {
				level: "info",
				formatter(_level: string, args: unknown[]) {
					lines.push(args.map(String).join(" "));
					return [];
				},
			},
		},
		...brokerOptions,
		middlewares: [door, ...(brokerOptions.middlewares ?? [])],
	});
	broker.createService({ name: "api", actions: { hello: () => "hello", ...actions } });
	const gateway = broker.createService({
		name: "gateway",
		mixins: [ApiGateway],
		settings: { port: 0, ip: "127.0.0.1", routes: [{ path: "/" }], ...settings },
	});
	await broker.start();
	const server = (gateway as unknown as { server: Server }).server;
	const { port } = server.address() as { port: number };
	return { broker, server, base: `http://127.0.0.1:${port}`, lines };
}

/** Sends raw bytes, and resolves with everything the server sent until it closed or `waitMs`. */
function rawExchange(port: number, request: string, waitMs = 1000): Promise<string> {
	return new Promise((resolve) => {
		let answer = "";
		const socket = connect(port, "127.0.0.1", () => socket.write(request));
		socket.setEncoding("latin1").on("data", (chunk: string) => (answer += chunk));
		const done = () => resolve(answer);
		socket.on("close", done).on("error", done);
		setTimeout(() => socket.destroy(), waitMs);
	});
}

const portOf = (started: Started) => (started.server.address() as { port: number }).port;

test("an upgrade listener on the gateway's server answers only with the secret", async () => {
	const started = await start({}, {});
	// A WebSocket server, a GraphQL subscription server or socket.io attaches like this.
	const upgradesSeen: (string | undefined)[] = [];
	started.server.on("upgrade", (req: IncomingMessage, socket) => {
		upgradesSeen.push(req.headers["x-shared-secret"] as string | undefined);
		socket.end(
			"HTTP/1.1 101 Switching Protocols\r\nUpgrade: echo\r\nConnection: Upgrade\r\n\r\n",
		);
	});
	try {
		const upgrade = (extra: string) =>
			rawExchange(
				portOf(started),
				`GET /socket HTTP/1.1\r\nHost: x\r\nConnection: Upgrade\r\nUpgrade: echo\r\n${extra}\r\n`,
			);
		const refused = await upgrade("");
		assert.match(refused, /^HTTP\/1\.1 401 Unauthorized\r\n/);
		assert.match(refused, /WWW-Authenticate: SharedSecret header="x-shared-secret"/);
		assert.match(refused, /"message":"No secret provided"/);
		assert.match(await upgrade("x-shared-secret: wrong\r\n"), /"message":"Invalid secret"/);
		assert.deepEqual(upgradesSeen, [], "the listener never ran without the secret");
		assert.match(await upgrade(`x-shared-secret: ${SECRET}\r\n`), /^HTTP\/1\.1 101 /);
		assert.deepEqual(upgradesSeen, [undefined], "with the secret, and the header wiped");
	} finally {
		await started.broker.stop();
	}
});

test("a refused request that expects 100-continue gets its 401 and no 100 Continue", async () => {
	const started = await start({ routes: [{ path: "/", bodyParsers: { json: true } }] });
	try {
		const head = (extra: string) =>
			"POST /api/hello HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n" +
			`Content-Length: 2\r\nExpect: 100-continue\r\n${extra}\r\n`;
		const refused = await rawExchange(portOf(started), head(""), 800);
		assert.match(refused, /^HTTP\/1\.1 401 /);
		assert.doesNotMatch(refused, /100 Continue/);
		// With the secret, the client is told to go on, as without the door.
		const passed = await rawExchange(
			portOf(started),
			head(`x-shared-secret: ${SECRET}\r\n`),
			500,
		);
		assert.match(passed, /^HTTP\/1\.1 100 Continue\r\n/);
	} finally {
		await started.broker.stop();
	}
});

test("code around `rest` never sees the secret: a hook, an outer middleware, rootCallOptions", async () => {
	const seen: unknown[] = [];
	const look = (where: string, req: IncomingMessage) =>
		seen.push([
			where,
			req.headers["x-shared-secret"],
			req.headers["x-consumer"],
			req.rawHeaders,
		]);
	const outer = {
		name: "Outer",
		localAction(next: (ctx: Context) => unknown, action: { rawName?: string }) {
			if (action.rawName !== "rest") return next;
			return (ctx: Context<{ req: IncomingMessage }>) => {
				look("outer middleware", ctx.params.req);
				return next(ctx);
			};
		},
	};
	const started = await start(
		{
			rootCallOptions(options: { meta?: object }, req: IncomingMessage) {
				look("rootCallOptions", req);
				options.meta = { copied: { ...req.headers } };
			},
		},
		{ meta: (ctx: Context) => ctx.meta },
		{},
		{ middlewares: [outer as never] },
	);
	try {
		const response = await fetch(`${started.base}/api/meta`, {
			headers: { "x-shared-secret": SECRET, "x-consumer": "acme" },
		});
		assert.equal(response.status, 200);
		const meta = await response.json();
		assert.equal(meta.consumer, "acme");
		assert.ok(!JSON.stringify(meta.copied).includes(SECRET));
		assert.equal(seen.length, 2);
		assert.ok(!JSON.stringify(seen).includes(SECRET), JSON.stringify(seen));
		assert.ok(!JSON.stringify(seen).includes("acme"), "nor the consumer header");
	} finally {
		await started.broker.stop();
	}
});

test("a gateway's before hook sees no secret", async () => {
	const seen: unknown[] = [];
	const lines: string[] = [];
	const broker = new ServiceBroker({
		logger: false,
		middlewares: [SharedSecretMiddleware({ secrets: SECRET })],
	});
	broker.createService({ name: "api", actions: { hello: () => "hello" } });
	const gateway = broker.createService({
		name: "gateway",
		mixins: [ApiGateway, {
			// A "*" hook from a mixin, as a logging or tracing mixin adds.
			hooks: {
				before: {
					"*"(ctx: Context<{ req?: IncomingMessage }>) {
						if (ctx.params?.req) seen.push({ ...ctx.params.req.headers });
					},
				},
			},
		}],
		settings: { port: 0, ip: "127.0.0.1", routes: [{ path: "/" }] },
	});
	await broker.start();
	const { port } = (gateway as unknown as { server: Server }).server.address() as {
		port: number;
	};
	try {
		const response = await fetch(`http://127.0.0.1:${port}/api/hello`, {
			headers: { "x-shared-secret": SECRET },
		});
		assert.equal(response.status, 200);
		assert.equal(seen.length, 1, "the hook ran");
		assert.ok(!JSON.stringify(seen).includes(SECRET), lines.join("\n"));
	} finally {
		await broker.stop();
	}
});

test("a retry of a public path routes the path the door checked, never another route", async () => {
	let statusCalls = 0;
	const started = await start(
		{
			routes: [
				{ path: "/api", aliases: { "GET /status": "api.status" } },
				{ path: "/", aliases: { "GET /status": "api.adminStatus" } },
			],
		},
		{
			// Fails three times with a retryable error: the broker's two retries of this call
			// fail too, so it retries the gateway's `rest` itself.
			status() {
				if (statusCalls++ < 3) throw new Errors.MoleculerRetryableError("busy", 503);
				return "public status";
			},
			adminStatus: () => "ADMIN",
		},
		{ publicPaths: "GET /api/status" },
		{ retryPolicy: { enabled: true, retries: 2, delay: 10 } },
	);
	try {
		const response = await fetch(`${started.base}/api/status`);
		const body = await response.text();
		assert.notEqual(body, '"ADMIN"', "the retry reached another route without the secret");
		assert.equal(body, '"public status"');
		assert.equal((await fetch(`${started.base}/status`)).status, 401);
	} finally {
		await started.broker.stop();
	}
});

test("with server: false and your own server, headersDistinct read first holds no door header", async () => {
	const broker = new ServiceBroker({
		logger: false,
		middlewares: [SharedSecretMiddleware({ secrets: SECRET })],
	});
	broker.createService({ name: "api", actions: { headers: (ctx: Context) => ctx.meta } });
	const gateway = broker.createService({
		name: "gateway",
		mixins: [ApiGateway],
		settings: {
			server: false,
			routes: [{
				path: "/",
				onBeforeCall(
					ctx: Context<unknown, Record<string, unknown>>,
					_r: unknown,
					req: IncomingMessage,
				) {
					Object.assign(ctx.meta, {
						headers: req.headers,
						raw: req.rawHeaders,
						distinct: req.headersDistinct,
					});
				},
			}],
		},
	}) as unknown as { httpHandler: http.RequestListener };
	await broker.start();
	// Your own server: it reads headersDistinct before the gateway does.
	const server = http.createServer((req, res) => {
		void req.headersDistinct;
		gateway.httpHandler(req, res);
	});
	await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
	const { port } = server.address() as { port: number };
	try {
		const url = `http://127.0.0.1:${port}/api/headers`;
		assert.equal((await fetch(url)).status, 401);
		const response = await fetch(url, {
			headers: { "x-shared-secret": SECRET, "x-consumer": "a" },
		});
		assert.equal(response.status, 200);
		const meta = await response.json();
		for (const form of [meta.headers, meta.distinct]) {
			assert.equal("x-shared-secret" in form, false);
			assert.equal("x-consumer" in form, false);
		}
		assert.ok(!JSON.stringify(meta.raw).includes(SECRET));
		assert.ok(!meta.raw.some((name: string) => /^x-(shared-secret|consumer)$/i.test(name)));
	} finally {
		server.close();
		await broker.stop();
	}
});

test("a service that forwards the copied headers with http.request sends neither door header", async () => {
	const forwarded: http.IncomingHttpHeaders[] = [];
	const upstream = http.createServer((req, res) => {
		forwarded.push(req.headers);
		res.end("ok");
	});
	await new Promise<void>((resolve) => upstream.listen(0, "127.0.0.1", resolve));
	const upstreamPort = (upstream.address() as { port: number }).port;
	const started = await start({
		routes: [{
			path: "/",
			onBeforeCall(
				ctx: Context<unknown, Record<string, unknown>>,
				_r: unknown,
				req: IncomingMessage,
			) {
				ctx.meta.headers = req.headers;
			},
		}],
	}, {
		// Forwards every header it was handed, as a proxying service does.
		forward(ctx: Context<unknown, { headers: http.OutgoingHttpHeaders }>) {
			return new Promise((resolve, reject) => {
				const headers = { ...ctx.meta.headers, host: `127.0.0.1:${upstreamPort}` };
				http.get({ port: upstreamPort, host: "127.0.0.1", headers }, (res) => {
					res.resume().on("end", () => resolve("forwarded"));
				}).on("error", reject);
			});
		},
	});
	try {
		const response = await fetch(`${started.base}/api/forward`, {
			headers: { "x-shared-secret": SECRET, "x-consumer": "acme", "x-trace": "kept" },
		});
		assert.equal(await response.text(), '"forwarded"');
		assert.equal(forwarded.length, 1);
		assert.equal(forwarded[0]!["x-trace"], "kept");
		assert.equal("x-shared-secret" in forwarded[0]!, false);
		assert.equal("x-consumer" in forwarded[0]!, false);
	} finally {
		upstream.close();
		await started.broker.stop();
	}
});

test("HTTP/2: refused without the secret, a raw stream listener included, with short log lines", async () => {
	const started = await start({ http2: true });
	// A listener of raw HTTP/2 streams, beside moleculer-web's.
	const streamsSeen: unknown[] = [];
	started.server.on("stream", (_stream: unknown, headers: Record<string, unknown>) => {
		streamsSeen.push(headers["x-shared-secret"]);
	});
	const client = http2.connect(started.base);
	const ask = (headers: http2.OutgoingHttpHeaders) =>
		new Promise<{ status: number; body: string }>((resolve, reject) => {
			const stream = client.request(headers);
			let body = "";
			let status = 0;
			stream.on("response", (head) => (status = Number(head[":status"])));
			stream.setEncoding("utf8").on("data", (chunk: string) => (body += chunk));
			stream.on("end", () => resolve({ status, body })).on("error", reject);
			stream.end();
		});
	try {
		assert.equal((await ask({ ":path": "/api/hello" })).status, 401);
		const passed = await ask({ ":path": "/api/hello", "x-shared-secret": SECRET });
		assert.deepEqual(passed, { status: 200, body: '"hello"' });
		const longMethod = "A".repeat(30_000);
		for (let i = 0; i < 5; i++) {
			assert.equal((await ask({ ":path": "/api/hello", ":method": longMethod })).status, 401);
		}
		assert.deepEqual(streamsSeen, [undefined], "only the stream with the secret, wiped");
		const refusals = started.lines.filter((line) => line.includes("<= 401"));
		assert.equal(refusals.length, 6);
		for (const line of refusals) assert.ok(line.length < 300, `${line.length} characters`);
	} finally {
		client.close();
		await started.broker.stop();
	}
});

test("GET /list-aliases answers with the secret, as without the door", async () => {
	const started = await start({
		routes: [{ path: "/", aliases: { "GET /list-aliases": "gateway.listAliases" } }],
	});
	try {
		const response = await fetch(`${started.base}/list-aliases`, {
			headers: { "x-shared-secret": SECRET },
		});
		assert.equal(response.status, 200);
		assert.ok(Array.isArray(await response.json()));
		assert.equal((await fetch(`${started.base}/list-aliases`)).status, 401);
	} finally {
		await started.broker.stop();
	}
});

test("a local service still adds and removes routes at run time", async () => {
	const started = await start({ routes: [] });
	try {
		await started.broker.call("gateway.addRoute", {
			route: { path: "/dyn", aliases: { "GET /hi": "api.hello" } },
		});
		const url = `${started.base}/dyn/hi`;
		assert.equal((await fetch(url, { headers: { "x-shared-secret": SECRET } })).status, 200);
		await started.broker.call("gateway.removeRoute", { path: "/dyn" });
		assert.equal((await fetch(url, { headers: { "x-shared-secret": SECRET } })).status, 404);
	} finally {
		await started.broker.stop();
	}
});

test("a public path that matches no alias gets a warning at start, naming the routes", async () => {
	const started = await start(
		{ routes: [{ path: "/api", aliases: { "POST /auth/login": "api.hello" } }] },
		{},
		{ publicPaths: "POST /auth/login,POST /api/auth/login" },
	);
	try {
		const warnings = started.lines.filter((line) => line.includes("matches no alias"));
		assert.deepEqual(warnings, [
			'SharedSecretMiddleware: public path "POST /auth/login" matches no alias of the routes /api. Write the full path, the route\'s path included.',
		]);
		assert.equal(
			(await fetch(`${started.base}/api/auth/login`, { method: "POST" })).status,
			200,
		);
	} finally {
		await started.broker.stop();
	}
});

test("two brokers with two doors in one process keep their secrets apart", async () => {
	const first = await start({});
	const second = await start({}, {}, { secrets: OLD_SECRET });
	try {
		const ask = (started: Started, secret: string) =>
			fetch(`${started.base}/api/hello`, { headers: { "x-shared-secret": secret } })
				.then((response) => response.status);
		assert.deepEqual(
			await Promise.all([ask(first, SECRET), ask(first, OLD_SECRET)]),
			[200, 401],
		);
		assert.deepEqual(
			await Promise.all([ask(second, SECRET), ask(second, OLD_SECRET)]),
			[401, 200],
		);
	} finally {
		await first.broker.stop();
		await second.broker.stop();
	}
});

test("HTTP/2: a refusal's log line escapes the control characters the caller chose", async () => {
	const started = await start({ http2: true });
	const client = http2.connect(started.base);
	// C1 controls: CSI (U+009B) starts a terminal's escape sequence, OSC (U+009D) sets its title.
	// HTTP/1's parser refuses them, and nghttp2 refuses C0 ones, but HTTP/2 carries C1 in :path.
	const path = "/api/hello\u009b31m\u009d0;owned\u009c";
	try {
		const status = await new Promise((resolve, reject) => {
			const stream = client.request({ ":path": path });
			stream.on("response", (head) => resolve(head[":status"])).on("error", reject);
			stream.resume().end();
		});
		assert.equal(status, 401);
		const refusals = started.lines.filter((line) => line.includes("<= 401"));
		assert.deepEqual(refusals, ["<= 401 GET /api/hello\\x9b31m\\x9d0;owned\\x9c"]);
	} finally {
		client.close();
		await started.broker.stop();
	}
});

test("a mounted gateway's alias written as a public path gets a warning: public paths are full paths", async () => {
	const lines: string[] = [];
	const door = SharedSecretMiddleware({ secrets: SECRET, publicPaths: "GET /status" });
	const broker = new ServiceBroker({
		logger: {
			type: "Console",
			options: {
				level: "warn",
				formatter(_level: string, args: unknown[]) {
					lines.push(args.map(String).join(" "));
					return [];
				},
			},
		},
		middlewares: [door],
	});
	broker.createService({
		name: "gateway",
		mixins: [ApiGateway],
		settings: {
			server: false,
			routes: [{ path: "/", aliases: { "GET /status": "$node.health" } }],
		},
	});
	try {
		await broker.start();
		assert.deepEqual(lines, [
			'SharedSecretMiddleware: public path "GET /status" matches an alias of a mounted gateway as it stands. Public paths are full paths, as clients send them: under app.use("/api", gateway.express()), write "GET /api/status".',
		]);
	} finally {
		await broker.stop();
	}
});
