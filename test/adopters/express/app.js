// An Express app with moleculer-web mounted as middleware (server: false). EXPRESS names the
// Express to load ("express" for 4, "express5" for 5). ON_ERROR=on gives the gateway an onError,
// which the door must honour there too. DOOR_IN_FRONT=on is docs/copy-the-door.md's setup:
// door.express() before everything else in the app (a JSON body parser, a logger that writes
// headers, a route of its own), and door.guard(server) for a `ws` server on the app's server,
// whose handler sends the consumer that door.consumerOf(req) reads.
const http = require("node:http");
const express = require(process.env.EXPRESS);
const { WebSocketServer } = require("ws");
const { ServiceBroker } = require("moleculer");
const ApiGateway = require("moleculer-web");
const { SharedSecretMiddleware } = require("./shared-secret.cjs");

const door = SharedSecretMiddleware({
	secrets: process.env.SHARED_SECRET,
	publicPaths: process.env.PUBLIC_PATHS,
});
const broker = new ServiceBroker({ logLevel: "warn", middlewares: [door] });
broker.createService({
	name: "greeter",
	actions: { hello: () => "Hello Moleculer", meta: (ctx) => ctx.meta },
});
const gateway = broker.createService({
	name: "api",
	mixins: [ApiGateway],
	settings: {
		server: false,
		routes: [{
			path: "/",
			aliases: {
				"GET /greeter/hello": "greeter.hello",
				"GET /status": "greeter.hello",
				"GET /meta": "greeter.meta",
			},
			// Hands the services every form of the headers: none may hold the secret.
			onBeforeCall(ctx, _route, req) {
				const { headers, rawHeaders, headersDistinct } = req;
				Object.assign(ctx.meta, { headers, rawHeaders, headersDistinct });
			},
		}],
		onError: process.env.ON_ERROR === "on"
			? (_req, res, error) =>
				res.writeHead(error.code, { "Content-Type": "text/plain" }).end(
					`custom ${error.message}`,
				)
			: undefined,
	},
});

const app = express();
if (process.env.DOOR_IN_FRONT === "on") {
	app.use(door.express());
	app.use(express.json({ limit: "100kb" }));
	// A logger that writes every header: behind the door, it never sees the secret.
	app.use((req, _res, next) =>
		next(console.log(`request headers ${JSON.stringify(req.headers)}`))
	);
	app.get("/express-status", (_req, res) => res.json({ express: "up" }));
} else {
	// A logger before the gateway that reads headersDistinct: Node builds it then, with the secret.
	app.use((req, _res, next) => next(void req.headersDistinct));
}
app.use("/api", gateway.express());
const server = http.createServer(app);
if (process.env.DOOR_IN_FRONT === "on") {
	door.guard(server);
	const sockets = new WebSocketServer({ server });
	sockets.on("connection", (socket, req) => {
		socket.send(JSON.stringify({ consumer: door.consumerOf(req) ?? null }));
	});
}
broker.start().then(() => {
	server.listen(
		0,
		"127.0.0.1",
		() => console.log(`Express ready at http://127.0.0.1:${server.address().port}`),
	);
});
