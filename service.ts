/**
 * The `api` service: what the origin exists to serve.
 *
 * It knows nothing about the shared secret. The door in middleware.ts stands in
 * front of the HTTP gateway, so by the time an HTTP request reaches an action
 * here, the gateway has already vouched for its caller.
 */
import type { ServiceSchema } from "moleculer";

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
