package redisstore

import (
	"context"
	_ "embed" // for batch.lua
	"errors"
	"fmt"
	"net"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"time"
	"unsafe"

	"github.com/redis/go-redis/v9"

	"github.com/connectlimit/connectlimit/bucket"
)

//go:embed batch.lua
var batchSource string

// batchScript is the one script every Store runs: with EVALSHA and its
// digest, and again with EVAL (which also caches it) if the server answers
// NOSCRIPT, e.g. after a restart or SCRIPT FLUSH, as [redis.Script.Run]
// does (see [Store.exchange] and [Store.pipeline]).
var batchScript = redis.NewScript(batchSource)

// batchDigest and batchText are batchScript's digest and source as
// command arguments, boxed once rather than once per script call.
var (
	batchDigest any = batchScript.Hash()
	batchText   any = batchSource
)

// opState is where an operation is in its life. [Store.mu] guards it.
type opState uint8

const (
	// queued: waiting in the Store's queue, never handed to the client.
	queued opState = iota
	// sent: in a batch handed to the client, not yet answered.
	sent
	// done: answered (reply or err is set) and done is closed.
	done
	// abandoned: its caller stopped waiting; any answer is discarded.
	abandoned
)

// op is one Take, Acquire or Release: what batch.lua needs to run it, and
// the channel its caller waits on. Ops are reused (see newOp and release),
// so that a decision does not allocate one, nor its channel.
type op struct {
	// tag is the hash tag of every key of the operation: its group's
	// ("g/<n>") for a bucket request, the escaped subject for a lease.
	// keys and arg are its part of batch.lua's KEYS and ARGV. All three
	// are set before the operation is queued and never change until it is
	// released.
	tag  string
	keys []string
	arg  string
	// keyBuf backs keys for operations of up to four keys, so that the
	// common ones cost no allocation for them.
	keyBuf [4]string

	// state is guarded by Store.mu. reply (batch.lua's line for the
	// operation) and err are written under it, before state becomes done
	// and a value is sent on done, and read after.
	state opState
	reply string
	err   error
	// done gets one value when the operation is answered. It has room for
	// it, so that answering never blocks, and it is empty again by the
	// time the op is released (see Store.do).
	done chan struct{}

	// refs counts the holders that may still read the op: its caller (in
	// Store.do) and the Store (its queue, then its batch, until every
	// answer to the batch, the late one included, is given). The last to
	// let go puts the op back in opPool, so a batch that outlives its
	// callers' waits never sees its ops reused.
	refs atomic.Int32
}

// opPool holds released ops, each with its channel.
var opPool = sync.Pool{New: func() any { return &op{done: make(chan struct{}, 1)} }}

// newOp returns a blank op from opPool.
func newOp() *op {
	o := opPool.Get().(*op)
	o.keys = o.keyBuf[:0]
	return o
}

// release lets go of one holder's reference to o (see op.refs), and
// returns o to opPool if it was the last. o must not be used after.
func (o *op) release() {
	if o.refs.Add(-1) != 0 {
		return
	}
	o.tag, o.keys, o.arg, o.keyBuf = "", nil, "", [4]string{}
	o.state, o.reply, o.err = queued, "", nil
	opPool.Put(o)
}

// do queues o, starts a batch if fewer than maxInFlight are in flight, and
// waits until o is answered or ctx ends. It returns batch.lua's line for
// o, or an error that wraps [bucket.ErrNotApplied] or
// [bucket.ErrOutcomeUnknown]. o must come from newOp; do releases it.
func (s *Store) do(ctx context.Context, o *op) (string, error) {
	// The caller's reference and the queue's (see op.refs). The results
	// are read before the deferred release.
	o.refs.Store(2)
	defer o.release()
	s.mu.Lock()
	s.queue = append(s.queue, o)
	var batch []*op
	handOff := false
	if s.inFlight < maxInFlight {
		// Light traffic: o goes at once, alone or with whatever queued
		// while the last batches were in flight, on a worker that waits
		// for work (see run) if there is one.
		s.inFlight++
		batch = s.takeLocked()
		if s.idle > 0 {
			s.idle--
			handOff = true
		}
	}
	s.mu.Unlock()
	switch {
	case handOff:
		// Never blocks: the channel has room for every worker.
		s.wake <- batch
	case batch != nil:
		go s.run(batch)
	}

	select {
	case <-o.done:
	case <-ctx.Done():
		s.mu.Lock()
		state := o.state
		if state != done {
			o.state = abandoned
		}
		s.mu.Unlock()
		switch state {
		case queued:
			// takeLocked skips it, so it will never be sent.
			return "", fmt.Errorf("%w: the context ended while the request waited for its turn: %w", bucket.ErrNotApplied, ctx.Err())
		case sent:
			return "", fmt.Errorf("%w: the context ended while the request was in flight: %w", bucket.ErrOutcomeUnknown, ctx.Err())
		case done:
			// Answered meanwhile: the value is in done (answer sends it
			// under s.mu); take it, so that the op's next use starts
			// with an empty channel.
			<-o.done
		}
	}
	if o.err != nil {
		return "", o.err
	}
	if msg, failed := strings.CutPrefix(o.reply, "!"); failed {
		// batch.lua failed this operation alone, before it wrote anything;
		// the server is fine.
		return "", fmt.Errorf("%w: %w: %w", bucket.ErrNotApplied, bucket.ErrRejected, opError(msg))
	}
	return o.reply, nil
}

// opError is batch.lua's error for one operation of a batch: a Redis error
// reply in all but name, which it sends as a line of its reply (see
// batch.lua).
type opError string

// Error implements error.
func (e opError) Error() string { return string(e) }

// RedisError implements [redis.Error], as a Redis error reply does.
func (e opError) RedisError() {}

// takeLocked removes from the queue and returns the next batch: the oldest
// operations still queued, at most maxBatch of them, marked sent. It drops
// abandoned operations on the way. s.mu must be held.
func (s *Store) takeLocked() []*op {
	batch := make([]*op, 0, min(len(s.queue), s.maxBatch))
	i := 0
	for ; i < len(s.queue) && len(batch) < s.maxBatch; i++ {
		o := s.queue[i]
		if o.state != queued {
			// Abandoned: its caller is gone, and now the queue too.
			o.release()
			continue
		}
		o.state = sent
		batch = append(batch, o)
	}
	n := copy(s.queue, s.queue[i:])
	clear(s.queue[n:])
	s.queue = s.queue[:n]
	return batch
}

// run sends batch, then the batches that queued meanwhile, until the queue
// is empty; then it waits up to linger for a batch that [Store.do] hands
// it, and returns if none comes. It runs on a goroutine of its own, which
// exists only while there is work and for linger after, so a Store idle
// for longer has no goroutine and needs no Close. Under light traffic the
// next call finds the worker waiting instead of starting a goroutine,
// whose stack would have to grow again to the depth of a Redis call.
func (s *Store) run(batch []*op) {
	var wait *time.Timer
	for {
		s.send(batch)
		s.mu.Lock()
		batch = s.takeLocked()
		if len(batch) > 0 {
			s.mu.Unlock()
			continue
		}
		s.inFlight--
		s.idle++
		s.mu.Unlock()
		if wait == nil {
			wait = time.NewTimer(linger)
		} else {
			wait.Reset(linger)
		}
		select {
		case batch = <-s.wake:
			continue
		case <-wait.C:
		}
		s.mu.Lock()
		if s.idle > 0 {
			// No batch was handed to a waiting worker: this one leaves.
			s.idle--
			s.mu.Unlock()
			return
		}
		s.mu.Unlock()
		// Every waiting worker has a batch coming (do counted them off
		// under s.mu before sending), this one included.
		batch = <-s.wake
	}
}

// send runs one batch, under a deadline of its own, answers every
// operation of it, and then releases the Store's reference to them.
func (s *Store) send(batch []*op) {
	// The batch's deadline is independent of its callers': each of them
	// stops waiting when its own context ends (see do), while the batch
	// goes on for the others.
	ctx, cancel := context.WithTimeout(context.Background(), s.timeout)
	// A client that honours the deadline answers by then, with an error
	// that says what happened (a refused dial is not a lost reply). One
	// that does not (no ContextTimeoutEnabled) may keep reading until its
	// ReadTimeout; answer its callers half a timeout after the deadline
	// anyway: their batch was handed over, so its outcome is unknown.
	fired := make(chan struct{})
	late := time.AfterFunc(s.timeout+s.timeout/2, func() {
		defer close(fired)
		s.answer(batch, nil, fmt.Errorf("%w: no reply within %v: %w", bucket.ErrOutcomeUnknown, s.timeout, context.DeadlineExceeded))
	})
	s.exchange(ctx, batch)
	cancel()
	if !late.Stop() {
		// The late answer ran, or is running: the ops are not free until
		// it is done with them.
		<-fired
	}
	for _, o := range batch {
		o.release()
	}
}

// exchange sends batch to Redis as one script call, or as a pipeline of
// them (see routing), and answers its operations.
func (s *Store) exchange(ctx context.Context, batch []*op) {
	now := s.nowArg()
	if s.routing == routeOne {
		g := newGroup(batch, now)
		g.cmd = g.call(ctx)
		_ = s.client.Process(ctx, g.cmd)
		if noScript(g.cmd.Err()) {
			g.useEval()
			g.cmd = g.call(ctx)
			_ = s.client.Process(ctx, g.cmd)
		}
		replies, err := s.result(g.cmd, len(batch))
		s.answer(batch, replies, err)
		return
	}
	groups := s.groups(batch, now)
	s.pipeline(ctx, groups)
	for _, g := range groups {
		replies, err := s.result(g.cmd, len(g.ops))
		s.answer(g.ops, replies, err)
	}
}

// answer delivers replies[i] (or err, if it is not nil) to ops[i], for
// every operation still waiting for it.
func (s *Store) answer(ops []*op, replies []string, err error) {
	s.mu.Lock()
	defer s.mu.Unlock()
	for i, o := range ops {
		if o.state != sent {
			continue
		}
		if err != nil {
			o.err = err
		} else {
			o.reply = replies[i]
		}
		o.state = done
		// Never blocks: done has room for the one answer.
		o.done <- struct{}{}
	}
}

// result returns the lines of one script call's reply for n operations,
// or the error every one of them gets. The lines share the reply's bytes.
func (s *Store) result(cmd *redis.Cmd, n int) ([]string, error) {
	if err := cmd.Err(); err != nil {
		return nil, s.failure(err)
	}
	text, err := cmd.Text()
	if err != nil {
		return nil, fmt.Errorf("%w: malformed script reply: %w", bucket.ErrOutcomeUnknown, err)
	}
	return splitLines(text, n)
}

// splitLines splits batch.lua's reply into its n lines.
func splitLines(text string, n int) ([]string, error) {
	lines := make([]string, n)
	for i := range lines {
		line, rest, more := strings.Cut(text, "\n")
		switch {
		case more && i == n-1:
			return nil, fmt.Errorf("%w: malformed script reply: more than %d lines for %d operations", bucket.ErrOutcomeUnknown, n, n)
		case !more && i < n-1:
			return nil, fmt.Errorf("%w: malformed script reply: %d lines for %d operations", bucket.ErrOutcomeUnknown, i+1, n)
		}
		lines[i], text = line, rest
	}
	return lines, nil
}

// failure classifies an error of the client as [bucket.ErrNotApplied] or
// [bucket.ErrOutcomeUnknown] (see [Store.Take]), keeping err in the chain.
func (s *Store) failure(err error) error {
	if s.oneAttempt && refused(err) {
		return fmt.Errorf("%w: %w", bucket.ErrNotApplied, err)
	}
	return fmt.Errorf("%w: %w", bucket.ErrOutcomeUnknown, err)
}

// refused reports whether err proves that the attempt that returned it
// changed nothing: the client failed before sending (it could not dial,
// had no connection to spare, or was closed), or the server answered with
// an error, which batch.lua returns only before it writes (and Redis
// refuses a script, for OOM, LOADING or a wrong slot, only before it runs).
// A lost reply (a timeout, a reset connection, EOF) or a malformed one
// proves nothing.
func refused(err error) bool {
	var rerr redis.Error
	var oerr *net.OpError
	switch {
	case errors.As(err, &rerr):
		return true
	case errors.Is(err, redis.ErrPoolTimeout), errors.Is(err, redis.ErrPoolExhausted), errors.Is(err, redis.ErrClosed):
		return true
	case errors.As(err, &oerr) && oerr.Op == "dial":
		return true
	}
	return false
}

// routing says how a Store splits a batch into script calls.
type routing uint8

const (
	// routeOne sends the whole batch as one script call: the client is a
	// *redis.Client, one server (or Sentinel's current master) holding
	// every key.
	routeOne routing = iota
	// routeSlot sends one script call per Cluster hash slot, so that each
	// call's keys are in one slot, all in one pipeline.
	routeSlot
	// routeTag sends one script call per hash tag (group or subject), all
	// in one pipeline: a *redis.Ring places keys by their hash tag, not by
	// slot, so two tags of one slot may live on different shards, and an
	// unknown client may do either.
	routeTag
)

// group is the part of a batch that goes to Redis as one script call.
type group struct {
	ops []*op
	// args is the call: "evalsha", batch.lua's digest, the number of keys,
	// the keys, the present (see nowArg) and each operation's argument.
	// The keys and arguments are the ops' strings, as *text.
	args []any
	cmd  *redis.Cmd
}

// groupHead is how many arguments of a group's call come before its keys.
const groupHead = 3

// newGroup returns the script call of ops, in order, at the present now
// (see nowArg).
func newGroup(ops []*op, now string) *group {
	n := 0
	for _, o := range ops {
		n += len(o.keys)
	}
	g := &group{ops: ops, args: make([]any, groupHead, groupHead+n+1+len(ops))}
	g.args[0], g.args[1], g.args[2] = "evalsha", batchDigest, n
	for _, o := range ops {
		for i := range o.keys {
			g.args = append(g.args, (*text)(&o.keys[i]))
		}
	}
	g.args = append(g.args, now)
	for _, o := range ops {
		g.args = append(g.args, (*text)(&o.arg))
	}
	return g
}

// text is a command argument that points to an op's string. go-redis
// writes it, routes by it and prints it as that string. Being a pointer,
// it costs no allocation to put in an interface, as a string would; a
// *string would not either, but hooks that print commands (tracing,
// logging) would show its address.
type text string

// MarshalBinary implements [encoding.BinaryMarshaler], which go-redis
// writes: the bytes are the string's own, which go-redis only reads.
func (t *text) MarshalBinary() ([]byte, error) {
	return unsafe.Slice(unsafe.StringData(string(*t)), len(*t)), nil
}

// String implements [fmt.Stringer], which go-redis uses to route a command
// by its first key and to print it.
func (t *text) String() string { return string(*t) }

// call returns a new command of g's call, not yet run.
func (g *group) call(ctx context.Context) *redis.Cmd {
	cmd := redis.NewCmd(ctx, g.args...)
	// Every operation has a key: route by the first.
	cmd.SetFirstKeyPos(groupHead)
	return cmd
}

// useEval turns g's call into an EVAL of batch.lua's source, for a server
// that answered NOSCRIPT.
func (g *group) useEval() { g.args[0], g.args[1] = "eval", batchText }

// noScript reports whether err is the server's NOSCRIPT: it lacks batch.lua
// and ran nothing.
func noScript(err error) bool {
	return err != nil && (errors.Is(err, redis.ErrNoScript) || redis.HasErrorPrefix(err, "NOSCRIPT"))
}

// groups splits batch by hash slot or by hash tag, as s.routing says,
// keeping the order of the operations within each group: only operations
// of one slot (or tag) can touch the same keys, so only their order
// matters.
func (s *Store) groups(batch []*op, now string) []*group {
	if len(batch) == 1 {
		return []*group{newGroup(batch, now)}
	}
	var bySlot map[uint16]int
	var byTag map[string]int
	if s.routing == routeSlot {
		bySlot = make(map[uint16]int)
	} else {
		byTag = make(map[string]int)
	}
	var parts [][]*op
	for _, o := range batch {
		var i int
		var ok bool
		if bySlot != nil {
			sl := slot(o.tag)
			if i, ok = bySlot[sl]; !ok {
				i = len(parts)
				bySlot[sl] = i
			}
		} else if i, ok = byTag[o.tag]; !ok {
			i = len(parts)
			byTag[o.tag] = i
		}
		if !ok {
			parts = append(parts, nil)
		}
		parts[i] = append(parts[i], o)
	}
	groups := make([]*group, len(parts))
	for i, ops := range parts {
		groups[i] = newGroup(ops, now)
	}
	return groups
}

// pipeline runs every group's script call in one pipeline, so that each
// node gets one round trip, with EVALSHA; then it runs again, with EVAL,
// the calls that failed with NOSCRIPT (which were not executed), as
// [redis.Script.Run] does for a single call. It leaves each group's
// outcome in its cmd.
func (s *Store) pipeline(ctx context.Context, groups []*group) {
	// The pipeline's own error is its first command's: each cmd carries
	// its own.
	_, _ = s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for _, g := range groups {
			g.cmd = g.call(ctx)
			_ = p.Process(ctx, g.cmd)
		}
		return nil
	})
	var missing []*group
	for _, g := range groups {
		if noScript(g.cmd.Err()) {
			missing = append(missing, g)
		}
	}
	if len(missing) == 0 {
		return
	}
	_, _ = s.client.Pipelined(ctx, func(p redis.Pipeliner) error {
		for _, g := range missing {
			g.useEval()
			g.cmd = g.call(ctx)
			_ = p.Process(ctx, g.cmd)
		}
		return nil
	})
}

// nowArg is batch.lua's "now" argument: "" to read the server's clock, or
// the test clock's instant in microseconds.
func (s *Store) nowArg() string {
	if s.now == nil {
		return ""
	}
	return strconv.FormatInt(s.now().UnixMicro(), 10)
}

// ceilMicros returns d in whole microseconds, rounded up (without
// overflowing), so that a positive duration never becomes zero.
func ceilMicros(d time.Duration) int64 {
	us := d / time.Microsecond
	if d%time.Microsecond > 0 {
		us++
	}
	return int64(us)
}
