package server_test

import (
	"net/http"
	"slices"
	"strings"
	"testing"

	"connectrpc.com/connect"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/connectlimit/connectlimit/internal/redistest"
	"github.com/connectlimit/connectlimit/server"
)

// TestRedisOptionsFromConfig checks that redis_groups and denial_cache
// reach the Redis store and the interceptor: every bucket lives in one of
// the configured groups, and a denied caller is denied in process only
// while the denial cache is on.
func TestRedisOptionsFromConfig(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name        string
		yaml        string
		localDenies bool
	}{
		{"defaults", "", true},
		{"denial cache off", "denial_cache: false\n", false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			rs := redistest.Start(t)
			cfg, err := server.ParseConfig([]byte(validYAML + "redis_groups: 1\n" + tc.yaml))
			if err != nil {
				t.Fatal(err)
			}
			srv, err := server.New(cfg, server.WithRedisURL("redis://"+rs.Addr()+"/0"))
			if err != nil {
				t.Fatal(err)
			}
			url := serve(t, srv)
			client := connect.NewClient[wrapperspb.StringValue, wrapperspb.StringValue](http.DefaultClient, url)
			denied := 0
			for range 20 {
				_, err := client.CallUnary(t.Context(), connect.NewRequest(wrapperspb.String("q")))
				if connect.CodeOf(err) == connect.CodeResourceExhausted {
					denied++
				} else if err != nil {
					t.Fatal(err)
				}
			}
			if denied != 18 {
				t.Fatalf("%d of 20 calls denied, want 18 (capacity 2)", denied)
			}
			if got := srv.Interceptor().Stats().DeniedLocally; (got > 0) != tc.localDenies {
				t.Errorf("Stats().DeniedLocally = %d with %q", got, tc.yaml)
			}
			keys, err := rs.NewClient(t).Keys(t.Context(), "*").Result()
			if err != nil {
				t.Fatal(err)
			}
			// The buckets, and the request IDs' markers, in the one group.
			if !slices.Contains(keys, "cl:{g/0}") || slices.ContainsFunc(keys, func(k string) bool { return !strings.HasPrefix(k, "cl:{g/0}") }) {
				t.Errorf("Redis keys = %q, want all in the one group of redis_groups: 1, cl:{g/0}", keys)
			}
		})
	}
}
