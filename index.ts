/**
 * The origin: one Moleculer broker with the `api` service behind a moleculer-web
 * gateway, and SharedSecretMiddleware in front of every HTTP request.
 *
 *     npm run setup    # writes .env with a fresh SHARED_SECRET
 *     npm start        # tsx --env-file-if-exists=.env index.ts
 */
import { ServiceBroker } from "moleculer";
import ApiGateway from "moleculer-web";
import type { Server } from "node:http";
import { SharedSecretMiddleware } from "./middleware.ts";
import { ApiService } from "./service.ts";

// The template's one public route, unless PUBLIC_PATHS says otherwise
// (PUBLIC_PATHS= with nothing after it makes every path need the secret).
process.env.PUBLIC_PATHS ??= "GET /health";

// The middleware reads SHARED_SECRET as the broker is built and stops the
// process with one line if it is missing or weak: nothing below runs then.
const broker = new ServiceBroker({
	logLevel: (process.env.LOGLEVEL ?? "info") as "info",
	middlewares: [SharedSecretMiddleware]
});

broker.createService(ApiService);

const gateway = broker.createService({
	// Not "api", moleculer-web's default name: that is the page's service.
	name: "gateway",
	mixins: [ApiGateway],
	settings: {
		port: Number(process.env.PORT ?? 3000),
		routes: [
			{
				path: "/",
				// Only the aliases below are served. "restrict" keeps Moleculer's
				// internal actions ($node.list, ~node/...) off HTTP, even for
				// callers that hold the secret. Declared aliases exist as soon
				// as the gateway starts; autoAliases would answer 404 for the
				// first half second.
				mappingPolicy: "restrict",
				aliases: {
					"GET /api/protected": "api.protectedAction",
					// Public: see PUBLIC_PATHS above.
					"GET /health": "api.health"
				}
			}
		]
	}
});

await broker.start();

// Ready means ready: the broker has started every service and the gateway is
// listening, so the first request after this line gets its real answer.
// PORT=0 picks a free port; the address says which.
const { port } = (gateway as unknown as { server: Server }).server.address() as { port: number };
broker.logger.info(`Origin ready at http://localhost:${port}`);

/* What a caller sees (with the secret from .env):
 *
 *   $ curl localhost:3000/api/protected -H "x-shared-secret: $SHARED_SECRET"
 *   {"message":"Access granted"}
 *
 *   $ curl localhost:3000/api/protected
 *   {"name":"UnAuthorizedError","message":"No secret provided","code":401,"type":"NO_TOKEN"}
 *
 *   $ curl localhost:3000/api/protected -H "x-shared-secret: wrong"
 *   {"name":"UnAuthorizedError","message":"Invalid secret","code":401,"type":"INVALID_TOKEN"}
 *
 *   $ curl localhost:3000/health
 *   {"status":"ok"}
 */
