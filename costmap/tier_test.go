package costmap_test

import (
	"strings"
	"testing"
	"time"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/costmap"
	"github.com/connectlimit/connectlimit/internal/prototest"
)

const tiersYAML = `
buckets:
  requests: { capacity: 20,    period: 1h }
  tokens:   { capacity: 10000, period: 1h }
concurrency:
  streams: { limit: 1, lease: 20s }
tiers:
  free:
    buckets:
      requests: { capacity: 200,    period: 1h }
      tokens:   { capacity: 100000, period: 1h }
  pro:
    scale: 100
    concurrency:
      streams: { limit: 4 }
  service:
    buckets:
      requests: { capacity: 10000, refill_per_second: 5 }
default_tier: free
`

func TestTiers(t *testing.T) {
	t.Parallel()
	cfg, err := costmap.ParseConfig([]byte(tiersYAML))
	if err != nil {
		t.Fatal(err)
	}
	svc := prototest.NewService(t, prototest.Method{Name: "M", Limit: prototest.Limit("requests", nil)})
	m, err := costmap.New(cfg, svc)
	if err != nil {
		t.Fatal(err)
	}
	hourly := func(n float64) bucket.Limit { return bucket.Limit{Capacity: n, RefillPerSecond: n / 3600} }
	for _, tc := range []struct {
		tier          string
		anonymous     bool
		wantName      string
		wantRequests  bucket.Limit
		wantTokens    bucket.Limit
		wantStreams   int
		wantLease     time.Duration
		wantErrSubstr string
	}{
		{"", true, "anonymous", hourly(20), hourly(10000), 1, 20 * time.Second, ""},
		{"", false, "free", hourly(200), hourly(100000), 1, 20 * time.Second, ""},
		{"free", false, "free", hourly(200), hourly(100000), 1, 20 * time.Second, ""},
		{"pro", false, "pro", bucket.Limit{Capacity: 2000, RefillPerSecond: 2000.0 / 3600}, bucket.Limit{Capacity: 1e6, RefillPerSecond: 1e6 / 3600}, 4, 20 * time.Second, ""},
		{"service", false, "service", bucket.Limit{Capacity: 10000, RefillPerSecond: 5}, hourly(10000), 1, 20 * time.Second, ""},
		{"gold", false, "", bucket.Limit{}, bucket.Limit{}, 0, 0, `tier "gold" is not declared`},
	} {
		tier, err := m.Tier(tc.tier, tc.anonymous)
		if tc.wantErrSubstr != "" {
			if err == nil || !strings.Contains(err.Error(), tc.wantErrSubstr) {
				t.Errorf("Tier(%q) error = %v, want %q", tc.tier, err, tc.wantErrSubstr)
			}
			continue
		}
		if err != nil {
			t.Fatal(err)
		}
		if tier.Name != tc.wantName {
			t.Errorf("Tier(%q, %v).Name = %q, want %q", tc.tier, tc.anonymous, tier.Name, tc.wantName)
		}
		for name, want := range map[string]bucket.Limit{"requests": tc.wantRequests, "tokens": tc.wantTokens} {
			got, _ := tier.Limit(name)
			if !closeLimit(got, want) {
				t.Errorf("tier %s bucket %s = %+v, want %+v", tier.Name, name, got, want)
			}
		}
		if c, _ := tier.Concurrency("streams"); c.Limit != tc.wantStreams || c.Lease != tc.wantLease {
			t.Errorf("tier %s streams = %+v, want limit %d lease %v", tier.Name, c, tc.wantStreams, tc.wantLease)
		}
		// The rule's charges carry the tier's limits.
		rule, _ := m.Lookup(svc.Methods().Get(0))
		charges, err := rule.Charges(tier, nil)
		if err != nil || !closeLimit(charges[0].Limit, tc.wantRequests) {
			t.Errorf("tier %s: charges %+v, %v", tier.Name, charges, err)
		}
	}
	if got := strings.Join(mustTier(t, m, "pro").Buckets(), ","); got != "requests,tokens" {
		t.Errorf("Buckets() = %s", got)
	}
}

func mustTier(t *testing.T, m *costmap.Map, name string) *costmap.Tier {
	t.Helper()
	tier, err := m.Tier(name, false)
	if err != nil {
		t.Fatal(err)
	}
	return tier
}

func closeLimit(a, b bucket.Limit) bool {
	near := func(x, y float64) bool { return x-y < 1e-9*y+1e-12 && y-x < 1e-9*y+1e-12 }
	return near(a.Capacity, b.Capacity) && near(a.RefillPerSecond, b.RefillPerSecond)
}

func TestTierConfigErrors(t *testing.T) {
	t.Parallel()
	const base = "buckets:\n  tokens: { capacity: 100, period: 1h }\nconcurrency:\n  streams: { limit: 2 }\n"
	for _, tc := range []struct {
		name, yaml string
		wantIn     string
	}{
		{"period and rate", "buckets:\n  tokens: { capacity: 100, period: 1h, refill_per_second: 2 }\n", "both"},
		{"negative period", "buckets:\n  tokens: { capacity: 100, period: -1h }\n", "buckets.tokens.period"},
		{"zero concurrency", "buckets:\n  tokens: { capacity: 100, period: 1h }\nconcurrency:\n  streams: { limit: 0 }\n", "concurrency.streams.limit must be from 1 to 1000000, got 0"},
		{"huge concurrency", "buckets:\n  tokens: { capacity: 100, period: 1h }\nconcurrency:\n  streams: { limit: 1000000000000000000 }\n", "concurrency.streams.limit must be from 1 to 1000000, got 1000000000000000000"},
		{"unknown tier bucket", base + "tiers:\n  pro:\n    buckets:\n      tokenz: { capacity: 1, period: 1s }\n", `"tokenz"`},
		{"bad tier limit", base + "tiers:\n  pro:\n    buckets:\n      tokens: { capacity: -1, period: 1s }\n", "tiers.pro.buckets.tokens.capacity"},
		{"negative scale", base + "tiers:\n  pro:\n    scale: -2\n", "tiers.pro.scale"},
		{"unknown tier concurrency", base + "tiers:\n  pro:\n    concurrency:\n      strems: { limit: 3 }\n", `"strems"`},
		{"negative tier concurrency", base + "tiers:\n  pro:\n    concurrency:\n      streams: { limit: -3 }\n", "tiers.pro.concurrency.streams.limit"},
		{"negative lease", "buckets:\n  tokens: { capacity: 100, period: 1h }\nconcurrency:\n  streams: { limit: 2, lease: -1s }\n", "concurrency.streams.lease"},
		{"lease under a second", "buckets:\n  tokens: { capacity: 100, period: 1h }\nconcurrency:\n  streams: { limit: 2, lease: 1ms }\n", "concurrency.streams.lease must be at least 1s, got 1ms"},
		{"tier lease under a second", base + "tiers:\n  pro:\n    concurrency:\n      streams: { lease: 500ms }\n", "tiers.pro.concurrency.streams.lease must be at least 1s, got 500ms"},
		{"scale past MaxTokens", base + "tiers:\n  pro:\n    scale: 1e14\n", "tiers.pro.scale"},
		{"undeclared default tier", base + "default_tier: gold\n", `default_tier "gold"`},
		{"bad tier name", base + "tiers:\n  Pro: {}\n", `"Pro"`},
		{"static cost over a tier's capacity", base + "tiers:\n  tiny:\n    buckets:\n      tokens: { capacity: 5, period: 1s }\nprocedures:\n  /a.B/C: { bucket: tokens, cost: 10 }\n", "tier tiny"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, err := costmap.ParseConfig([]byte(tc.yaml))
			if err == nil || !strings.Contains(err.Error(), tc.wantIn) {
				t.Fatalf("err = %v, want one mentioning %q", err, tc.wantIn)
			}
		})
	}
}
