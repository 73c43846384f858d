package interceptor_test

import (
	"slices"
	"testing"
	"time"

	"github.com/connectlimit/connectlimit/interceptor"
)

// BenchmarkStoreDown measures, side by side, how long a unary call takes
// with Redis healthy and with Redis down once the circuit breaker has
// opened, under each failure policy. It reports the median and the 99th
// percentile of the calls' latencies (p50-ns, p99-ns), client included.
//
//	go test -run '^$' -bench BenchmarkStoreDown -count 5 ./interceptor
func BenchmarkStoreDown(b *testing.B) {
	for _, tc := range []struct {
		name   string
		policy interceptor.FailurePolicy
		down   bool
	}{
		{"redis-up", interceptor.FailClosed, false},
		{"redis-down/local", interceptor.FailLocal, true},
		{"redis-down/open", interceptor.FailOpen, true},
		{"redis-down/closed", interceptor.FailClosed, true},
	} {
		b.Run(tc.name, func(b *testing.B) {
			cfg := aiConfig()
			cfg.Buckets["requests"] = bucketConfig(1e12)
			cfg.Buckets["tokens"] = bucketConfig(1e12)
			f := newFaultFixture(b, cfg, tc.policy, interceptor.WithLocalShare(1))
			ask := func() time.Duration {
				start := time.Now()
				_, _ = f.ask.CallUnary(b.Context(), f.request("use=3", 3))
				return time.Since(start)
			}
			ask()
			if tc.down {
				if err := f.redis.Kill(); err != nil {
					b.Fatal(err)
				}
				for f.ic.Stats().BreakerOpens == 0 {
					ask()
				}
			}
			took := make([]time.Duration, 0, b.N)
			b.ResetTimer()
			for range b.N {
				took = append(took, ask())
			}
			b.StopTimer()
			slices.Sort(took)
			b.ReportMetric(float64(took[len(took)/2]), "p50-ns")
			b.ReportMetric(float64(took[len(took)*99/100]), "p99-ns")
		})
	}
}
