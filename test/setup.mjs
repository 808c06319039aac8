/**
 * `npm run setup` (and `deno task setup`, `bun run setup`): writes .env from
 * .env.example with a fresh random SHARED_SECRET, so the first start needs no
 * secret of yours and can never use a committed or guessable one.
 *
 * Not a test: it lives in test/ because the template's top level is fixed. It is
 * plain JavaScript so that every runtime runs it as it is, with no TypeScript
 * loader and, on Deno, with no permission beyond these two files.
 */
import { randomBytes } from "node:crypto";
import { existsSync, readFileSync, writeFileSync } from "node:fs";

// Never overwrite: .env may hold the secret your gateway already sends.
if (existsSync(".env")) {
	console.log(".env exists; kept it.");
} else {
	// 32 random bytes, as hex: 64 characters.
	const secret = randomBytes(32).toString("hex");
	const example = readFileSync(".env.example", "utf8");
	// Readable by its owner only: it holds the secret.
	writeFileSync(".env", example.replace(/^SHARED_SECRET=.*$/m, `SHARED_SECRET=${secret}`), {
		mode: 0o600,
	});
	console.log("Wrote .env with a fresh SHARED_SECRET.");
}
