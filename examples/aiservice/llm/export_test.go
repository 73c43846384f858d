package llm

// WithClock sets the clock of the model's rate limit; it must follow
// WithRateLimit.
var WithClock = withClock
