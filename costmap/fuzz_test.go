package costmap_test

import (
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/connectlimit/connectlimit/costmap"
)

// parseBudget is how long ParseConfig may take on one fuzz input before
// the target calls it a hang: far more than any configuration needs.
const parseBudget = 5 * time.Second

// FuzzParseConfig feeds arbitrary YAML to [costmap.ParseConfig]. It must not
// panic or hang. When it fails, its error starts with "costmap:". When it
// succeeds, [costmap.New] accepts the configuration, and every tier (the
// default one, each declared one, and the anonymous one) has a valid
// [bucket.Limit] for every declared bucket, and every concurrency limit at
// least 1 slot and a positive lease; a tier scaled up never has fewer slots
// than the default limits.
//
// The seeds in testdata/fuzz/FuzzParseConfig are the example service's
// configuration, the README's, and broken variants of them.
func FuzzParseConfig(f *testing.F) {
	f.Fuzz(func(t *testing.T, data []byte) {
		start := time.Now()
		cfg, err := costmap.ParseConfig(data)
		if d := time.Since(start); d > parseBudget {
			t.Fatalf("ParseConfig took %v on %d bytes", d, len(data))
		}
		if err != nil {
			if !strings.HasPrefix(err.Error(), "costmap:") {
				t.Fatalf("ParseConfig error %q does not start with \"costmap:\"", err)
			}
			return
		}
		if err := cfg.Validate(); err != nil {
			t.Fatalf("ParseConfig accepted a configuration that Validate rejects: %v", err)
		}
		m, err := costmap.New(cfg)
		if err != nil {
			t.Fatalf("ParseConfig accepted a configuration that New rejects: %v", err)
		}
		tiers := map[string]*costmap.Tier{}
		for _, name := range append([]string{"", costmap.AnonymousTier}, mapKeys(cfg.Tiers)...) {
			tier, err := m.Tier(name, name == costmap.AnonymousTier)
			if err != nil {
				t.Fatalf("Tier(%q) of an accepted configuration: %v", name, err)
			}
			tiers[name] = tier
		}
		for name, tier := range tiers {
			checkTier(t, cfg, name, tier)
		}
	})
}

// checkTier checks one tier's limits against the configuration.
func checkTier(t *testing.T, cfg costmap.Config, name string, tier *costmap.Tier) {
	t.Helper()
	if got, want := tier.Buckets(), sortedKeys(cfg.Buckets); !slices.Equal(got, want) {
		t.Fatalf("tier %q has buckets %v, want those declared, %v", name, got, want)
	}
	for _, b := range tier.Buckets() {
		l, ok := tier.Limit(b)
		if !ok {
			t.Fatalf("tier %q lists bucket %q but has no limit for it", name, b)
		}
		if err := l.Validate(); err != nil {
			t.Fatalf("tier %q, bucket %q: %v", name, b, err)
		}
	}
	if got, want := tier.ConcurrencyLimits(), sortedKeys(cfg.Concurrency); !slices.Equal(got, want) {
		t.Fatalf("tier %q has concurrency limits %v, want those declared, %v", name, got, want)
	}
	tc, declared := cfg.Tiers[name]
	scale := tc.Scale
	if scale == 0 {
		scale = 1
	}
	for _, c := range tier.ConcurrencyLimits() {
		got, ok := tier.Concurrency(c)
		if !ok || got.Limit < 1 || got.Lease <= 0 {
			t.Fatalf("tier %q, concurrency limit %q: %+v, want at least 1 slot and a positive lease", name, c, got)
		}
		// Scaling up never takes slots away: limit·scale rounded down is at
		// least the limit.
		if _, overridden := tc.Concurrency[c]; declared && !overridden && scale >= 1 && got.Limit < cfg.Concurrency[c].Limit {
			t.Fatalf("tier %q, scale %v: concurrency limit %q has %d slots, fewer than the %d it scales",
				name, scale, c, got.Limit, cfg.Concurrency[c].Limit)
		}
	}
}

func mapKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	return keys
}

func sortedKeys[V any](m map[string]V) []string {
	keys := mapKeys(m)
	slices.Sort(keys)
	return keys
}
