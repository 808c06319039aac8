/**
 * The `api` service: what the origin exists to serve.
 *
 * It knows nothing about the shared secret. The door in middleware.ts stands in
 * front of the HTTP gateway, so by the time an HTTP request reaches an action
 * here, the gateway has already vouched for its caller.
 */
import type { Context, ServiceSchema } from "moleculer";

export const ApiService: ServiceSchema = {
	name: "api",

	actions: {
		// GET /api/protected: reachable only with the right x-shared-secret.
		protectedAction: {
			// Safe to run twice, so in a cluster a call lost with a dying node
			// is retried on another (index.ts sets how often). Leave this out
			// of any action that changes something.
			retryPolicy: { enabled: true },
			handler() {
				return { message: "Access granted" };
			}
		},

		// GET /api/whoami: who is calling, as any action reads it. The door puts
		// the consumer the gateway names (Zuplo's request.user.sub) into
		// ctx.meta.user, on requests with the secret only; otherwise there is
		// no ctx.meta.user, and this answers null.
		whoami: {
			retryPolicy: { enabled: true },
			handler(ctx: Context<unknown, { user?: { sub: string } }>) {
				return { consumer: ctx.meta.user?.sub ?? null };
			}
		},

		// GET /health: public, so a load balancer or uptime check needs no
		// secret. It says only that the process is up, nothing more.
		health: {
			retryPolicy: { enabled: true },
			handler() {
				return { status: "ok" };
			}
		}
	}
};
