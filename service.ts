/**
 * The `api` service: what the origin exists to serve, the page's `protectedAction` first.
 *
 * It knows nothing about the shared secret. The door in middleware.ts stands in front of
 * the HTTP gateway, so an HTTP request that reaches an action here came through the API
 * gateway.
 */
import type { Context, ServiceSchema } from "moleculer";
import type { SharedSecretMeta } from "./middleware.ts";

export const ApiService: ServiceSchema = {
	name: "api",

	actions: {
		// GET /api/protected: reachable only with the right x-shared-secret.
		protectedAction() {
			return { message: "Access granted" };
		},

		// GET /api/whoami: who is calling, as the API gateway names it, which any action reads
		// the same way. The door sets it on requests with the secret only, and leaves
		// ctx.meta.user to your own auth.
		whoami(ctx: Context<unknown, SharedSecretMeta>) {
			return { consumer: ctx.meta.consumer ?? null };
		},

		// GET /health: public, so a load balancer or uptime check needs no secret. It says
		// only that the process is up.
		health() {
			return { status: "ok" };
		},
	},
};

// Reads, safe to run twice: in a cluster, index.ts retries a call to one of these on another
// node when it is lost with a dying node. Never list an action that changes something.
export const retrySafeActions = ["protectedAction", "whoami", "health"];
