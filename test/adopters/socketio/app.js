// socket.io on the gateway's own server, as moleculer-io's README mixes it in: its `call` event
// runs any action. socket.io answers /socket.io/ before moleculer-web sees the request, and the
// door still stands in front of it. PORT is where it listens. Each connection is told the consumer
// that door.consumerOf(socket.request) reads, as a handler of yours would read it.
const { ServiceBroker } = require("moleculer");
const ApiGateway = require("moleculer-web");
const SocketIOService = require("moleculer-io");
const { SharedSecretMiddleware } = require("./shared-secret.cjs");

const door = SharedSecretMiddleware({ secrets: process.env.SHARED_SECRET });
const broker = new ServiceBroker({ logLevel: "warn", middlewares: [door] });
broker.createService({
	name: "api",
	actions: { protectedAction: () => ({ message: "Access granted" }) },
});
const gateway = broker.createService({
	name: "gateway",
	mixins: [ApiGateway, SocketIOService],
	settings: { port: Number(process.env.PORT), ip: "127.0.0.1", routes: [{ path: "/" }] },
});
broker.start().then(() => {
	gateway.io.on("connection", (socket) => {
		socket.emit("consumer", door.consumerOf(socket.request) ?? null);
	});
	console.log("socket.io ready");
});
