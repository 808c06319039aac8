// Calls greeter inside the broker: an internal call carries no HTTP headers, and the door
// must leave it alone.
module.exports = {
	name: "orders",
	actions: {
		async create(ctx) {
			const greeting = await ctx.call("greeter.hello");
			return { greeting, user: ctx.meta.user ?? null, consumer: ctx.meta.consumer ?? null };
		},
	},
};
