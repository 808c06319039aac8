// An Express app that mounts moleculer-web as middleware (server: false). EXPRESS names the
// Express to load ("express" for 4, "express5" for 5); ON_ERROR=on gives the gateway an
// onError, which the door must honour there too.
const express = require(process.env.EXPRESS);
const { ServiceBroker } = require("moleculer");
const ApiGateway = require("moleculer-web");
const { SharedSecretMiddleware } = require("./shared-secret.cjs");

const broker = new ServiceBroker({ logLevel: "warn", middlewares: [SharedSecretMiddleware] });
broker.createService({ name: "greeter", actions: { hello: () => "Hello Moleculer" } });
const gateway = broker.createService({
	name: "api",
	mixins: [ApiGateway],
	settings: {
		server: false,
		routes: [{
			path: "/",
			aliases: { "GET /greeter/hello": "greeter.hello", "GET /status": "greeter.hello" },
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
app.use("/api", gateway.express());
broker.start().then(() => {
	const server = app.listen(
		0,
		"127.0.0.1",
		() => console.log(`Express ready at http://127.0.0.1:${server.address().port}`),
	);
});
