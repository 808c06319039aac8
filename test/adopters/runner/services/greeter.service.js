module.exports = {
	name: "greeter",
	actions: {
		hello: () => "Hello Moleculer",
	},
};
