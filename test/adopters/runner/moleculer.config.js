// An existing JavaScript project, as moleculer-template-project makes one: moleculer-runner
// reads this file. The door is the one line in `middlewares`; DOOR=off leaves it out, so
// the adopters' suite can compare the app's own auth with and without it.
const { SharedSecretMiddleware } = require("./shared-secret.cjs");

module.exports = {
	logLevel: "warn",
	middlewares: process.env.DOOR === "off" ? [] : [SharedSecretMiddleware],
	metrics: process.env.METRICS === "on" ? { enabled: true, reporter: "Prometheus" } : false,
};
