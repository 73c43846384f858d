package redisstore

import (
	"context"
	"fmt"
	"math/rand/v2"
	"regexp"
	"strconv"
	"testing"

	"github.com/connectlimit/connectlimit/internal/redistest"
)

// BenchmarkScript measures batch.lua alone, on the server: batches of 50
// bucket requests, over many subjects (most of them adding a bucket to
// its group) or one (denied after the first hundred), and reports the
// server's CPU time per request.
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
	const batch = 50
	for _, hot := range []bool{false, true} {
		b.Run(fmt.Sprintf("hot=%v", hot), func(b *testing.B) {
			keys := make([]string, batch)
			args := make([]any, batch+1)
			args[0] = ""
			before := used()
			for b.Loop() {
				for i := range batch {
					u := rand.IntN(1 << 20)
					if hot {
						u = 1
					}
					keys[i] = fmt.Sprintf("s:{g/%d}", u%65536)
					args[i+1] = fmt.Sprintf("take - user:%d/b 100 10 1", u)
				}
				if err := batchScript.Run(ctx, client, keys, args...).Err(); err != nil {
					b.Fatal(err)
				}
			}
			b.ReportMetric((used()-before)*1e6/float64(b.N*batch), "redis-µs/req")
		})
	}
}
