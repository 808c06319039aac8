/**
 * The card's own commands: `tsx index.ts`, `node index.ts`, `bun index.ts` and
 * `deno run index.ts` read .env from the folder they start in, and a variable
 * already in the environment wins over it. Runs on whichever runtime runs the tests.
 */
import assert from "node:assert/strict";
import { mkdtempSync, writeFileSync } from "node:fs";
import { tmpdir } from "node:os";
import { join } from "node:path";
import { test } from "node:test";
import { OLD_SECRET, SECRET, startOrigin } from "./origin.ts";

// A folder with a .env, as `npm run setup` leaves one: its secret is OLD_SECRET.
const folder = mkdtempSync(join(tmpdir(), "dotenv-"));
writeFileSync(
	join(folder, ".env"),
	`SHARED_SECRET=${OLD_SECRET}\nPUBLIC_PATHS=GET /api/whoami\nLOGLEVEL=warn\n`,
);

const status = async (url: string, secret?: string) =>
	(await fetch(url, { headers: secret ? { "x-shared-secret": secret } : {} })).status;

test(".env is read when SHARED_SECRET is not in the environment", async () => {
	const origin = await startOrigin({ SHARED_SECRET: undefined }, { cwd: folder });
	try {
		assert.equal(await status(`${origin.url}/api/protected`, OLD_SECRET), 200);
		assert.equal(await status(`${origin.url}/api/protected`), 401);
		// Its other lines count too: PUBLIC_PATHS from .env opens /api/whoami.
		assert.equal(await status(`${origin.url}/api/whoami`), 200);
	} finally {
		await origin.stop();
	}
});

test("a variable in the environment wins over .env", async () => {
	// LOGLEVEL=info from the environment, over .env's warn: the ready line shows.
	const origin = await startOrigin(
		{ SHARED_SECRET: SECRET, PUBLIC_PATHS: "", LOGLEVEL: "info" },
		{ cwd: folder },
	);
	try {
		assert.equal(await status(`${origin.url}/api/protected`, SECRET), 200);
		assert.equal(await status(`${origin.url}/api/protected`, OLD_SECRET), 401);
		assert.equal(
			await status(`${origin.url}/api/whoami`),
			401,
			"PUBLIC_PATHS= from the environment, over .env's",
		);
	} finally {
		await origin.stop();
	}
});
