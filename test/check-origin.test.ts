/**
 * `npm run check-origin`: the template's origin holds on every row, and each origin it must not
 * call safe fails, on the rows it should, with the exit code that names why. The check runs as
 * its own process, as an operator runs it, against real servers on this machine. Its environment
 * holds the origin's PUBLIC_PATHS where a CI job would share them: the check must not read them.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { spawn } from "node:child_process";
import http, { type Server } from "node:http";
import http2 from "node:http2";
import { createServer, type Socket } from "node:net";
import { ServiceBroker } from "moleculer";
import ApiGateway from "moleculer-web";
import { SharedSecretMiddleware } from "../middleware.ts";
import { freePort, OLD_SECRET, SECRET, startOrigin, typeScriptCommand } from "./origin.ts";

type Row = { try: string; sent: string; answer: string; who: string; held: boolean };
type Report = {
	rows: Row[];
	skipped: string[];
	summary: { verdict: string; exit: number; reason: string };
};
type Checked = { code: number | null; output: string; report?: Report };

/** Runs the check against `url`, with `env` as its environment. `--json` gives `report`. */
function check(url: string, args: string[] = [], env: Record<string, string> = {}) {
	const [command, ...rest] = typeScriptCommand("test/check-origin.ts");
	const inherited = { ...process.env };
	delete inherited.SHARED_SECRET;
	delete inherited.PUBLIC_PATHS;
	const child = spawn(command!, [...rest, url, ...args], { env: { ...inherited, ...env } });
	let output = "";
	child.stdout.setEncoding("utf8").on("data", (chunk: string) => (output += chunk));
	child.stderr.setEncoding("utf8").on("data", (chunk: string) => (output += chunk));
	return new Promise<Checked>((resolve) =>
		child.on("close", (code) => {
			const report = args.includes("--json") ? JSON.parse(output) as Report : undefined;
			resolve({ code, output, report });
		})
	);
}

/** The rows that did not hold, as "sent: try". */
const failedRows = (report: Report | undefined) =>
	(report?.rows ?? []).filter((row) => !row.held).map((row) => `${row.sent}: ${row.try}`);

async function listen(server: Server | http2.Http2Server): Promise<string> {
	await new Promise<void>((resolve) => server.listen(0, "127.0.0.1", resolve));
	return `http://127.0.0.1:${(server.address() as { port: number }).port}`;
}

/** A broker and gateway on their own server, with the door or without it. */
async function gateway(withDoor: boolean, settings: Record<string, unknown> = {}) {
	const broker = new ServiceBroker({
		logger: false,
		middlewares: withDoor ? [SharedSecretMiddleware({ secrets: SECRET })] : [],
	});
	broker.createService({
		name: "api",
		actions: { protected: () => "granted", health: () => "ok" },
	});
	const service = broker.createService({
		name: "gateway",
		mixins: [ApiGateway],
		settings: {
			port: 0,
			ip: "127.0.0.1",
			routes: [{
				path: "/",
				aliases: { "GET /api/protected": "api.protected", "GET /health": "api.health" },
			}],
			...settings,
		},
	});
	await broker.start();
	return {
		broker,
		service: service as unknown as { server: Server; httpHandler: http.RequestListener },
	};
}

const urlOf = (server: Server) => `http://127.0.0.1:${(server.address() as { port: number }).port}`;
const PUBLIC = ["--public", "GET /health"];

test("the template's origin holds on every row, and the output never holds the secret", async () => {
	const origin = await startOrigin({ SHARED_SECRET: `${SECRET},${SECRET.toUpperCase()}` });
	try {
		const { code, output } = await check(origin.url, PUBLIC, { SHARED_SECRET: SECRET });
		assert.equal(code, 0, output);
		assert.match(output, /^All \d+ held\.$/m);
		assert.match(output, /signed with the secret +GET \/api\/protected +passes the door +200/);
		assert.doesNotMatch(output, /Skipped/);
		assert.ok(!output.includes(SECRET) && !output.includes(SECRET.slice(0, 16)), "the secret");
		const json = await check(origin.url, ["--json", "--path", "/api/protected", ...PUBLIC]);
		assert.equal(json.code, 0, json.output);
		assert.ok(json.report!.rows.length > 10 && json.report!.rows.every((row) => row.held));
		assert.deepEqual(json.report!.summary.verdict, "held");
		assert.deepEqual(json.report!.skipped, [
			"3 rows with the secret (SHARED_SECRET is not set)",
		]);
	} finally {
		await origin.stop();
	}
});

test("an origin with nothing public holds when nothing is declared public", async () => {
	const origin = await startOrigin({ PUBLIC_PATHS: "" });
	try {
		const { code, output } = await check(origin.url);
		assert.equal(code, 0, output);
		assert.match(output, /^Skipped: 9 rows with the secret \(SHARED_SECRET is not set\)\.$/m);
	} finally {
		await origin.stop();
	}
});

test("PUBLIC_PATHS that open a protected alias fail, though the check's environment holds them", async () => {
	// A CI job that shares the origin's environment: the check must not take its word.
	const publicPaths = "GET /health,GET /api/protected";
	const origin = await startOrigin({ PUBLIC_PATHS: publicPaths });
	try {
		const { code, report } = await check(origin.url, ["--json", ...PUBLIC], {
			PUBLIC_PATHS: publicPaths,
		});
		assert.equal(code, 1);
		const failed = failedRows(report);
		assert.ok(failed.includes("GET /api/protected: GET"), failed.join("\n"));
		assert.ok(failed.every((row) => row.startsWith("GET /api/protected")), failed.join("\n"));
		assert.equal(report!.summary.verdict, "did not hold");
	} finally {
		await origin.stop();
	}
});

test("an origin with no door fails the rows without the secret, by name, in a short summary", async () => {
	const { broker, service } = await gateway(false);
	try {
		const { code, report } = await check(urlOf(service.server), ["--json", ...PUBLIC]);
		assert.equal(code, 1);
		const failed = failedRows(report);
		assert.ok(failed.includes("GET /api/protected: GET"), failed.join("\n"));
		assert.ok(failed.includes("GET /api/protected: a wrong secret"), failed.join("\n"));
		const text = await check(urlOf(service.server), PUBLIC);
		const last = text.output.trimEnd().split("\n").at(-1)!;
		assert.match(last, /^\d+ of \d+ did not hold: .*; and \d+ more \(the table lists them\)$/);
		assert.ok(last.length < 400, `${last.length} characters`);
	} finally {
		await broker.stop();
	}
});

test("an app in front of the gateway without door.express() fails its own paths", async () => {
	// What Express with app.use("/api", gateway.express()) and no door.express() does: the app
	// answers every other path itself.
	const { broker, service } = await gateway(true, { server: false, routes: [{ path: "/" }] });
	const app = http.createServer((req, res) => {
		if (req.url?.startsWith("/api/")) return service.httpHandler(req, res);
		res.end("the app's own answer");
	});
	try {
		const { code, report } = await check(await listen(app), ["--json"]);
		assert.equal(code, 1);
		const failed = failedRows(report);
		assert.ok(failed.includes("GET /: GET"), failed.join("\n"));
		assert.ok(!failed.some((row) => row.startsWith("GET /api/protected:")), failed.join("\n"));
	} finally {
		app.close();
		await broker.stop();
	}
});

test("a WebSocket server on an unguarded server fails the upgrade rows", async () => {
	// An app whose requests meet door.express(), and whose server has a WebSocket server that
	// nothing guards: upgrades never pass through the app.
	const atDoor = SharedSecretMiddleware({ secrets: SECRET }).express();
	const app = (req: http.IncomingMessage, res: http.ServerResponse) =>
		atDoor(req, res, () => res.end("the app's own answer"));
	const server = http.createServer(app).on("checkContinue", app);
	server.on("upgrade", (_req, socket) => {
		socket.end(
			"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n",
		);
	});
	try {
		const url = await listen(server);
		const { code, report } = await check(url, ["--json", "--path", "/api/protected"]);
		assert.equal(code, 1);
		assert.deepEqual(failedRows(report), [
			"GET / (Upgrade): WebSocket upgrade",
			"GET /api/protected (Upgrade): WebSocket upgrade",
			"GET /socket.io/?EIO=4&transport=websocket (Upgrade): WebSocket upgrade",
		]);
	} finally {
		server.close();
	}
});

test("an HTTP/2 answer after a graceful GOAWAY fails the HTTP/2 row", async () => {
	// It drains each connection as nginx and Envoy do, with a GOAWAY (NO_ERROR) that covers the
	// stream, then answers from behind the door. (It speaks no HTTP/1, so those rows fail too.)
	const draining = http2.createServer().on("stream", (stream) => {
		stream.session!.goaway(http2.constants.NGHTTP2_NO_ERROR, stream.id!);
		stream.respond({ ":status": 200 });
		stream.end("from behind the door");
	});
	try {
		const { code, report } = await check(await listen(draining), ["--json"]);
		assert.equal(code, 1);
		const row = report!.rows.find((row) => row.try === "HTTP/2")!;
		assert.deepEqual([row.answer, row.who, row.held], ["200", "behind it", false]);
	} finally {
		draining.close();
	}
});

test("nothing to check exits 3 and names why: silent, unreachable, TLS against plain HTTP", async () => {
	// A server that accepts connections, and never sends a byte.
	const sockets: Socket[] = [];
	const silent = createServer((socket) => sockets.push(socket.on("error", () => {})));
	await new Promise<void>((resolve) => silent.listen(0, "127.0.0.1", resolve));
	const origin = await startOrigin();
	try {
		const silentUrl = `http://127.0.0.1:${(silent.address() as { port: number }).port}`;
		const quiet = await check(silentUrl, ["--timeout", "1"]);
		assert.equal(quiet.code, 3, quiet.output);
		assert.match(quiet.output, /Nothing could be checked: no answer at all$/m);
		const closed = await check(`http://127.0.0.1:${await freePort()}`);
		assert.equal(closed.code, 3, closed.output);
		assert.match(closed.output, /Nothing could be checked: unreachable \(ECONNREFUSED\)$/m);
		const tls = await check(origin.url.replace("http:", "https:"), ["--json"]);
		assert.equal(tls.code, 3, tls.output);
		assert.match(tls.report!.summary.reason, /^TLS against a server that does not speak it/);
	} finally {
		for (const socket of sockets) socket.destroy();
		silent.close();
		await origin.stop();
	}
});

test("an origin that refuses the checker's own secret exits 3", async () => {
	const origin = await startOrigin();
	try {
		const { code, output } = await check(origin.url, PUBLIC, { SHARED_SECRET: OLD_SECRET });
		assert.equal(code, 3, output);
		assert.match(output, /Nothing could be checked: the origin refuses this checker's own/);
	} finally {
		await origin.stop();
	}
});

test("an origin URL with a path: every row sends below it, and says so", async () => {
	const origin = await startOrigin();
	try {
		const args = ["--json", "--path", "/protected"];
		const { code, report } = await check(`${origin.url}/api`, args, { SHARED_SECRET: SECRET });
		assert.equal(code, 0, JSON.stringify(report));
		const secretRow = report!.rows.find((row) => row.try === "signed with the secret")!;
		assert.deepEqual([secretRow.sent, secretRow.answer], ["GET /api/protected", "200"]);
		assert.ok(report!.rows.every((row) => / \/api\/|\/\/[^/]+\/api\//.test(row.sent)));
	} finally {
		await origin.stop();
	}
});

test('an origin in "require" mode holds on every row, checked with signatures', async () => {
	const origin = await startOrigin({ SHARED_SECRET_SIGNATURES: "require" });
	try {
		const { code, report } = await check(origin.url, ["--json", ...PUBLIC], {
			SHARED_SECRET: SECRET,
		});
		assert.equal(code, 0, JSON.stringify(report?.summary));
		const tries = new Set(report!.rows.map((row) => row.try));
		for (const name of ["a signature under a wrong secret", "a signed request, replayed"]) {
			assert.ok(tries.has(name), name);
		}
	} finally {
		await origin.stop();
	}
});

/** A door of version 1, which reads no signatures; it records each x-shared-secret it gets. */
async function doorWithoutSignatures() {
	const secretsSeen: unknown[] = [];
	const server = http.createServer((_req, res) => res.end("behind the door"));
	SharedSecretMiddleware({ secrets: SECRET }).guard(server);
	const guarded = server.emit as (this: Server, event: string, ...args: unknown[]) => boolean;
	server.emit = function (this: Server, event: string, ...args: unknown[]) {
		const req = args[0] as http.IncomingMessage | undefined;
		if (req?.headers) {
			secretsSeen.push(req.headers["x-shared-secret"]);
			delete req.headers.signature;
			delete req.headers["signature-input"];
		}
		return guarded.call(this, event, ...args);
	} as typeof server.emit;
	const url = await listen(server);
	return { server, url, secretsSeen };
}

test("a door that takes no signatures gets the secret in a header, over http:// to this machine only", async () => {
	const old = await doorWithoutSignatures();
	try {
		const near = await check(old.url, ["--json"], { SHARED_SECRET: SECRET });
		assert.equal(near.code, 0, JSON.stringify(near.report?.summary));
		assert.ok(old.secretsSeen.includes(SECRET), "loopback: the header was sent");
		old.secretsSeen.length = 0;
		// The same server, as another host would be: an IPv4-mapped IPv6 address is no loopback
		// name to the check, and still reaches 127.0.0.1.
		const far = old.url.replace("127.0.0.1", "[::ffff:7f00:1]");
		const { code, output } = await check(far, [], { SHARED_SECRET: SECRET });
		assert.equal(code, 3, output);
		assert.match(output, /the secret would cross the network in clear: use an https:\/\/ URL/);
		assert.ok(old.secretsSeen.length > 10, "the check reached the server");
		assert.ok(!old.secretsSeen.includes(SECRET), "the secret went in clear to another host");
		assert.ok(!output.includes(SECRET));
	} finally {
		old.server.close();
	}
});

test("usage: errors exit 2, and --help exits 0", async () => {
	assert.equal((await check("not a url")).code, 2);
	assert.equal((await check("http://127.0.0.1:1", ["--public", "/health"])).code, 2);
	const help = await check("--help");
	assert.deepEqual([help.code, help.output.startsWith("Usage: check-origin")], [0, true]);
});
