import http from "node:http";
import { ServiceBroker } from "moleculer";
import ApiGateway from "moleculer-web";
import { SharedSecretMiddleware } from "../middleware.ts";
const SECRET = "a3f1c9e07b52d48e96f03a7c1b8e25d4c07f9a16e3b2d58f40a9c6e17b3d2f08";
const withDoor = process.env.DOOR === "1";
const broker = new ServiceBroker({ logger: false, middlewares: withDoor ? [SharedSecretMiddleware({ secrets: SECRET })] : [] });
broker.createService({ name: "api", actions: { protectedAction: () => ({ message: "Access granted" }) } });
const gw = broker.createService({ name: "gateway", mixins: [ApiGateway], settings: { port: 0, logRequest: null, logResponse: null, routes: [{ path: "/", mappingPolicy: "restrict", aliases: { "GET /api/protected": "api.protectedAction" } }] } });
await broker.start();
const port = ((gw as any).server.address() as any).port;
const agent = new http.Agent({ keepAlive: true, maxSockets: 16 });
let left = 40000;
async function one(): Promise<void> {
	while (left-- > 0) {
		await new Promise<void>((resolve) => http.get({ port, path: "/api/protected", agent, headers: { "x-shared-secret": SECRET, "user-agent": "x", accept: "*/*" } }, (res) => { res.resume().on("end", resolve); }));
	}
}
const t = performance.now();
await Promise.all(Array.from({ length: 16 }, one));
console.log(withDoor ? "door" : "none", (performance.now() - t).toFixed(0), "ms");
process.exit(0);
