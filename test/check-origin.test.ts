/**
 * `npm run check-origin`: the template's origin holds on every row, and each misconfiguration
 * that the check exists for fails the rows it should, by name. The check runs as its own
 * process, as an operator runs it, against real servers on this machine.
 */
import assert from "node:assert/strict";
import { test } from "node:test";
import { spawn } from "node:child_process";
import http, { type Server } from "node:http";
import { createServer, type Socket } from "node:net";
import { ServiceBroker } from "moleculer";
import ApiGateway from "moleculer-web";
import { SharedSecretMiddleware } from "../middleware.ts";
import { SECRET, startOrigin, typeScriptCommand } from "./origin.ts";

type Checked = { code: number | null; output: string };

/** Runs the check against `url`, with `env` as its environment's origin variables. */
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
		child.on("close", (code) => resolve({ code, output }))
	);
}

/** The rows that did not hold, as "sent: try" from the summary line. */
const failedRows = (output: string) => /did not hold: (.*)$/m.exec(output)?.[1]?.split("; ") ?? [];

async function listen(server: Server): Promise<string> {
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

test("the template's origin holds on every row, and the output never holds the secret", async () => {
	const origin = await startOrigin({ SHARED_SECRET: `${SECRET},${SECRET.toUpperCase()}` });
	try {
		const { code, output } = await check(origin.url, [], { SHARED_SECRET: SECRET });
		assert.equal(code, 0, output);
		assert.match(output, /All \d+ held\./);
		assert.match(output, /with the secret +GET \/api\/protected +200/);
		assert.ok(!output.includes(SECRET) && !output.includes(SECRET.slice(0, 16)), "the secret");
		const json = await check(origin.url, ["--json", "--path", "/api/protected"]);
		const rows = JSON.parse(json.output) as { held: boolean; try: string }[];
		assert.equal(json.code, 0);
		assert.ok(rows.length > 10 && rows.every((row) => row.held));
	} finally {
		await origin.stop();
	}
});

const urlOf = (server: Server) => `http://127.0.0.1:${(server.address() as { port: number }).port}`;

test("an origin with no door fails the rows without the secret, by name", async () => {
	const { broker, service } = await gateway(false);
	try {
		const { code, output } = await check(urlOf(service.server));
		assert.equal(code, 1, output);
		const failed = failedRows(output);
		assert.ok(failed.includes("GET /api/protected: GET"), output);
		assert.ok(failed.includes("GET /api/protected: a wrong secret"), output);
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
		const { code, output } = await check(await listen(app));
		assert.equal(code, 1, output);
		const failed = failedRows(output);
		assert.ok(failed.includes("GET /: GET"), output);
		assert.ok(!failed.some((row) => row.startsWith("GET /api/protected:")), output);
	} finally {
		app.close();
		await broker.stop();
	}
});

test("PUBLIC_PATHS that open a protected alias fail that alias's rows", async () => {
	const origin = await startOrigin({ PUBLIC_PATHS: "GET /health,GET /api/protected" });
	try {
		const { code, output } = await check(origin.url);
		assert.equal(code, 1, output);
		const failed = failedRows(output);
		assert.ok(failed.includes("GET /api/protected: GET"), output);
		assert.ok(failed.every((row) => row.startsWith("GET /api/protected")), output);
	} finally {
		await origin.stop();
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
		const { code, output } = await check(url, ["--path", "/api/protected"], {
			PUBLIC_PATHS: "",
		});
		assert.equal(code, 1, output);
		assert.deepEqual(failedRows(output), [
			"GET / (Upgrade): WebSocket upgrade",
			"GET /api/protected (Upgrade): WebSocket upgrade",
			"GET /socket.io/?EIO=4&transport=websocket (Upgrade): WebSocket upgrade",
		]);
	} finally {
		server.close();
	}
});

test("a server that never answers fails every row, within the bound", async () => {
	// It accepts connections, and never sends a byte.
	const sockets: Socket[] = [];
	const silent = createServer((socket) => sockets.push(socket.on("error", () => {})));
	await new Promise<void>((resolve) => silent.listen(0, "127.0.0.1", resolve));
	try {
		const url = `http://127.0.0.1:${(silent.address() as { port: number }).port}`;
		const { code, output } = await check(url, ["--timeout", "1", "--json"]);
		const rows = JSON.parse(output) as { held: boolean }[];
		assert.equal(code, 1);
		assert.ok(rows.length > 10 && rows.every((row) => !row.held), output);
	} finally {
		for (const socket of sockets) socket.destroy();
		silent.close();
	}
});

test("usage errors exit 2", async () => {
	assert.equal((await check("not a url")).code, 2);
	assert.equal((await check("http://127.0.0.1:1", [], { PUBLIC_PATHS: "/health" })).code, 2);
});
