/**
 * The last inbound policy before the origin: signs the request the origin will receive, so the
 * shared secret itself never travels (RFC 9421, HMAC-SHA256 under the secret). The origin's door
 * verifies it: middleware.ts, part 2, holds the profile, and docs/zuplo.md the rollout.
 *
 *   Signature-Input: zuplo=("@method" "@path" "@query" "x-consumer");created=...;nonce="...";
 *                    keyid="...";alg="hmac-sha256"
 *   Signature: zuplo=:<base64 of the HMAC of the signature base>:
 *
 * It signs the path and query that this route forwards unchanged (the URL Forward handler, and
 * the WebSocket route's rewrite to the same path). A route that rewrites the path must sign the
 * rewritten one. It runs after forward-consumer, whose x-consumer it signs.
 */
import { type ZuploContext, ZuploRequest } from "@zuplo/runtime";

type Options = { secret?: string };

const LABEL = "zuplo";
// One key a secret, imported once: an isolate serves many requests.
const keys = new Map<string, Promise<{ key: CryptoKey; keyId: string }>>();

function keyFor(secret: string) {
	let found = keys.get(secret);
	if (!found) {
		const bytes = new TextEncoder().encode(secret);
		found = Promise.all([
			crypto.subtle.importKey(
				"raw",
				bytes,
				{ name: "HMAC", hash: "SHA-256" },
				false,
				[
					"sign",
				],
			),
			// keyid names the secret without revealing it: the first 8 characters of the
			// base64url SHA-256 of "keyid:" and the secret, as the door computes it.
			crypto.subtle.digest(
				"SHA-256",
				new TextEncoder().encode(`keyid:${secret}`),
			),
		]).then(([key, digest]) => ({
			key,
			keyId: base64(digest, true).slice(0, 8),
		}));
		keys.set(secret, found);
	}
	return found;
}

function base64(bytes: ArrayBuffer | Uint8Array, url = false): string {
	const text = btoa(String.fromCharCode(...new Uint8Array(bytes)));
	return url ? text.replace(/\+/g, "-").replace(/\//g, "_").replace(/=+$/, "") : text;
}

// Zuplo calls a policy with (request, context, options, policyName) and awaits what it returns.
export default async function signForOrigin(
	request: ZuploRequest,
	context: ZuploContext,
	options: Options,
) {
	// $env(SHARED_SECRET) of a variable that is not set arrives as "undefined": never sign with
	// that, and never forward unsigned. The origin would refuse it anyway.
	const secret = options.secret ?? "";
	if (secret.length < 32 || secret === "undefined") {
		context.log.error(
			"sign-for-origin: SHARED_SECRET is not set; nothing is forwarded.",
		);
		return new Response("The gateway is not configured.", { status: 500 });
	}
	const { key, keyId } = await keyFor(secret);
	const url = new URL(request.url);
	const headers = new Headers(request.headers);
	// A caller's own signature never reaches the origin: this one replaces it.
	headers.delete("signature");
	headers.delete("signature-input");
	const consumer = headers.get("x-consumer");
	const components: [string, string][] = [
		["@method", request.method],
		["@path", url.pathname],
		["@query", url.search || "?"],
	];
	if (consumer !== null) components.push(["x-consumer", consumer]);
	const nonce = base64(crypto.getRandomValues(new Uint8Array(16)), true);
	const created = Math.floor(Date.now() / 1000);
	const names = components.map(([name]) => `"${name}"`).join(" ");
	const params =
		`(${names});created=${created};nonce="${nonce}";keyid="${keyId}";alg="hmac-sha256"`;
	// RFC 9421 §2.5: a line a covered component, then @signature-params.
	const base = components.map(([name, value]) => `"${name}": ${value}\n`).join("") +
		`"@signature-params": ${params}`;
	const signature = await crypto.subtle.sign(
		"HMAC",
		key,
		new TextEncoder().encode(base),
	);
	headers.set("signature-input", `${LABEL}=${params}`);
	headers.set("signature", `${LABEL}=:${base64(signature)}:`);
	return new ZuploRequest(request, { headers });
}
