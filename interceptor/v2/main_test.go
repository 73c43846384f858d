package interceptor_test

import (
	"log/slog"
	"testing"

	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"

	"github.com/connectlimit/connectlimit/bucket/redisstore"
)

// TestMain checks that no test leaves a goroutine behind: the settle
// queue's worker, the circuit breaker's probe, lease renewals and the
// stream wrappers must all end. go-redis's own log lines are dropped: the
// tests kill Redis on purpose.
func TestMain(m *testing.M) {
	redis.SetLogger(redisstore.NewLogger(slog.New(slog.DiscardHandler)))
	goleak.VerifyTestMain(m,
		// go-redis redials a dead server in the background, once a second;
		// it notices that its client was closed only after that sleep.
		goleak.IgnoreAnyFunction("github.com/redis/go-redis/v9/internal/pool.(*ConnPool).tryDial"),
	)
}
