/**
 * The last inbound policy before the origin: names the caller in `x-consumer`.
 *
 * The API key policy has already checked the key and set request.user, whose
 * `sub` is the consumer's name in Zuplo. The origin's door hands that name to
 * its services as ctx.meta.consumer, on requests that carry the shared secret.
 * set-headers-inbound only takes fixed values and $env(...), so this takes
 * code: Zuplo's documented way is a custom-code-inbound policy like this one.
 */
import { type ZuploContext, ZuploRequest } from "@zuplo/runtime";

// Zuplo calls a policy with (request, context, ...) and awaits what it returns.
export default function forwardConsumer(request: ZuploRequest, _context: ZuploContext) {
	const headers = new Headers(request.headers);
	// Whatever the caller sent as x-consumer goes, always: only the gateway
	// names the consumer.
	headers.delete("x-consumer");
	if (request.user?.sub) headers.set("x-consumer", request.user.sub);
	return new ZuploRequest(request, { headers });
}
