// Command bench measures connectlimit's stores side by side with their
// peers, in one run against one redis-server that it starts itself on a
// free loopback port (and kills by PID when it ends, even on an error or
// Ctrl-C): connectlimit's Redis store (bucket/redisstore), alone and behind
// its local denial cache (bucket/denycache), go-redis's
// redis_rate, the textbook Lua token bucket (textbook.lua), connectlimit's
// in-memory store (bucket/memstore) and golang.org/x/time/rate in a
// mutex-guarded map; the Redis server's own ceiling (redis-benchmark,
// EVALSHA pipelined 16 deep); Redis and heap memory per bucket; and Connect
// calls through the example service with and without the interceptor. It
// prints one Markdown table. See README.md for what each column means.
//
//	go run -C bench .                  # the full run, about 9 minutes
//	go run -C bench . -quick           # a smoke run of a few seconds
//	go run -C bench . -only connectlimit,redis_rate,throughput -runs 3
//
// It is a module of its own, so that the libraries it compares never become
// dependencies of connectlimit.
package main

import (
	"bufio"
	"context"
	"errors"
	"flag"
	"fmt"
	"io"
	"math"
	"math/rand/v2"
	"os"
	"os/signal"
	"runtime"
	"runtime/debug"
	"slices"
	"strconv"
	"strings"
	"syscall"
	"time"
)

// Section names, as -only accepts them.
const (
	sectionThroughput  = "throughput"
	sectionCeiling     = "ceiling"
	sectionRedisMemory = "redis-memory"
	sectionHeapMemory  = "heap-memory"
	sectionE2E         = "e2e"
)

// allPeers, redisPeers and allSections list the names -only accepts, in
// the table's order; redisMemoryPeers are the peers of the Redis memory
// section (the denial cache changes nothing in Redis).
var (
	allPeers         = []string{peerRedisStore, peerDenyCache, peerRedisRate, peerTextbook, peerMemStore, peerXRate}
	redisPeers       = []string{peerRedisStore, peerDenyCache, peerRedisRate, peerTextbook}
	redisMemoryPeers = []string{peerRedisStore, peerRedisRate, peerTextbook}
	allSections      = []string{sectionThroughput, sectionCeiling, sectionRedisMemory, sectionHeapMemory, sectionE2E}
)

// main runs the program until it ends or gets SIGINT or SIGTERM, and exits
// with status 1 on an error.
func main() {
	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt, syscall.SIGTERM)
	// A second signal kills the program at once; the kernel then kills
	// its redis-server (Pdeathsig, on Linux).
	context.AfterFunc(ctx, stop)
	err := run(ctx, os.Args[1:], os.Stdout, os.Stderr)
	stop()
	if err != nil {
		if errors.Is(err, flag.ErrHelp) {
			return
		}
		fmt.Fprintln(os.Stderr, "bench:", err)
		os.Exit(1)
	}
}

// options are the parsed flags.
type options struct {
	duration    time.Duration
	runs        int
	callers     []int
	e2eCallers  []int
	identities  int
	users       int
	pool        int
	limit       limitSpec
	peers       []string
	sections    []string
	e2eProtocol string
	quick       bool
}

// parseFlags parses args; -quick changes the defaults of the flags not
// given.
func parseFlags(args []string, stderr io.Writer) (*options, error) {
	fs := flag.NewFlagSet("bench", flag.ContinueOnError)
	fs.SetOutput(stderr)
	o := &options{}
	fs.DurationVar(&o.duration, "duration", 2*time.Second, "how long each cell (peer × workload × callers) is measured, after a warm-up of a fifth of it")
	fs.IntVar(&o.runs, "runs", 1, "how many times the throughput and end-to-end cells run; the table shows medians")
	callers := fs.String("callers", "1,16,128,512", "comma-separated numbers of concurrent callers for the throughput section")
	e2eCallers := fs.String("e2e-callers", "16,128", "comma-separated numbers of concurrent callers for the end-to-end section")
	fs.IntVar(&o.identities, "identities", 1_000_000, "identities loaded to measure memory per bucket")
	fs.IntVar(&o.users, "users", 100_000, "subjects the many-users workload spreads its callers over")
	fs.IntVar(&o.pool, "pool", 20, "go-redis connection pool size of each Redis peer")
	fs.Float64Var(&o.limit.Capacity, "capacity", 100, "bucket capacity, in tokens, of the throughput section")
	fs.Float64Var(&o.limit.RefillPerSecond, "refill", 10, "bucket refill, in tokens per second, of the throughput section")
	only := fs.String("only", "", "comma-separated peers ("+strings.Join(allPeers, ", ")+") and sections ("+strings.Join(allSections, ", ")+
		") to run; naming no peer runs every peer, naming no section every section")
	fs.StringVar(&o.e2eProtocol, "e2e-protocol", "h1", "protocol of the end-to-end client: h1 (HTTP/1.1) or h2c")
	fs.BoolVar(&o.quick, "quick", false, "a smoke run: unless given, -duration 200ms, -callers 1,16, -e2e-callers 16, -identities 2000, -users 2000")
	if err := fs.Parse(args); err != nil {
		return nil, err
	}
	if fs.NArg() > 0 {
		return nil, fmt.Errorf("unexpected arguments %q", fs.Args())
	}
	if o.quick {
		set := make(map[string]bool)
		fs.Visit(func(f *flag.Flag) { set[f.Name] = true })
		quick := map[string]string{"duration": "200ms", "callers": "1,16", "e2e-callers": "16", "identities": "2000", "users": "2000"}
		for name, v := range quick {
			if !set[name] {
				_ = fs.Set(name, v)
			}
		}
	}
	var err error
	if o.callers, err = parseInts("-callers", *callers); err != nil {
		return nil, err
	}
	if o.e2eCallers, err = parseInts("-e2e-callers", *e2eCallers); err != nil {
		return nil, err
	}
	for _, name := range strings.FieldsFunc(*only, func(r rune) bool { return r == ',' || r == ' ' }) {
		switch {
		case slices.Contains(allPeers, name):
			o.peers = append(o.peers, name)
		case slices.Contains(allSections, name):
			o.sections = append(o.sections, name)
		default:
			return nil, fmt.Errorf("-only: unknown peer or section %q", name)
		}
	}
	if len(o.peers) == 0 {
		o.peers = allPeers
	}
	if len(o.sections) == 0 {
		o.sections = allSections
	}
	switch {
	case o.duration <= 0:
		return nil, fmt.Errorf("-duration must be positive, got %v", o.duration)
	case o.runs < 1:
		return nil, fmt.Errorf("-runs must be at least 1, got %d", o.runs)
	case o.identities < 1 || o.users < 1 || o.pool < 1:
		return nil, fmt.Errorf("-identities, -users and -pool must be at least 1, got %d, %d and %d", o.identities, o.users, o.pool)
	case slices.Max(o.callers) > o.users:
		// The many-users workload gives each caller subjects of its own.
		return nil, fmt.Errorf("-users must be at least the largest of -callers, got %d users and %d callers", o.users, slices.Max(o.callers))
	case o.e2eProtocol != "h1" && o.e2eProtocol != "h2c":
		return nil, fmt.Errorf("-e2e-protocol must be h1 or h2c, got %q", o.e2eProtocol)
	}
	if _, err := redisRateLimit(o.limit); err != nil {
		return nil, fmt.Errorf("-capacity and -refill: %w", err)
	}
	return o, nil
}

// parseInts parses a comma-separated list of positive integers.
func parseInts(flagName, s string) ([]int, error) {
	var out []int
	for _, f := range strings.Split(s, ",") {
		n, err := strconv.Atoi(strings.TrimSpace(f))
		if err != nil || n < 1 {
			return nil, fmt.Errorf("%s: %q is not a positive integer", flagName, f)
		}
		out = append(out, n)
	}
	return out, nil
}

// has reports whether name was selected.
func has(selected []string, name string) bool { return slices.Contains(selected, name) }

// run parses args, runs the selected sections and prints the header and
// table to stdout; progress goes to stderr.
func run(ctx context.Context, args []string, stdout, stderr io.Writer) error {
	o, err := parseFlags(args, stderr)
	if err != nil {
		return err
	}
	began := time.Now()
	load := loadAverage()
	var rs *redisServer
	needRedis := slices.ContainsFunc(o.peers, func(p string) bool { return has(redisPeers, p) }) &&
		(has(o.sections, sectionThroughput) || has(o.sections, sectionRedisMemory)) || has(o.sections, sectionCeiling)
	if needRedis {
		if rs, err = startRedis(ctx); err != nil {
			return fmt.Errorf("starting redis-server: %w", err)
		}
		defer rs.stop()
		fmt.Fprintf(stderr, "bench: redis-server pid %d on %s\n", rs.srv.PID(), rs.srv.Addr())
	}
	b := &bench{o: o, rs: rs, log: stderr}
	b.users = names("u:", o.users)
	var rows []row
	if has(o.sections, sectionThroughput) {
		r, err := b.throughput(ctx)
		if err != nil {
			return err
		}
		rows = append(rows, r...)
	}
	if has(o.sections, sectionCeiling) {
		r, err := b.ceiling(ctx, rows)
		if err != nil {
			return err
		}
		rows = append(rows, r...)
	}
	if has(o.sections, sectionHeapMemory) || has(o.sections, sectionRedisMemory) {
		ids := names("user:", o.identities)
		if has(o.sections, sectionRedisMemory) {
			if peers := intersect(o.peers, redisMemoryPeers); len(peers) > 0 {
				r, err := redisMemory(ctx, rs, peers, ids, o.limit, o.pool, stderr)
				if err != nil {
					return fmt.Errorf("Redis memory: %w", err)
				}
				rows = append(rows, r...)
			}
		}
		if has(o.sections, sectionHeapMemory) {
			if peers := intersect(o.peers, []string{peerMemStore, peerXRate}); len(peers) > 0 {
				r, err := heapMemory(ctx, peers, ids, b.users, o.limit)
				if err != nil {
					return fmt.Errorf("heap memory: %w", err)
				}
				rows = append(rows, r...)
			}
		}
	}
	if has(o.sections, sectionE2E) {
		r, err := b.e2e(ctx)
		if err != nil {
			return fmt.Errorf("end to end: %w", err)
		}
		rows = append(rows, r...)
	}
	if err := ctx.Err(); err != nil {
		return err
	}
	redisVersion := "not started"
	if rs != nil {
		redisVersion = rs.version(ctx)
	}
	fmt.Fprintf(stdout, "connectlimit bench, %s (took %v)\n\n", began.UTC().Format("2006-01-02 15:04 MST"), time.Since(began).Round(time.Second))
	fmt.Fprintf(stdout, "- machine: %s, %d cores (GOMAXPROCS %d), load average %s at start\n", cpuModel(), runtime.NumCPU(), runtime.GOMAXPROCS(0), load)
	fmt.Fprintf(stdout, "- software: %s %s/%s, Redis %s\n", runtime.Version(), runtime.GOOS, runtime.GOARCH, redisVersion)
	flags := strings.Join(args, " ")
	if flags == "" {
		flags = "(none: the defaults)"
	}
	fmt.Fprintf(stdout, "- flags: %s\n", flags)
	fmt.Fprintf(stdout, "- settings: -duration %v per cell, medians of %d runs, capacity %g, refill %g/s, go-redis pool %d, %d users, %d identities\n\n",
		o.duration, o.runs, o.limit.Capacity, o.limit.RefillPerSecond, o.pool, o.users, o.identities)
	return writeTable(stdout, rows)
}

// intersect returns the names of want that are in selected, in want's
// order.
func intersect(selected, want []string) []string {
	var out []string
	for _, w := range want {
		if has(selected, w) {
			out = append(out, w)
		}
	}
	return out
}

// names returns prefix + i for i in [0, n).
func names(prefix string, n int) []string {
	out := make([]string, n)
	for i := range out {
		out[i] = prefix + strconv.Itoa(i)
	}
	return out
}

// cpuModel returns the first "model name" of /proc/cpuinfo.
func cpuModel() string {
	f, err := os.Open("/proc/cpuinfo")
	if err != nil {
		return runtime.GOARCH
	}
	defer f.Close()
	sc := bufio.NewScanner(f)
	for sc.Scan() {
		if k, v, ok := strings.Cut(sc.Text(), ":"); ok && strings.TrimSpace(k) == "model name" {
			return strings.TrimSpace(v)
		}
	}
	return runtime.GOARCH
}

// loadAverage returns the 1, 5 and 15 minute load averages of
// /proc/loadavg.
func loadAverage() string {
	b, err := os.ReadFile("/proc/loadavg")
	if err != nil {
		return "unknown"
	}
	f := strings.Fields(string(b))
	if len(f) < 3 {
		return "unknown"
	}
	return strings.Join(f[:3], " ")
}

// bench holds what the sections share.
type bench struct {
	o     *options
	rs    *redisServer
	log   io.Writer
	users []string
	// cells counts the cells run, to give each hot-user cell a subject
	// of its own (which starts full).
	cells int
}

// workloads are the throughput section's two ways of choosing subjects.
var workloads = []string{"many users", "one hot user"}

// throughput runs every selected peer at every number of callers on both
// workloads, -runs times (interleaved, so that a noisy moment hurts one
// run of every peer rather than every run of one), and returns one row of
// medians per cell; its ratios are the medians of each run's ratios.
func (b *bench) throughput(ctx context.Context) ([]row, error) {
	type key struct {
		peer, workload string
		callers        int
	}
	runs := make(map[key][]row)
	var order []key
	for run := range b.o.runs {
		var measured []row
		peers := inTurn(b.o.peers, run)
		for _, workload := range workloads {
			for _, callers := range b.o.callers {
				for _, name := range peers {
					if b.rs == nil && has(redisPeers, name) {
						continue
					}
					r, err := b.cell(ctx, name, workload, callers)
					if err != nil {
						return nil, fmt.Errorf("%s, %s, %d callers: %w", name, workload, callers, err)
					}
					measured = append(measured, r)
					fmt.Fprintf(b.log, "bench: run %d, %s, %s, %d callers: %.0f decisions/s, p99 %s, %.0f errors\n",
						run+1, name, workload, callers, r.opsPerSec, latency(r.p99), r.errs)
				}
			}
		}
		// Ratios within a run compare cells measured seconds apart, so
		// that the machine's noise affects both sides alike; the table
		// shows their medians.
		compare(measured)
		for _, r := range measured {
			k := key{r.peer, r.workload, r.callers}
			if run == 0 {
				order = append(order, k)
			}
			runs[k] = append(runs[k], r)
		}
	}
	rows := make([]row, len(order))
	for i, k := range order {
		rows[i] = medianRow(runs[k])
	}
	return rows, nil
}

// settle collects the garbage of what ran before and returns the memory
// it freed to the operating system, so that a cell starts with no
// collection or scavenging left over from the cell or section before it
// (the memory sections free hundreds of megabytes) running in the
// background of its measurement.
func settle() {
	debug.FreeOSMemory()
}

// inTurn returns the order in which run number run measures the cells of
// xs: their own order in even runs, the reverse in odd ones, so that over
// runs no peer always goes first (right after a different cell, or
// section) or last.
func inTurn[T any](xs []T, run int) []T {
	if run%2 == 0 {
		return xs
	}
	r := slices.Clone(xs)
	slices.Reverse(r)
	return r
}

// compare fills each row's ratios with connectlimit's figures (the Redis
// store's for Redis peers, memstore's for in-memory ones) divided by the
// row's, on the same workload and number of callers.
func compare(rows []row) {
	for i := range rows {
		r := &rows[i]
		ref := peerRedisStore
		if !has(redisPeers, r.peer) {
			ref = peerMemStore
		}
		for j := range rows {
			cl := &rows[j]
			if cl.peer == ref && cl.workload == r.workload && cl.callers == r.callers && cl.section == r.section {
				r.ratioOps = cl.opsPerSec / r.opsPerSec
				r.ratioP99 = cl.p99 / r.p99
			}
		}
	}
}

// medianRow returns the first row with each figure replaced by its median
// over rows.
func medianRow(rows []row) row {
	out := rows[0]
	fields := out.figures()
	for f := range fields {
		xs := make([]float64, len(rows))
		for i := range rows {
			xs[i] = *rows[i].figures()[f]
		}
		*fields[f] = median(xs)
	}
	return out
}

// figures returns pointers to every numeric figure of r.
func (r *row) figures() []*float64 {
	return []*float64{
		&r.opsPerSec, &r.p50, &r.p99, &r.errs, &r.clientCPU, &r.redisCPU, &r.redisCalls, &r.redisCmds, &r.callsDenied,
		&r.overAdmitted, &r.deniedShare, &r.bytesPer, &r.allocs, &r.ratioOps, &r.ratioP99, &r.ratioBytes,
	}
}

// manyUsers returns the many-users workload of callers callers on p: caller
// c of n draws each call's subject at random, with a generator of its own,
// from subjects c, c+n, c+2n, … of b.users, so that callers never share a
// subject, and subjects come back in no particular order, as a server's
// callers do. Walking them in a fixed order would also walk, in the order
// they were allocated, whatever a peer allocates per subject on its first
// call (x/time/rate's limiters): hardware prefetching rewards that, and no
// server sees it.
func (b *bench) manyUsers(p peer, callers int) opFunc {
	users := b.users
	rngs := make([]*rand.Rand, callers)
	for c := range rngs {
		rngs[c] = rand.New(rand.NewPCG(uint64(c), uint64(b.cells)))
	}
	return func(ctx context.Context, caller, _ int) (bool, error) {
		// Subjects c, c+n, … below len(users): ceil((len-c)/n) of them.
		own := (len(users) - caller + callers - 1) / callers
		return p.decide(ctx, caller, users[caller+callers*rngs[caller].IntN(own)])
	}
}

// warmup is how long a cell runs unmeasured first: a fifth of -duration,
// between 50 ms and 500 ms.
func (b *bench) warmup() time.Duration {
	return min(max(b.o.duration/5, 50*time.Millisecond), 500*time.Millisecond)
}

// cell measures one peer on one workload at one number of callers, with a
// new peer (so a new client and connection pool), after a warm-up.
func (b *bench) cell(ctx context.Context, name, workload string, callers int) (row, error) {
	cfg := peerConfig{limit: b.o.limit, buckets: oneBucket, pool: b.o.pool, callers: callers}
	if b.rs != nil {
		cfg.addr = b.rs.srv.Addr()
	}
	settle()
	p, err := newPeer(name, cfg)
	if err != nil {
		return row{}, err
	}
	defer func() { _ = p.close() }()
	b.cells++
	section := "in-process"
	if has(redisPeers, name) {
		section = "Redis"
	}
	r := newRow(section, name, workload, callers)
	many := b.manyUsers(p, callers)
	op := many
	hot := workload == "one hot user"
	if hot {
		warmSubject := fmt.Sprintf("hot:%d:warm", b.cells)
		op = func(ctx context.Context, caller, _ int) (bool, error) { return p.decide(ctx, caller, warmSubject) }
	}
	drive(ctx, callers, b.warmup(), op)
	if hot {
		subject := fmt.Sprintf("hot:%d", b.cells)
		op = func(ctx context.Context, caller, _ int) (bool, error) { return p.decide(ctx, caller, subject) }
	}
	var before, after redisSnapshot
	rp, isRedis := p.(redisPeer)
	var sent uint64
	if isRedis {
		if before, err = b.rs.snapshot(ctx); err != nil {
			return row{}, err
		}
		sent = rp.sent()
	}
	res := drive(ctx, callers, b.o.duration, op)
	if err := ctx.Err(); err != nil {
		return row{}, err
	}
	if res.firstErr != nil {
		fmt.Fprintf(b.log, "bench: %s, %s, %d callers: %d errors, the first: %v\n", name, workload, callers, res.errs, res.firstErr)
	}
	ops := float64(res.ops)
	r.opsPerSec = res.rate()
	r.p50 = float64(res.hist.quantile(0.50))
	r.p99 = float64(res.hist.quantile(0.99))
	r.errs = float64(res.errs)
	r.deniedShare = float64(res.denied) / ops
	r.allocs = float64(res.mallocs) / ops
	r.clientCPU = res.cpu.Seconds() * 1e6 / ops
	if hot {
		r.overAdmitted = math.Max(0, math.Floor(float64(res.allowed)-b.o.limit.bound(res.elapsed)))
	}
	if isRedis {
		if after, err = b.rs.snapshot(ctx); err != nil {
			return row{}, err
		}
		calls := float64(rp.sent() - sent)
		r.redisCPU = (after.cpu - before.cpu) * 1e6 / ops
		r.redisCalls = calls / ops
		r.redisCmds = float64(after.commands-before.commands) / ops
		if hot && res.denied > 0 {
			r.callsDenied = calls / float64(res.denied)
		}
	}
	return r, nil
}

// ceiling runs redis-benchmark twice against the server: EVALSHA of a
// script that only returns 1, and EVALSHA of textbook.lua on random keys;
// each with 50 connections pipelining 16 requests. The ratio compares
// connectlimit's best many-users throughput with it.
func (b *bench) ceiling(ctx context.Context, measured []row) ([]row, error) {
	best := math.NaN()
	for _, r := range measured {
		if r.peer == peerRedisStore && r.workload == "many users" && !(r.opsPerSec <= best) {
			best = r.opsPerSec
		}
	}
	trivial, err := b.rs.admin.ScriptLoad(ctx, "return 1").Result()
	if err != nil {
		return nil, err
	}
	textbook, err := b.rs.admin.ScriptLoad(ctx, textbookLua).Result()
	if err != nil {
		return nil, err
	}
	now := strconv.FormatFloat(float64(time.Now().UnixMicro())/1e6, 'f', 6, 64)
	const clients = 50
	requests := max(10_000, int(300_000*b.o.duration.Seconds()))
	var rows []row
	for _, c := range []struct {
		workload string
		args     []string
	}{
		{"EVALSHA `return 1`, -P 16", []string{"EVALSHA", trivial, "0"}},
		{"EVALSHA textbook.lua, random keys, -P 16", []string{"EVALSHA", textbook, "1", "tb:{u:__rand_int__}:search", "100", "10", now, "1"}},
	} {
		r := newRow("ceiling", "redis-benchmark", c.workload, clients)
		var rps, p50, p99 []float64
		for range b.o.runs {
			cctx, cancel := context.WithTimeout(ctx, 10*b.o.duration+time.Minute)
			res, err := b.rs.redisBenchmark(cctx, clients, requests, c.args...)
			cancel()
			if err != nil {
				fmt.Fprintf(b.log, "bench: %v\n", err)
				r.workload += " (redis-benchmark failed: see the log)"
				break
			}
			rps, p50, p99 = append(rps, res.rps), append(p50, float64(res.p50)), append(p99, float64(res.p99))
		}
		if len(rps) > 0 {
			r.opsPerSec, r.p50, r.p99 = median(rps), median(p50), median(p99)
			r.ratioOps = best / r.opsPerSec
			fmt.Fprintf(b.log, "bench: ceiling, %s: %.0f requests/s\n", c.workload, r.opsPerSec)
		}
		rows = append(rows, r)
	}
	return rows, b.rs.flush(ctx)
}

// e2e measures Search calls through the example service, with and without
// the interceptor, at each -e2e-callers, -runs times interleaved. The
// with-interceptor rows' ratios are the medians of each run's with ÷
// without.
func (b *bench) e2e(ctx context.Context) ([]row, error) {
	var rows []row
	for _, callers := range b.o.e2eCallers {
		var with, without []row
		for run := range b.o.runs {
			var pair [2]row // with, without
			on, off, err := e2ePair(ctx, callers, b.o.duration, b.warmup(), b.o.e2eProtocol, run%2)
			if err != nil {
				return nil, err
			}
			for i, res := range []*cellResult{on, off} {
				peer := "aiservice + interceptor (memstore)"
				if i == 1 {
					peer = "aiservice without interceptor"
				}
				r := newRow("end to end", peer, "Search, 1 API key per caller, "+b.o.e2eProtocol, callers)
				r.opsPerSec = res.rate()
				r.p50, r.p99 = float64(res.hist.quantile(0.5)), float64(res.hist.quantile(0.99))
				r.errs = float64(res.errs)
				if res.firstErr != nil {
					fmt.Fprintf(b.log, "bench: end to end, %d callers: %d errors, the first: %v\n", callers, res.errs, res.firstErr)
				}
				r.deniedShare = float64(res.denied) / float64(res.ops)
				r.allocs = float64(res.mallocs) / float64(res.ops)
				r.clientCPU = res.cpu.Seconds() * 1e6 / float64(res.ops)
				pair[i] = r
				fmt.Fprintf(b.log, "bench: run %d, %s, %d callers: %.0f calls/s, p99 %s\n", run+1, peer, callers, r.opsPerSec, latency(r.p99))
			}
			// The ratio of a run compares two cells measured in turns,
			// slice by slice; the table shows the median of the runs'
			// ratios.
			pair[0].ratioOps, pair[0].ratioP99 = pair[0].opsPerSec/pair[1].opsPerSec, pair[0].p99/pair[1].p99
			with, without = append(with, pair[0]), append(without, pair[1])
		}
		w, wo := medianRow(with), medianRow(without)
		rows = append(rows, w, wo)
	}
	return rows, nil
}
