/**
 * Checks a running origin from outside: does anything answer without the secret?
 *
 *     npm run check-origin -- https://origin.example.com [--path /api/protected]... [--json]
 *
 * Every try without the secret must get the door's own 401, which names its header in
 * `WWW-Authenticate`; anything else answered from behind the door. Public paths must answer
 * plain requests, and never switch an upgrade. With SHARED_SECRET set (the origin's format,
 * "new,old"), each path gets one request with the current secret, which must pass the door.
 * The secret is never printed. It imports only Node's built-ins, so it runs alone after a copy:
 * `npx tsx check-origin.ts <url>`.
 *
 * Exit: 0 every row held, 1 a row did not, 2 a usage error, 3 the check itself failed.
 */
import { randomBytes } from "node:crypto";
import http2 from "node:http2";
import { connect as connectTcp, type Socket } from "node:net";
import { connect as connectTls } from "node:tls";

const USAGE = "Usage: check-origin <origin-url> [--path /p]... [--timeout seconds] [--json]";
const CHALLENGE = 'SharedSecret header="x-shared-secret"';
// How many tries run at once: a few, so a silent server still ends the check within 60 s.
const AT_ONCE = 8;

type Answer = { status: number; challenge: boolean; interim: number[] } | { failure: string };
type Row = { try: string; sent: string; answer: string; who: string; held: boolean };
type Try = { name: string; sent: string; run(): Promise<Row> };

// ---- The command line and the environment ---------------------------------------------------

function usageError(message: string): never {
	console.error(`check-origin: ${message}\n${USAGE}`);
	process.exit(2);
}

function readArguments(args: string[]) {
	let url: URL | undefined;
	const paths: string[] = [];
	let [timeoutMs, json] = [5000, false];
	for (let index = 0; index < args.length; index++) {
		const arg = args[index]!;
		const value = () => args[++index] ?? usageError(`${arg} needs a value.`);
		if (arg === "--json") json = true;
		else if (arg === "--path") paths.push(value());
		else if (arg === "--timeout") timeoutMs = Number(value()) * 1000;
		else if (arg.startsWith("-")) usageError(`unknown option ${arg}.`);
		else if (url) usageError("give one origin URL.");
		else url = URL.parse(arg) ?? usageError(`"${arg}" is not a URL.`);
	}
	if (!url) usageError("no origin URL.");
	if (url.protocol !== "http:" && url.protocol !== "https:") {
		usageError("the URL is not http(s).");
	}
	if (!(timeoutMs > 0)) usageError("--timeout needs seconds above 0.");
	if (paths.some((path) => !path.startsWith("/"))) usageError("each --path starts with /.");
	return { url, paths, timeoutMs, json };
}

// PUBLIC_PATHS in the origin's own format: "METHOD /path" items, comma-separated.
function readPublicPaths(text: string): { method: string; path: string }[] {
	return text.split(",").map((item) => item.trim()).filter(Boolean).map((item) => {
		const [, method, path] = /^([A-Z]+)\s+(\/\S*)$/.exec(item) ?? [];
		if (!method || !path) usageError(`PUBLIC_PATHS item "${item}" is not "METHOD /path".`);
		return { method, path };
	});
}

// ---- One exchange, byte for byte ---------------------------------------------------------------

// Sends `head` (and `body`), and reads status lines until a final one: interim ones (100) are
// kept, since "100 Continue" before a refusal means the server asked for the body.
function exchange(url: URL, head: string, body: Buffer | undefined, ms: number): Promise<Answer> {
	return new Promise((resolve) => {
		const port = Number(url.port) || (url.protocol === "https:" ? 443 : 80);
		const socket: Socket = url.protocol === "https:"
			? connectTls({
				host: url.hostname,
				port,
				servername: url.hostname,
				ALPNProtocols: ["http/1.1"],
			})
			: connectTcp({ host: url.hostname, port });
		let received = "";
		const interim: number[] = [];
		const done = (answer: Answer) => {
			clearTimeout(timer);
			socket.destroy();
			resolve(answer);
		};
		const timer = setTimeout(() => done({ failure: "no answer (timed out)" }), ms);
		socket.on(
			"error",
			(error: NodeJS.ErrnoException) => done({ failure: error.code ?? "error" }),
		);
		socket.on("close", () => done({ failure: "closed without an answer" }));
		socket.setEncoding("latin1").on("data", (chunk: string) => {
			received += chunk;
			for (
				let end = received.indexOf("\r\n\r\n");
				end !== -1;
				end = received.indexOf("\r\n\r\n")
			) {
				const lines = received.slice(0, end).split("\r\n");
				received = received.slice(end + 4);
				const status = Number(lines[0]!.split(" ")[1]);
				if (status >= 100 && status < 200 && status !== 101) {
					interim.push(status);
					continue;
				}
				const challenge = lines.some((line) =>
					/^www-authenticate:/i.test(line) &&
					line.slice(line.indexOf(":") + 1).trim() === CHALLENGE
				);
				return done({ status, challenge, interim });
			}
		});
		socket.once(url.protocol === "https:" ? "secureConnect" : "connect", () => {
			socket.write(head);
			if (body) socket.write(body, () => {});
		});
	});
}

// One request over HTTP/2: prior knowledge for http:, ALPN h2 for https:.
function exchangeHttp2(url: URL, path: string, ms: number): Promise<Answer> {
	return new Promise((resolve) => {
		const session = http2.connect(url.origin, { ALPNProtocols: ["h2"] });
		const done = (answer: Answer) => {
			clearTimeout(timer);
			session.destroy();
			resolve(answer);
		};
		const timer = setTimeout(() => done({ failure: "no answer (timed out)" }), ms);
		const noHttp2 = (error: NodeJS.ErrnoException) =>
			done({ failure: `does not speak HTTP/2 (${error.code ?? error.message})` });
		session.on("error", noHttp2).on(
			"goaway",
			() => done({ failure: "does not speak HTTP/2 (GOAWAY)" }),
		);
		session.on("close", () => done({ failure: "does not speak HTTP/2 (closed)" }));
		const stream = session.request({ ":path": path });
		stream.on("error", noHttp2).on("response", (headers) => {
			const challenge = headers["www-authenticate"] === CHALLENGE;
			done({ status: Number(headers[":status"]), challenge, interim: [] });
		});
		stream.end();
	});
}

// ---- What is tried ------------------------------------------------------------------------------

function describe(answer: Answer): { answer: string; who: string } {
	if ("failure" in answer) return { answer: answer.failure, who: "none" };
	const interim = answer.interim.map((status) => `${status}, then `).join("");
	return {
		answer: `${interim}${answer.status}`,
		who: answer.challenge ? "the door" : "behind it",
	};
}

function plan(url: URL, options: ReturnType<typeof readArguments>, secret: string | undefined) {
	const publicPaths = readPublicPaths(process.env.PUBLIC_PATHS ?? "GET /health");
	const base = url.pathname.replace(/\/$/, "");
	const at = (path: string) => base + path;
	const random = `/check-origin-${randomBytes(6).toString("hex")}`;
	const paths = options.paths.length
		? options.paths
		: ["/", "/api/protected", "/$node/list", random];
	const host = `Host: ${url.host}\r\n`;
	const wrong = () => randomBytes(32).toString("hex");
	const isPublic = (method: string, path: string) =>
		publicPaths.some((entry) => entry.method === method && entry.path === path);
	const upgrade =
		`Connection: Upgrade\r\nUpgrade: websocket\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: ${
			randomBytes(16).toString("base64")
		}\r\n`;
	const tries: Try[] = [];
	const send = (name: string, sent: string, head: string, body?: Buffer, expect = refused) =>
		tries.push({
			name,
			sent,
			run: async () => expect(name, sent, await exchange(url, head, body, options.timeoutMs)),
		});

	// Without the secret: the door's 401, and nothing before it.
	for (const path of paths) {
		const target = at(path);
		const request = (method: string, extra = "") =>
			`${method} ${target} HTTP/1.1\r\n${host}${extra}Connection: close\r\n\r\n`;
		if (!isPublic("GET", path)) send("GET", `GET ${path}`, request("GET"));
		if (!isPublic("HEAD", path)) send("HEAD", `HEAD ${path}`, request("HEAD"));
		const megabyte = Buffer.alloc(1 << 20, "a");
		const bodyHead = `Content-Type: application/json\r\nContent-Length: ${megabyte.length}\r\n`;
		if (!isPublic("POST", path)) {
			send("POST, 1 MB body", `POST ${path}`, request("POST", bodyHead), megabyte);
		}
		const preflight = "Origin: https://example.com\r\nAccess-Control-Request-Method: GET\r\n";
		send("OPTIONS, a preflight", `OPTIONS ${path}`, request("OPTIONS", preflight));
		const expect =
			"Content-Type: application/json\r\nContent-Length: 2\r\nExpect: 100-continue\r\n";
		if (!isPublic("POST", path)) {
			send("Expect: 100-continue", `POST ${path}`, request("POST", expect));
		}
		const absolute =
			`GET ${url.protocol}//${url.host}${target} HTTP/1.1\r\n${host}Connection: close\r\n\r\n`;
		send("absolute-form request line", `GET ${url.protocol}//…${path}`, absolute);
		if (isPublic("GET", path)) continue;
		send(
			"two wrong secrets",
			`GET ${path}`,
			request("GET", `x-shared-secret: ${wrong()}\r\nx-shared-secret: ${wrong()}\r\n`),
		);
		send("an empty secret", `GET ${path}`, request("GET", "x-shared-secret: \r\n"));
		send("a wrong secret", `GET ${path}`, request("GET", `x-shared-secret: ${wrong()}\r\n`));
	}
	// Upgrades need the secret on every path. A public path may answer one as a plain request
	// (a server with no upgrade listener does), but never switches it.
	const socketIo = "/socket.io/?EIO=4&transport=websocket";
	const upgradeHead = (path: string) => `GET ${at(path)} HTTP/1.1\r\n${host}${upgrade}\r\n`;
	for (const path of new Set(["/", ...paths, socketIo])) {
		if (!isPublic("GET", path)) {
			send("WebSocket upgrade", `GET ${path} (Upgrade)`, upgradeHead(path));
		}
	}
	for (const { path } of publicPaths) {
		send(
			"upgrade, public path",
			`GET ${path} (Upgrade)`,
			upgradeHead(path),
			undefined,
			notSwitched,
		);
	}
	const polling = "/socket.io/?EIO=4&transport=polling";
	send(
		"socket.io polling handshake",
		`GET ${polling}`,
		`GET ${at(polling)} HTTP/1.1\r\n${host}Connection: close\r\n\r\n`,
	);
	tries.push({
		name: "HTTP/2",
		sent: `GET ${paths[0]} (${url.protocol === "https:" ? "ALPN h2" : "prior knowledge"})`,
		run: async () => {
			const answer = await exchangeHttp2(url, at(paths[0]!), options.timeoutMs);
			// A server that does not speak HTTP/2 holds; silence does not.
			if ("failure" in answer && answer.failure.startsWith("does not speak HTTP/2")) {
				return {
					try: "HTTP/2",
					sent: `GET ${paths[0]}`,
					answer: answer.failure,
					who: "none",
					held: true,
				};
			}
			return refused("HTTP/2", `GET ${paths[0]}`, answer);
		},
	});
	// Public paths answer plain requests without the secret.
	for (const { method, path } of publicPaths) {
		const head = `${method} ${at(path)} HTTP/1.1\r\n${host}Connection: close\r\n\r\n`;
		send("public path", `${method} ${path}`, head, undefined, answered);
	}
	// With the secret, each path gets past the door.
	for (const path of secret ? paths : []) {
		const head = `GET ${
			at(path)
		} HTTP/1.1\r\n${host}x-shared-secret: ${secret}\r\nConnection: close\r\n\r\n`;
		send("with the secret", `GET ${path}`, head, undefined, answered);
	}
	return tries;
}

// The door's 401, and no interim answer before it.
function refused(name: string, sent: string, answer: Answer): Row {
	const held = !("failure" in answer) && answer.status === 401 && answer.challenge &&
		!answer.interim.length;
	return { try: name, sent, ...describe(answer), held };
}

// Any answer but a switch to another protocol.
function notSwitched(name: string, sent: string, answer: Answer): Row {
	return {
		try: name,
		sent,
		...describe(answer),
		held: !("failure" in answer) && answer.status !== 101,
	};
}

// Any real answer but the door's 401: a public path, or a request with the secret.
function answered(name: string, sent: string, answer: Answer): Row {
	const held = !("failure" in answer) && !(answer.status === 401 && answer.challenge) &&
		answer.status !== 101;
	return { try: name, sent, ...describe(answer), held };
}

// ---- The run ----------------------------------------------------------------------------------

async function runAll(tries: Try[]): Promise<Row[]> {
	const rows: Row[] = new Array(tries.length);
	let next = 0;
	const worker = async () => {
		while (next < tries.length) {
			const index = next++;
			rows[index] = await tries[index]!.run();
		}
	};
	await Promise.all(Array.from({ length: AT_ONCE }, worker));
	return rows;
}

function print(rows: Row[]) {
	const columns = ["try", "sent", "answer", "who", "held"] as const;
	const cells = rows.map((row) =>
		columns.map((column) => column === "held" ? (row.held ? "yes" : "NO") : row[column])
	);
	const widths = columns.map((column, index) =>
		Math.max(column.length, ...cells.map((cell) => cell[index]!.length))
	);
	const line = (cell: string[]) =>
		cell.map((text, index) => text.padEnd(widths[index]!)).join("  ").trimEnd();
	console.log(line([...columns]));
	for (const cell of cells) console.log(line(cell));
	const failed = rows.filter((row) => !row.held);
	console.log(
		failed.length
			? `\n${failed.length} of ${rows.length} did not hold: ${
				failed.map((row) => `${row.sent}: ${row.try}`).join("; ")
			}`
			: `\nAll ${rows.length} held.`,
	);
}

try {
	const options = readArguments(process.argv.slice(2));
	const secret = process.env.SHARED_SECRET?.split(",")[0]?.trim() || undefined;
	const rows = await runAll(plan(options.url, options, secret));
	if (options.json) console.log(JSON.stringify(rows, null, 2));
	else print(rows);
	process.exit(rows.every((row) => row.held) ? 0 : 1);
} catch (error) {
	console.error(`check-origin: the check itself failed: ${(error as Error).message}`);
	process.exit(3);
}
