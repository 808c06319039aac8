/**
 * Run after `npm install` in test/zuplo: `node complete-lockfile.mjs`.
 *
 * Why: the zuplo package lists platform builds as optional dependencies
 * (@zuplo/lint-* and deno's @deno/*), and the npm registry this project is
 * built against lacks the non-Linux ones of the pinned versions. npm then
 * writes a lockfile without them, and `npm ci` on a fresh clone refuses it
 * ("Missing: @zuplo/lint-darwin-arm64@ from lock file"). npm ci only needs
 * each such entry's version and platform to skip it on this machine, so this
 * adds exactly that: version, os, cpu (and libc), and no integrity hash,
 * because there is no tarball here to hash.
 */
import { readFileSync, writeFileSync } from "node:fs";

const lock = JSON.parse(readFileSync("package-lock.json", "utf8"));
const added = [];
for (const [path, entry] of Object.entries(lock.packages)) {
	for (const [name, version] of Object.entries(entry.optionalDependencies ?? {})) {
		const where = `node_modules/${name}`;
		if (lock.packages[where] || lock.packages[`${path}/${where}`]) continue;
		// Names end in the platform: lint-darwin-arm64, linux-arm64-glibc, win32-x64.
		const platform = /(darwin|linux|win32)-(arm64|x64)(?:-(glibc|musl))?$/.exec(name);
		if (!platform) throw new Error(`${name}: no platform in its name; add it by hand`);
		const [, os, cpu, libc] = platform;
		lock.packages[where] = {
			version,
			optional: true,
			os: [os],
			cpu: [cpu],
			...(libc && { libc: [libc] }),
		};
		added.push(`${name}@${version}`);
	}
}
writeFileSync("package-lock.json", `${JSON.stringify(lock, null, 2)}\n`);
console.log(
	added.length
		? `Added to the lockfile: ${added.join(", ")}`
		: "The lockfile lists every optional platform build already.",
);
