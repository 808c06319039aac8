/**
 * Checks a running origin from outside: does anything answer without the secret?
 *
 *     node check-origin.ts https://origin.example.com --public "GET /health" [--json]
 *
 * Every try without the secret must get the door's own 401, which names its header in
 * `WWW-Authenticate`; anything else answered from behind the door. What is public is what the
 * operator declares with --public, never what the origin's environment says: a check that read
 * the origin's PUBLIC_PATHS would call a path that wrongly opens a route "held". With
 * SHARED_SECRET set (the origin's format, "new,old"), each path gets one request signed with the
 * current secret (RFC 9421, as middleware.ts part 2 verifies), which must pass the door: the
 * secret itself never travels. Only an origin whose door takes no signatures gets the secret in
 * a header, and over http:// only to this machine, unless --allow-plain-http. The secret is never
 * printed. It imports only Node's built-ins, so it runs alone after a copy, under Node 22.18+.
 */
import { createHash, createHmac, randomBytes } from "node:crypto";
import http2 from "node:http2";
import { connect as connectTcp, isIP, type Socket } from "node:net";
import { connect as connectTls } from "node:tls";

const USAGE = 'Usage: check-origin <origin-url> [--public "METHOD /path"]... [--path /p]... ' +
	"[--timeout seconds] [--json] [--allow-plain-http] [--help]";
const HELP = `${USAGE}

Tries what an attacker would (bodies, Expect, wrong secrets, upgrades, socket.io, HTTP/2) against
the origin at <origin-url>, a row each, and tells whether every row held.

  --public "METHOD /path"  a path the origin serves without the secret (repeatable); it must
                           answer, and never switch an upgrade. Nothing else is public.
  --path /p                a path to try (repeatable; default: /, /api/protected, /$node/list
                           and a random one)
  --timeout seconds        how long one try waits for its answer (default 5)
  --json                   one JSON document: the rows, and a summary with the verdict
  --allow-plain-http       send SHARED_SECRET over http:// to a host that is not this machine

SHARED_SECRET (optional): the origin's secret, "new,old" as the origin takes it; each path then
gets one request signed with the current one, which must pass the door, and the rows that a
wrong signature and a replayed one must not. The secret never travels, except in a header to an
origin whose door takes no signatures. It is never printed.

Exit codes: 0 every row held; 1 something answered from behind the door, or a refusal was
incomplete; 2 a usage error; 3 nothing could be checked (unreachable, TLS against plain HTTP, no
answer at all, or the origin refuses this checker's own secret).`;
// The door's two challenges: for the header, and for a signature (and in "require" mode).
const CHALLENGES = new Map(
	[
		['SharedSecret header="x-shared-secret"', "header"],
		['SharedSecret signature="zuplo"', "signature"],
	] as const,
);
// How many tries run at once: a few, so a silent server still ends the check within 60 s.
const AT_ONCE = 8;
// How many failed rows the summary line names; the table above it lists them all.
const NAMED_IN_SUMMARY = 5;

/** Why a try got no answer: the verdict tells an unreachable origin from a silent one. */
type Failure = {
	failure: string;
	kind: "unreachable" | "tls" | "silent" | "refused h2" | "secret kept";
};
/** An answer; `challenge` names which of the door's challenges it carried, if any. */
type Answer = {
	status: number;
	challenge: "header" | "signature" | undefined;
	interim: number[];
} | Failure;
type Expectation = "the door's 401" | "an answer" | "no switch" | "passes the door";
type Row = {
	try: string;
	sent: string;
	expected: Expectation;
	answer: string;
	who: string;
	held: boolean;
};
type Try = { name: string; sent: string; expected: Expectation; run(): Promise<Answer> };
type Summary = {
	verdict: "held" | "did not hold" | "not checked";
	exit: 0 | 1 | 3;
	reason: string;
};

// ---- The command line ---------------------------------------------------------------------------

function usageError(message: string): never {
	console.error(`check-origin: ${message}\n${USAGE}`);
	process.exit(2);
}

type Options = ReturnType<typeof readArguments>;

function readArguments(args: string[]) {
	let url: URL | undefined;
	const [paths, publicPaths] = [[] as string[], [] as { method: string; path: string }[]];
	let [timeoutMs, json, allowPlainHttp] = [5000, false, false];
	for (let index = 0; index < args.length; index++) {
		const arg = args[index]!;
		const value = () => args[++index] ?? usageError(`${arg} needs a value.`);
		if (arg === "--help" || arg === "-h") {
			console.log(HELP);
			process.exit(0);
		} else if (arg === "--json") json = true;
		else if (arg === "--allow-plain-http") allowPlainHttp = true;
		else if (arg === "--path") paths.push(value());
		else if (arg === "--public") publicPaths.push(readPublicPath(value()));
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
	return { url, paths, publicPaths, timeoutMs, json, allowPlainHttp };
}

// A public path as the origin's publicPaths take it: "METHOD /exact/path".
function readPublicPath(text: string): { method: string; path: string } {
	const [, method, path] = /^([A-Z]+)\s+(\/\S*)$/.exec(text.trim()) ?? [];
	if (!method || !path) usageError(`--public "${text}" is not "METHOD /path".`);
	return { method, path };
}

// The secret crosses the network in clear over http://, except to this machine.
function isLoopback(hostname: string): boolean {
	const host = hostname.replace(/^\[|\]$/g, "");
	return host === "localhost" || host === "::1" || (isIP(host) === 4 && host.startsWith("127."));
}

// ---- One exchange, byte for byte ----------------------------------------------------------------

const UNREACHABLE = ["ECONNREFUSED", "ENOTFOUND", "EHOSTUNREACH", "ENETUNREACH", "EAI_AGAIN"];

function failureOf(error: NodeJS.ErrnoException): Failure {
	const code = error.code ?? "error";
	if (UNREACHABLE.includes(code)) return { failure: code, kind: "unreachable" };
	if (code.startsWith("ERR_SSL") || code === "EPROTO" || /SSL|TLS/.test(error.message)) {
		return { failure: code, kind: "tls" };
	}
	return { failure: code, kind: "silent" };
}

// Sends `head` (and `body`), and reads status lines until a final one: interim ones (100) are
// kept, since "100 Continue" before a refusal means the server asked for the body.
function exchange(url: URL, head: string, body: Buffer | undefined, ms: number): Promise<Answer> {
	return new Promise((resolve) => {
		const port = Number(url.port) || (url.protocol === "https:" ? 443 : 80);
		// An IPv6 literal is bracketed in a URL, and bare in a connection.
		const host = url.hostname.replace(/^\[|\]$/g, "");
		const socket: Socket = url.protocol === "https:"
			? connectTls({
				host,
				port,
				servername: isIP(host) ? undefined : host,
				ALPNProtocols: ["http/1.1"],
			})
			: connectTcp({ host, port });
		let received = "";
		const interim: number[] = [];
		const done = (answer: Answer) => {
			clearTimeout(timer);
			socket.destroy();
			resolve(answer);
		};
		const timer = setTimeout(
			() => done({ failure: "no answer (timed out)", kind: "silent" }),
			ms,
		);
		socket.on("error", (error: NodeJS.ErrnoException) => done(failureOf(error)));
		socket.on("close", () => done({ failure: "closed without an answer", kind: "silent" }));
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
				const field = lines.find((line) => /^www-authenticate:/i.test(line));
				const challenge = CHALLENGES.get(
					field?.slice(field.indexOf(":") + 1).trim() as never,
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

// One request over HTTP/2: prior knowledge for http:, ALPN h2 for https:. A server that refuses
// HTTP/2 before the request holds: the session fails before the peers exchange SETTINGS, or a
// GOAWAY leaves the stream out. A graceful GOAWAY that covers the stream (RFC 9113 §6.8, as
// nginx and Envoy drain a connection) means the answer is still coming: it is waited for.
function exchangeHttp2(url: URL, path: string, ms: number): Promise<Answer> {
	return new Promise((resolve) => {
		const session = http2.connect(url.origin, { ALPNProtocols: ["h2"] });
		let [settled, excluded] = [false, false];
		const done = (answer: Answer) => {
			clearTimeout(timer);
			session.destroy();
			resolve(answer);
		};
		const refusedBefore = (why: string): Failure => ({
			failure: `does not speak HTTP/2 (${why})`,
			kind: "refused h2",
		});
		const timer = setTimeout(
			() => done({ failure: "no answer (timed out)", kind: "silent" }),
			ms,
		);
		session.on("remoteSettings", () => (settled = true));
		session.on("error", (error: NodeJS.ErrnoException) => {
			const failure = failureOf(error);
			// Unreachable, or TLS that failed, says nothing of HTTP/2.
			if (settled || failure.kind !== "silent") return done(failure);
			done(refusedBefore(failure.failure));
		});
		session.on("goaway", (_code: number, lastStreamId: number) => {
			excluded ||= stream.id === undefined || lastStreamId < stream.id;
		});
		session.on("close", () => {
			if (!settled || excluded) return done(refusedBefore(settled ? "GOAWAY" : "closed"));
			done({ failure: "closed without an answer", kind: "silent" });
		});
		const stream = session.request({ ":path": path });
		stream.on("error", (error: NodeJS.ErrnoException) => {
			// Before SETTINGS, the session's own error or close decides.
			if (!settled) return;
			// REFUSED_STREAM: the server did not process the request (RFC 9113 §8.7).
			if (excluded || stream.rstCode === http2.constants.NGHTTP2_REFUSED_STREAM) {
				return done(refusedBefore(excluded ? "GOAWAY" : "REFUSED_STREAM"));
			}
			done({ failure: error.code ?? "error", kind: "silent" });
		});
		stream.on("response", (headers) => {
			const challenge = CHALLENGES.get(headers["www-authenticate"] as never);
			done({ status: Number(headers[":status"]), challenge, interim: [] });
		});
		stream.end();
	});
}

// ---- What is tried --------------------------------------------------------------------------------

// The origin's signed form (middleware.ts, part 2): RFC 9421, label zuplo, HMAC-SHA256 under the
// secret over the method and the path and query as sent. Each call signs anew: a nonce passes
// once, and `created` must be recent.
function signed(secret: string, method: string, target: string): string {
	const query = target.indexOf("?");
	const [path, search] = query === -1
		? [target, "?"]
		: [target.slice(0, query), target.slice(query)];
	const keyId = createHash("sha256").update(`keyid:${secret}`).digest("base64url").slice(0, 8);
	const nonce = randomBytes(16).toString("base64url");
	const created = Math.floor(Date.now() / 1000);
	const params =
		`("@method" "@path" "@query");created=${created};nonce="${nonce}";keyid="${keyId}";alg="hmac-sha256"`;
	const base =
		`"@method": ${method}\n"@path": ${path}\n"@query": ${search}\n"@signature-params": ${params}`;
	const mac = createHmac("sha256", secret).update(base).digest("base64");
	return `Signature-Input: zuplo=${params}\r\nSignature: zuplo=:${mac}:\r\n`;
}

function plan(options: Options, secret: string | undefined) {
	const { url, publicPaths } = options;
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
	const [tries, skipped] = [[] as Try[], [] as string[]];
	const send = (
		name: string,
		sent: string,
		head: string,
		body?: Buffer,
		expected: Expectation = "the door's 401",
	) => tries.push({
		name,
		sent,
		expected,
		run: () => exchange(url, head, body, options.timeoutMs),
	});

	// Without the secret: the door's 401, and nothing before it. A declared public path skips
	// the rows of its method.
	for (const path of paths) {
		const target = at(path);
		const request = (method: string, extra = "") =>
			`${method} ${target} HTTP/1.1\r\n${host}${extra}Connection: close\r\n\r\n`;
		const unlessPublic = (method: string, add: () => void) =>
			isPublic(method, path) ? skipped.push(`${method} ${target} (declared public)`) : add();
		unlessPublic("GET", () => send("GET", `GET ${target}`, request("GET")));
		unlessPublic("HEAD", () => send("HEAD", `HEAD ${target}`, request("HEAD")));
		const megabyte = Buffer.alloc(1 << 20, "a");
		const bodyHead = `Content-Type: application/json\r\nContent-Length: ${megabyte.length}\r\n`;
		const expect =
			"Content-Type: application/json\r\nContent-Length: 2\r\nExpect: 100-continue\r\n";
		unlessPublic("POST", () => {
			send("POST, 1 MB body", `POST ${target}`, request("POST", bodyHead), megabyte);
			send("Expect: 100-continue", `POST ${target}`, request("POST", expect));
		});
		const preflight = "Origin: https://example.com\r\nAccess-Control-Request-Method: GET\r\n";
		send("OPTIONS, a preflight", `OPTIONS ${target}`, request("OPTIONS", preflight));
		const absolute = `${url.protocol}//${url.host}${target}`;
		send(
			"absolute-form request line",
			`GET ${absolute}`,
			`GET ${absolute} HTTP/1.1\r\n${host}Connection: close\r\n\r\n`,
		);
		if (isPublic("GET", path)) continue;
		const twoWrong = `x-shared-secret: ${wrong()}\r\nx-shared-secret: ${wrong()}\r\n`;
		send("two wrong secrets", `GET ${target}`, request("GET", twoWrong));
		send("an empty secret", `GET ${target}`, request("GET", "x-shared-secret: \r\n"));
		send("a wrong secret", `GET ${target}`, request("GET", `x-shared-secret: ${wrong()}\r\n`));
	}
	// Upgrades need the secret on every path. A public path may answer one as a plain request
	// (a server with no upgrade listener does), but never switches it.
	const socketIo = "/socket.io/?EIO=4&transport=websocket";
	const upgradeHead = (path: string) => `GET ${at(path)} HTTP/1.1\r\n${host}${upgrade}\r\n`;
	for (const path of new Set(["/", ...paths, socketIo])) {
		if (isPublic("GET", path)) continue;
		send("WebSocket upgrade", `GET ${at(path)} (Upgrade)`, upgradeHead(path));
	}
	for (const { path } of publicPaths) {
		const sent = `GET ${at(path)} (Upgrade)`;
		send("upgrade, public path", sent, upgradeHead(path), undefined, "no switch");
	}
	const polling = "/socket.io/?EIO=4&transport=polling";
	send(
		"socket.io polling handshake",
		`GET ${at(polling)}`,
		`GET ${at(polling)} HTTP/1.1\r\n${host}Connection: close\r\n\r\n`,
	);
	const viaHttp2 = url.protocol === "https:" ? "ALPN h2" : "prior knowledge";
	tries.push({
		name: "HTTP/2",
		sent: `GET ${at(paths[0]!)} (${viaHttp2})`,
		expected: "the door's 401",
		run: () => exchangeHttp2(url, at(paths[0]!), options.timeoutMs),
	});
	// Public paths answer plain requests without the secret.
	for (const { method, path } of publicPaths) {
		const head = `${method} ${at(path)} HTTP/1.1\r\n${host}Connection: close\r\n\r\n`;
		send("public path", `${method} ${at(path)}`, head, undefined, "an answer");
	}
	// With the secret, each path gets past the door, signed; a wrong signature and a replayed
	// one do not.
	if (!secret) {
		skipped.push(`${paths.length * 2 + 1} rows with the secret (SHARED_SECRET is not set)`);
	}
	const get = (path: string, extra: string) =>
		`GET ${at(path)} HTTP/1.1\r\n${host}${extra}Connection: close\r\n\r\n`;
	const exchangeGet = (path: string, extra: string) =>
		exchange(url, get(path, extra), undefined, options.timeoutMs);
	for (const path of secret ? paths : []) {
		tries.push({
			name: "signed with the secret",
			sent: `GET ${at(path)}`,
			expected: "passes the door",
			run: async () => {
				const answer = await exchangeGet(path, signed(secret!, "GET", at(path)));
				// The header's challenge to a signed request: a door that takes no signatures.
				if ("failure" in answer || answer.challenge !== "header") return answer;
				if (
					url.protocol === "http:" && !isLoopback(url.hostname) && !options.allowPlainHttp
				) {
					const failure =
						"takes no signatures; the secret stays here (--allow-plain-http)";
					return { failure, kind: "secret kept" };
				}
				return exchangeGet(path, `x-shared-secret: ${secret}\r\n`);
			},
		});
		if (isPublic("GET", path)) continue;
		tries.push({
			name: "a signature under a wrong secret",
			sent: `GET ${at(path)}`,
			expected: "the door's 401",
			run: () => exchangeGet(path, signed(wrong(), "GET", at(path))),
		});
	}
	for (const path of secret ? paths.slice(0, 1) : []) {
		tries.push({
			name: "a signed request, replayed",
			sent: `GET ${at(path)}`,
			expected: "the door's 401",
			run: async () => {
				const once = signed(secret!, "GET", at(path));
				await exchangeGet(path, once);
				return exchangeGet(path, once);
			},
		});
	}
	return { tries, skipped };
}

// Whether an answer is what the row expects.
function holds(expected: Expectation, answer: Answer): boolean {
	if (expected === "the door's 401") {
		// A server that refuses HTTP/2 before the request also holds; silence does not.
		if ("failure" in answer) return answer.kind === "refused h2";
		return answer.status === 401 && answer.challenge !== undefined && !answer.interim.length;
	}
	if ("failure" in answer) return false;
	const byTheDoor = answer.status === 401 && answer.challenge !== undefined;
	// A public path's upgrade: any answer but a switch to another protocol.
	if (expected === "no switch") return answer.status !== 101;
	// A public path, or a request with the secret: a real answer, not the door's 401.
	return !byTheDoor && answer.status !== 101;
}

function rowOf(tried: Try, answer: Answer): Row {
	const { name, sent, expected } = tried;
	const held = holds(expected, answer);
	if ("failure" in answer) {
		return { try: name, sent, expected, answer: answer.failure, who: "none", held };
	}
	const interim = answer.interim.map((status) => `${status}, then `).join("");
	const who = answer.challenge && answer.status === 401 ? "the door" : "behind it";
	return { try: name, sent, expected, answer: `${interim}${answer.status}`, who, held };
}

// ---- The run and its verdict ----------------------------------------------------------------------

async function runAll(tries: Try[]): Promise<{ rows: Row[]; answers: Answer[] }> {
	const [rows, answers] = [new Array<Row>(tries.length), new Array<Answer>(tries.length)];
	let next = 0;
	const worker = async () => {
		while (next < tries.length) {
			const index = next++;
			answers[index] = await tries[index]!.run();
			rows[index] = rowOf(tries[index]!, answers[index]);
		}
	};
	await Promise.all(Array.from({ length: AT_ONCE }, worker));
	return { rows, answers };
}

// 1 when something answered from behind the door or a refusal was incomplete; 3 when nothing
// could be checked. An origin that refuses this checker's own secret is the latter: the rows
// with the secret then say nothing about the door.
function judge(rows: Row[], answers: Answer[]): Summary {
	const failures = answers.filter((answer): answer is Failure => "failure" in answer);
	if (failures.length === answers.length) {
		const kinds = new Set(failures.map((failure) => failure.kind));
		const reason = kinds.has("tls")
			? `TLS against a server that does not speak it (${failures[0]!.failure})`
			: [...kinds].every((kind) => kind === "unreachable")
			? `unreachable (${failures[0]!.failure})`
			: "no answer at all";
		return { verdict: "not checked", exit: 3, reason };
	}
	const secretRows = rows.filter((row) => row.expected === "passes the door");
	const kept = answers.find((answer) => "failure" in answer && answer.kind === "secret kept");
	if (kept && secretRows.every((row) => row.answer === (kept as Failure).failure)) {
		const reason = "the origin's door takes no signatures, and the secret would cross the " +
			"network in clear: use an https:// URL, or pass --allow-plain-http";
		return { verdict: "not checked", exit: 3, reason };
	}
	const secretRefused = secretRows.length > 0 &&
		secretRows.every((row) => row.who === "the door");
	const failed = rows.filter((row) => !row.held && !(secretRefused && secretRows.includes(row)));
	if (failed.length) {
		const named = failed.slice(0, NAMED_IN_SUMMARY).map((row) => `${row.sent}: ${row.try}`);
		const more = failed.length > NAMED_IN_SUMMARY
			? `; and ${failed.length - NAMED_IN_SUMMARY} more (the table lists them)`
			: "";
		const reason = `${failed.length} of ${rows.length} did not hold: ${
			named.join("; ")
		}${more}`;
		return { verdict: "did not hold", exit: 1, reason };
	}
	if (secretRefused) {
		const reason =
			"the origin refuses this checker's own secret: SHARED_SECRET is not one of its";
		return { verdict: "not checked", exit: 3, reason };
	}
	return { verdict: "held", exit: 0, reason: `All ${rows.length} held.` };
}

function print(rows: Row[], skipped: string[], summary: Summary) {
	const columns = ["try", "sent", "expected", "answer", "who", "held"] as const;
	const cells = rows.map((row) =>
		columns.map((column) => column === "held" ? (row.held ? "yes" : "NO") : row[column])
	);
	const widths = columns.map((column, index) =>
		Math.max(column.length, ...cells.map((cell) => cell[index]!.length))
	);
	const line = (cell: readonly string[]) =>
		cell.map((text, index) => text.padEnd(widths[index]!)).join("  ").trimEnd();
	console.log(line(columns));
	for (const cell of cells) console.log(line(cell));
	if (skipped.length) console.log(`\nSkipped: ${skipped.join("; ")}.`);
	const prefix = summary.exit === 3 ? "Nothing could be checked: " : "";
	console.log(`\n${prefix}${summary.reason}`);
}

try {
	const options = readArguments(process.argv.slice(2));
	const secret = process.env.SHARED_SECRET?.split(",")[0]?.trim() || undefined;
	const { tries, skipped } = plan(options, secret);
	const { rows, answers } = await runAll(tries);
	const summary = judge(rows, answers);
	if (options.json) console.log(JSON.stringify({ rows, skipped, summary }, null, 2));
	else print(rows, skipped, summary);
	process.exit(summary.exit);
} catch (error) {
	console.error(`check-origin: the check itself failed: ${(error as Error).message}`);
	process.exit(3);
}
