// An existing JavaScript project, as moleculer-template-project makes one: moleculer-runner
// reads this file. The door is the one line in `middlewares`; DOOR=off leaves it out, so
// the adopters' suite can compare the app's own auth with and without it.
const { SharedSecretMiddleware } = require("./shared-secret.cjs");

const door = SharedSecretMiddleware({
	secrets: process.env.SHARED_SECRET,
	publicPaths: process.env.PUBLIC_PATHS,
});

module.exports = {
	logLevel: "warn",
	middlewares: process.env.DOOR === "off" ? [] : [door],
	metrics: process.env.METRICS === "on" ? { enabled: true, reporter: "Prometheus" } : false,
};
