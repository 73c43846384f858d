package main

import (
	"bufio"
	"bytes"
	"context"
	"encoding/csv"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/connectlimit/connectlimit/internal/redistest"
)

// harness is the [testing.TB] that [redistest.Start] needs, for a program
// rather than a test: it implements the methods redistest calls (Helper,
// TempDir, Cleanup, Fatalf and the logging ones), and [harness.close] runs
// the cleanups, the last registered first, as a test's end would. Fatalf
// panics with a [harnessFailure], which [startRedis] turns back into an
// error. The embedded TB is nil: a method redistest does not call would
// panic, which keeps this adapter honest about what it supports.
type harness struct {
	testing.TB

	ctx      context.Context
	mu       sync.Mutex
	cleanups []func()
}

// harnessFailure carries the message of a [harness.Fatalf].
type harnessFailure struct{ err error }

// Helper implements testing.TB; it does nothing.
func (h *harness) Helper() {}

// Name implements testing.TB.
func (h *harness) Name() string { return "bench" }

// Context implements testing.TB: the program's context.
func (h *harness) Context() context.Context { return h.ctx }

// Cleanup implements testing.TB: f runs in [harness.close].
func (h *harness) Cleanup(f func()) {
	h.mu.Lock()
	defer h.mu.Unlock()
	h.cleanups = append(h.cleanups, f)
}

// TempDir implements testing.TB: a new directory, removed by close.
func (h *harness) TempDir() string {
	dir, err := os.MkdirTemp("", "connectlimit-bench-")
	if err != nil {
		h.Fatalf("creating a temporary directory: %v", err)
	}
	h.Cleanup(func() { _ = os.RemoveAll(dir) })
	return dir
}

// Fatalf implements testing.TB by panicking with a harnessFailure.
func (h *harness) Fatalf(format string, args ...any) {
	panic(harnessFailure{fmt.Errorf(format, args...)})
}

// Fatal implements testing.TB by panicking with a harnessFailure.
func (h *harness) Fatal(args ...any) { panic(harnessFailure{errors.New(fmt.Sprint(args...))}) }

// Logf implements testing.TB; redistest logs nothing worth keeping here.
func (h *harness) Logf(string, ...any) {}

// Log implements testing.TB.
func (h *harness) Log(...any) {}

// close runs the registered cleanups, the last first. It is safe to call
// more than once.
func (h *harness) close() {
	h.mu.Lock()
	fs := h.cleanups
	h.cleanups = nil
	h.mu.Unlock()
	for i := len(fs) - 1; i >= 0; i-- {
		fs[i]()
	}
}

// redisServer is the redis-server this program started, with a client of
// its own for INFO and FLUSHALL (not counted as any peer's traffic).
type redisServer struct {
	srv   *redistest.Server
	admin *redis.Client
	h     *harness
}

// startRedis starts a redis-server on a free loopback port through
// [redistest.Start]: it persists nothing, and it is killed by PID by
// [redisServer.stop] (or by the kernel, on Linux, if this program dies
// first).
func startRedis(ctx context.Context) (_ *redisServer, err error) {
	h := &harness{ctx: ctx}
	defer func() {
		if r := recover(); r != nil {
			f, ok := r.(harnessFailure)
			if !ok {
				panic(r)
			}
			h.close()
			err = f.err
		}
	}()
	srv := redistest.Start(h)
	admin := redis.NewClient(&redis.Options{Addr: srv.Addr(), MaxRetries: -1, ReadTimeout: time.Minute, WriteTimeout: time.Minute})
	h.Cleanup(func() { _ = admin.Close() })
	return &redisServer{srv: srv, admin: admin, h: h}, nil
}

// stop kills the server by PID and removes its directory. It is safe to
// call more than once.
func (r *redisServer) stop() { r.h.close() }

// info returns the fields of INFO section as a map.
func (r *redisServer) info(ctx context.Context, section string) (map[string]string, error) {
	s, err := r.admin.Info(ctx, section).Result()
	if err != nil {
		return nil, fmt.Errorf("INFO %s: %w", section, err)
	}
	fields := make(map[string]string)
	sc := bufio.NewScanner(strings.NewReader(s))
	for sc.Scan() {
		if k, v, ok := strings.Cut(strings.TrimSpace(sc.Text()), ":"); ok && !strings.HasPrefix(k, "#") {
			fields[k] = v
		}
	}
	return fields, nil
}

// redisSnapshot is what the server had done at one instant.
type redisSnapshot struct {
	// cpu is used_cpu_sys + used_cpu_user, in seconds.
	cpu float64
	// commands is the number of commands the server ran, those run by
	// scripts included, not counting INFO and connection setup (HELLO,
	// CLIENT, PING, SELECT, AUTH), which are the benchmark's own traffic.
	commands uint64
}

// ignoredCommands are the commandstats entries a snapshot leaves out.
var ignoredCommands = []string{"info", "hello", "client|", "ping", "select", "auth", "config|", "flushall", "dbsize", "command|"}

// snapshot reads INFO cpu and INFO commandstats.
func (r *redisServer) snapshot(ctx context.Context) (redisSnapshot, error) {
	var s redisSnapshot
	cpu, err := r.info(ctx, "cpu")
	if err != nil {
		return s, err
	}
	for _, k := range []string{"used_cpu_sys", "used_cpu_user"} {
		v, err := strconv.ParseFloat(cpu[k], 64)
		if err != nil {
			return s, fmt.Errorf("INFO cpu: %s is %q", k, cpu[k])
		}
		s.cpu += v
	}
	stats, err := r.info(ctx, "commandstats")
	if err != nil {
		return s, err
	}
next:
	for k, v := range stats {
		name, ok := strings.CutPrefix(k, "cmdstat_")
		if !ok {
			continue
		}
		for _, ig := range ignoredCommands {
			if name == ig || strings.HasPrefix(name, ig) && strings.HasSuffix(ig, "|") {
				continue next
			}
		}
		calls, ok := strings.CutPrefix(v, "calls=")
		if !ok {
			return s, fmt.Errorf("INFO commandstats: %s is %q", k, v)
		}
		calls, _, _ = strings.Cut(calls, ",")
		n, err := strconv.ParseUint(calls, 10, 64)
		if err != nil {
			return s, fmt.Errorf("INFO commandstats: %s is %q", k, v)
		}
		s.commands += n
	}
	return s, nil
}

// usedMemory returns INFO memory's used_memory, in bytes.
func (r *redisServer) usedMemory(ctx context.Context) (int64, error) {
	mem, err := r.info(ctx, "memory")
	if err != nil {
		return 0, err
	}
	n, err := strconv.ParseInt(mem["used_memory"], 10, 64)
	if err != nil {
		return 0, fmt.Errorf("INFO memory: used_memory is %q", mem["used_memory"])
	}
	return n, nil
}

// version returns the server's redis_version.
func (r *redisServer) version(ctx context.Context) string {
	s, err := r.info(ctx, "server")
	if err != nil {
		return "unknown"
	}
	return s["redis_version"]
}

// flush empties the server (FLUSHALL SYNC). Only ever called on the server
// this program started.
func (r *redisServer) flush(ctx context.Context) error {
	return r.admin.Do(ctx, "FLUSHALL", "SYNC").Err()
}

// dbSize returns the number of keys.
func (r *redisServer) dbSize(ctx context.Context) (int64, error) {
	return r.admin.DBSize(ctx).Result()
}

// ceilingResult is what one redis-benchmark run measured.
type ceilingResult struct {
	rps      float64
	p50, p99 time.Duration
}

// redisBenchmark runs Debian's redis-benchmark against the server: clients
// connections sending requests commands of args, pipelined 16 at a time,
// with __rand_int__ in args replaced by random numbers below 100,000. It
// parses the --csv output.
func (r *redisServer) redisBenchmark(ctx context.Context, clients, requests int, args ...string) (ceilingResult, error) {
	bin, err := exec.LookPath("redis-benchmark")
	if err != nil {
		return ceilingResult{}, fmt.Errorf("redis-benchmark not found (Debian's redis-tools package has it): %w", err)
	}
	host, port, _ := strings.Cut(r.srv.Addr(), ":")
	cmdArgs := append([]string{
		"-h", host, "-p", port, "-c", strconv.Itoa(clients), "-n", strconv.Itoa(requests),
		"-P", "16", "-r", "100000", "--csv",
	}, args...)
	var stdout, stderr bytes.Buffer
	cmd := exec.CommandContext(ctx, bin, cmdArgs...)
	cmd.Stdout, cmd.Stderr = &stdout, &stderr
	cmd.WaitDelay = time.Second
	if err := cmd.Run(); err != nil {
		return ceilingResult{}, fmt.Errorf("redis-benchmark: %w: %s", err, strings.TrimSpace(stderr.String()))
	}
	return parseBenchmarkCSV(stdout.String())
}

// parseBenchmarkCSV reads redis-benchmark's --csv output: a header line
// ("test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms",…) and
// one line per test.
func parseBenchmarkCSV(out string) (ceilingResult, error) {
	records, err := csv.NewReader(strings.NewReader(out)).ReadAll()
	if err != nil || len(records) < 2 {
		return ceilingResult{}, fmt.Errorf("redis-benchmark printed %q, want a CSV header and a row", out)
	}
	col := make(map[string]string)
	for i, name := range records[0] {
		if i < len(records[1]) {
			col[name] = records[1][i]
		}
	}
	var res ceilingResult
	if res.rps, err = strconv.ParseFloat(col["rps"], 64); err != nil {
		return res, fmt.Errorf("redis-benchmark: rps is %q", col["rps"])
	}
	ms := func(name string) time.Duration {
		v, err := strconv.ParseFloat(col[name], 64)
		if err != nil {
			return 0
		}
		return time.Duration(v * float64(time.Millisecond))
	}
	res.p50, res.p99 = ms("p50_latency_ms"), ms("p99_latency_ms")
	return res, nil
}
