package redisstore

import (
	"context"
	"fmt"
	"math/rand/v2"
	"os"
	"path/filepath"
	"regexp"
	"strconv"
	"testing"

	"github.com/redis/go-redis/v9"

	"github.com/connectlimit/connectlimit/internal/redistest"
)

// BenchmarkScript measures batch.lua alone, on the server: batches of 50
// bucket requests, over many subjects (most of them adding a bucket to
// its group) or one (denied after the first hundred), and reports the
// server's CPU time per request. Over many subjects it also measures two
// lower references from testdata, which run the same buckets with none of
// batch.lua's checks, state or semantics: floor-string keeps a string per
// bucket (redis_rate's layout, batched), floor-hash keeps buckets as
// batch.lua does, in group hashes with an expiry field. What separates
// batch.lua from floor-hash is what it does beyond the token arithmetic;
// what separates floor-hash from floor-string is the layout that keeps a
// bucket under 100 bytes of Redis memory.
//
//	go test -run '^$' -bench BenchmarkScript -count 6 ./bucket/redisstore
func BenchmarkScript(b *testing.B) {
	client := redistest.Start(b).NewClient(b)
	ctx := context.Background()
	cpu := regexp.MustCompile(`(?m)^used_cpu_(?:sys|user):([0-9.]+)`)
	used := func() float64 {
		info, err := client.Info(ctx, "cpu").Result()
		if err != nil {
			b.Fatal(err)
		}
		var t float64
		for _, m := range cpu.FindAllStringSubmatch(info, -1) {
			v, _ := strconv.ParseFloat(m[1], 64)
			t += v
		}
		return t
	}
	floor := func(name string) *redis.Script {
		src, err := os.ReadFile(filepath.Join("testdata", name))
		if err != nil {
			b.Fatal(err)
		}
		return redis.NewScript(string(src))
	}
	const batch = 50
	for _, tc := range []struct {
		name   string
		script *redis.Script
		hot    bool
		// key and arg are a request's key and argument for subject u.
		key, arg func(u int) string
	}{
		{"batch.lua/many", batchScript, false, groupKeyOf, takeArg},
		{"batch.lua/hot", batchScript, true, groupKeyOf, takeArg},
		{"floor-hash/many", floor("floor_hash.lua"), false, groupKeyOf, fieldOf},
		{"floor-string/many", floor("floor_string.lua"), false, func(u int) string { return fmt.Sprintf("f:{user:%d}/b", u) }, fieldOf},
	} {
		b.Run(tc.name, func(b *testing.B) {
			keys := make([]string, batch)
			args := make([]any, batch+1)
			args[0] = ""
			before := used()
			for b.Loop() {
				for i := range batch {
					u := rand.IntN(1 << 20)
					if tc.hot {
						u = 1
					}
					keys[i], args[i+1] = tc.key(u), tc.arg(u)
				}
				if err := tc.script.Run(ctx, client, keys, args...).Err(); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric((used()-before)*1e6/float64(b.N*batch), "redis-µs/req")
		})
	}
}

// groupKeyOf, takeArg and fieldOf are BenchmarkScript's group key,
// batch.lua argument and bucket field for subject u.
func groupKeyOf(u int) string { return fmt.Sprintf("s:{g/%d}", u%65536) }
func takeArg(u int) string    { return fmt.Sprintf("take - user:%d/b 100 10 1", u) }
func fieldOf(u int) string    { return fmt.Sprintf("user:%d/b", u) }
