/**
 * A service node for the graceful-stop test: the `api` service, but with a
 * protectedAction that takes SLOW_MS to answer, joined to the cluster through
 * TRANSPORTER and NODE_ID like index.ts. The delay lives here, in the test, not
 * in the template's service.
 */
import { type ActionSchema, type LogLevels, ServiceBroker } from "moleculer";
import { setTimeout as sleep } from "node:timers/promises";
import { ApiService } from "../service.ts";

const broker = new ServiceBroker({
	nodeID: process.env.NODE_ID,
	// At "debug", Moleculer logs each request this node receives.
	logLevel: (process.env.LOGLEVEL ?? "info") as LogLevels,
	transporter: { type: "TCP", options: { urls: process.env.TRANSPORTER, udpDiscovery: false } },
});

broker.createService({
	...ApiService,
	actions: {
		...ApiService.actions,
		protectedAction: {
			// Slower than a cluster's 500 ms requestTimeout (index.ts) by
			// design, so it says how long it may take, as docs/scaling-out.md says to.
			timeout: 10_000,
			async handler() {
				await sleep(Number(process.env.SLOW_MS ?? 1500));
				return { message: "Access granted" };
			},
			// moleculer's types leave out the `timeout` that its timeout middleware reads.
		} as ActionSchema,
	},
});

await broker.start();
broker.logger.info(`Node ready: slow api on ${broker.nodeID}`);
