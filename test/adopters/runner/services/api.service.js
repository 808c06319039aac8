// The project's own gateway, with its own auth: one route that authenticates callers by a
// bearer token, and one that only authorizes, refusing requests with no ctx.meta.user.
const ApiGateway = require("moleculer-web");
const { UnAuthorizedError, ERR_INVALID_TOKEN, ERR_NO_TOKEN } = ApiGateway.Errors;

module.exports = {
	name: "api",
	mixins: [ApiGateway],
	settings: {
		port: Number(process.env.PORT),
		routes: [
			{ path: "/api", aliases: { "GET /greeter/hello": "greeter.hello" } },
			{
				path: "/authn",
				authentication: true,
				aliases: { "POST /orders": "orders.create" },
			},
			{
				path: "/authz",
				authorization: true,
				aliases: { "POST /orders": "orders.create" },
			},
		],
	},
	methods: {
		authenticate(_ctx, _route, req) {
			const auth = req.headers.authorization;
			if (auth === "Bearer app-token") return { id: "app-user" };
			if (auth) throw new UnAuthorizedError(ERR_INVALID_TOKEN);
			return null;
		},
		authorize(ctx) {
			if (!ctx.meta.user) throw new UnAuthorizedError(ERR_NO_TOKEN);
		},
	},
};
