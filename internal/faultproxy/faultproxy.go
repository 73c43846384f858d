// Package faultproxy puts a fault-injecting TCP [Proxy] between a test's
// client and a server, such as a redis-server of redistest, to show what the
// client sees when the network or the peer fails: slow replies, a partition,
// lost replies, reset connections, a dead host.
//
// A Proxy is a github.com/Shopify/toxiproxy/v2 proxy run in the test's own
// process (no toxiproxy binary, no HTTP API) on a free 127.0.0.1 port, with
// its logging off. Its faults come from a toxic of this package that delays,
// drops or resets like toxiproxy's latency, timeout and reset_peer toxics
// without leaking goroutines (see faultToxic). Each method's doc says what a
// client then sees.
//
// Only _test.go files and benchmark programs import this package. It is a
// package of its own, not part of redistest, so that the tests that only need
// a Redis do not build toxiproxy and its dependencies.
package faultproxy

import (
	"bytes"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"net"
	"strconv"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/Shopify/toxiproxy/v2"
	"github.com/Shopify/toxiproxy/v2/stream"
	"github.com/Shopify/toxiproxy/v2/toxics"
	"github.com/rs/zerolog"

	"github.com/connectlimit/connectlimit/internal/freeport"
)

// Names of the toxics a Proxy adds. Every Proxy has a fault toxic in each
// direction from the start; ResetPeer adds toxiproxy's reset_peer toxic
// behind the upstream one while it lasts.
const (
	upFaultToxic   = "fault_upstream"
	downFaultToxic = "fault_downstream"
	lingerToxic    = "reset_linger"
)

// The directions of toxiproxy's streams: upstream is from the client to the
// server, downstream from the server to the client.
const (
	streamUp   = "upstream"
	streamDown = "downstream"
)

// faultToxicType is the toxiproxy type name of faultToxic.
const faultToxicType = "faultproxy"

func init() {
	toxics.Register(faultToxicType, new(faultToxic))
}

// Proxy forwards every TCP connection made to [Proxy.Addr] to its upstream
// address, through the faults set with its methods. Faults apply at once to
// open connections and to new ones, and last until [Proxy.Clear]. Its
// methods are safe for concurrent use.
type Proxy struct {
	upstream string
	proxy    *toxiproxy.Proxy
	faults   *faults
	// mu serialises the changes of toxics.
	mu sync.Mutex
}

// faults is what a Proxy's fault toxics do to each chunk of data.
type faults struct {
	blackhole, dropReplies, reset atomic.Bool
	// latency delays what the upstream sends, in nanoseconds.
	latency atomic.Int64
}

// NewProxy starts a proxy to upstream ("host:port") on a free 127.0.0.1 port
// without any fault, and registers a cleanup that stops it and closes every
// connection through it. It fails tb if the proxy cannot listen. Upstream
// need not be up yet: the proxy dials it for each accepted connection, and
// closes the client's connection at once if that dial fails.
func NewProxy(tb testing.TB, upstream string) *Proxy {
	tb.Helper()
	server := toxiproxy.NewServer(toxiproxy.NewMetricsContainer(nil), zerolog.Nop())
	// A port outside the ephemeral range, so that no outgoing connection
	// takes it while the proxy is disabled (see package freeport).
	ports, err := freeport.Loopback(1)
	if err != nil {
		tb.Fatalf("faultproxy: %v", err)
	}
	p := &Proxy{
		upstream: upstream,
		proxy:    toxiproxy.NewProxy(server, "faultproxy", net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[0])), upstream),
		faults:   &faults{},
	}
	// The fault toxics are added before the proxy listens, so that every
	// connection has them, and never removed (see faultToxic).
	for name, stream := range map[string]string{upFaultToxic: streamUp, downFaultToxic: streamDown} {
		w, err := p.addLocked(name, faultToxicType, stream, 1, nil)
		if err != nil {
			tb.Fatal(err)
		}
		ft, ok := w.Toxic.(*faultToxic)
		if !ok {
			tb.Fatalf("faultproxy: toxic %s is a %T", name, w.Toxic)
		}
		ft.faults, ft.upstream = p.faults, stream == streamUp
	}
	if err := p.proxy.Start(); err != nil {
		tb.Fatalf("faultproxy: starting a proxy to %s: %v", upstream, err)
	}
	tb.Cleanup(p.proxy.Stop)
	return p
}

// Addr returns the address clients dial, "127.0.0.1:port". It stays the same
// across [Proxy.Disable] and [Proxy.Enable].
func (p *Proxy) Addr() string {
	p.proxy.Lock()
	defer p.proxy.Unlock()
	return p.proxy.Listen
}

// Upstream returns the address the proxy forwards to.
func (p *Proxy) Upstream() string { return p.upstream }

// Latency delays every chunk of data the upstream sends by d, rounded up to
// the millisecond, so that each reply reaches the client d later than it
// would have (requests are not delayed, and a pipeline's replies are delayed
// together, not one after another). Calling it again replaces the delay; a
// d <= 0 removes it. It acts as toxiproxy's "latency" toxic would, without
// its leak: that one, removed while it holds a chunk for a client that has
// gone, blocks for good handing it on. The error is always nil.
func (p *Proxy) Latency(d time.Duration) error {
	p.faults.latency.Store(int64(max(0, (d+time.Millisecond-1)/time.Millisecond*time.Millisecond)))
	return nil
}

// Blackhole makes the proxy a black hole, like a network partition between
// client and server: nothing is forwarded in either direction, so requests
// never reach the upstream and are never executed, and clients wait for
// replies until their own timeouts. Open connections stay open, and new
// connections are still accepted (the TCP handshake is with the proxy, so
// unlike in a real partition the dial itself succeeds; only what is sent on
// the connection is lost). It acts as toxiproxy's "timeout" toxic with a
// timeout of 0 in both directions. The error is always nil.
func (p *Proxy) Blackhole() error {
	p.faults.blackhole.Store(true)
	return nil
}

// DropReplies discards everything the upstream sends, while requests still
// reach it: the upstream executes each request, and its reply is lost, so the
// client times out on a request that was applied (the "reply lost after the
// server applied it" case of a store call). Connections stay open, and new
// ones are accepted. It acts as toxiproxy's "timeout" toxic with a timeout
// of 0 downstream. The error is always nil.
func (p *Proxy) DropReplies() error {
	p.faults.dropReplies.Store(true)
	return nil
}

// ResetPeer makes the proxy reset connections like a crashed peer: as soon
// as a client sends anything on a connection, the proxy discards it (the
// upstream never sees the request) and closes both sides of that
// connection. On connections opened after the call the close is a TCP reset,
// so the client's read fails at once with ECONNRESET ("connection reset by
// peer"); connections already open when it was called are closed without a
// reset, so their client reads EOF, since toxiproxy can only arrange resets
// when a connection starts. Idle connections stay open until they are used.
// It acts as toxiproxy's "reset_peer" toxic with a timeout of 0.
func (p *Proxy) ResetPeer() error {
	p.mu.Lock()
	defer p.mu.Unlock()
	// A reset_peer toxic in the chain when a connection starts makes
	// toxiproxy close that connection with SO_LINGER 0, that is with a
	// reset. This one never acts itself (toxicity 0): the fault toxic
	// closes the connection, and unlike reset_peer keeps reading what the
	// client sends until the connection is gone, so that toxiproxy's
	// goroutines never block on it.
	if _, err := p.replaceLocked(lingerToxic, "reset_peer", streamUp, 0, map[string]any{"timeout": 0}); err != nil {
		return err
	}
	p.faults.reset.Store(true)
	return nil
}

// Disable makes the proxy a dead host: it stops listening, so that dialling
// Addr fails with "connection refused", and closes every open connection
// (the client sees EOF or a reset on its next read). Faults stay set.
// Disable is a no-op on a disabled proxy.
func (p *Proxy) Disable() { p.proxy.Stop() }

// Enable undoes [Proxy.Disable]: the proxy listens on Addr again and accepts
// new connections, through the faults still set. It fails if another
// process bound the port meanwhile, which only a server that picks that
// very port does: it is outside the ephemeral range (see package
// freeport). Enable is a no-op on an enabled proxy.
func (p *Proxy) Enable() error {
	if err := p.proxy.Start(); err != nil && !errors.Is(err, toxiproxy.ErrProxyAlreadyStarted) {
		return fmt.Errorf("faultproxy: enabling the proxy on %s: %w", p.Addr(), err)
	}
	return nil
}

// Clear removes every fault set by Latency, Blackhole, DropReplies and
// ResetPeer, so that data flows both ways again, on open connections as on
// new ones; it does not undo [Proxy.Disable]. What a fault discarded stays
// lost: a client still waiting for a reply on a connection that lost its
// request or reply is out of step (go-redis discards a connection on a
// timeout, so it is not affected). Connections that were reset stay closed.
func (p *Proxy) Clear() {
	p.mu.Lock()
	defer p.mu.Unlock()
	p.faults.blackhole.Store(false)
	p.faults.dropReplies.Store(false)
	p.faults.reset.Store(false)
	p.faults.latency.Store(0)
	// It cannot fail: the toxic is known to toxiproxy.
	_ = p.removeLocked(lingerToxic)
}

// replaceLocked removes the toxic called name, if set, and adds it anew.
func (p *Proxy) replaceLocked(name, typ, stream string, toxicity float32, attributes map[string]any) (*toxics.ToxicWrapper, error) {
	if err := p.removeLocked(name); err != nil {
		return nil, err
	}
	return p.addLocked(name, typ, stream, toxicity, attributes)
}

func (p *Proxy) removeLocked(name string) error {
	if p.proxy.Toxics.GetToxic(name) == nil {
		return nil
	}
	if err := p.proxy.Toxics.RemoveToxic(context.Background(), name); err != nil {
		return fmt.Errorf("faultproxy: removing toxic %s: %w", name, err)
	}
	return nil
}

func (p *Proxy) addLocked(name, typ, stream string, toxicity float32, attributes map[string]any) (*toxics.ToxicWrapper, error) {
	body, err := json.Marshal(map[string]any{
		"name":       name,
		"type":       typ,
		"stream":     stream,
		"toxicity":   toxicity,
		"attributes": attributes,
	})
	if err != nil {
		return nil, fmt.Errorf("faultproxy: encoding toxic %s: %w", name, err)
	}
	w, err := p.proxy.Toxics.AddToxicJson(bytes.NewReader(body))
	if err != nil {
		return nil, fmt.Errorf("faultproxy: adding toxic %s: %w", name, err)
	}
	return w, nil
}

// faultToxic is a toxiproxy toxic that forwards, drops or resets as its
// Proxy's faults say at each chunk. Toxiproxy's own timeout and reset_peer
// toxics stop reading their input when they close a connection or are
// removed, which leaves the toxic before them blocked for good, a goroutine
// leak, whenever the client sends once more; this one reads its input until
// the connection is gone, and is never removed, so its toxiproxy goroutines
// always end with their connection.
type faultToxic struct {
	faults   *faults
	upstream bool
}

// Pipe implements toxics.Toxic.
func (t *faultToxic) Pipe(stub *toxics.ToxicStub) {
	// One timer for every chunk of the connection (see forward).
	timer := time.NewTimer(forwardTimeout)
	defer timer.Stop()
	for {
		select {
		case <-stub.Interrupt:
			return
		case c := <-stub.Input:
			if c == nil {
				stub.Close()
				return
			}
			switch {
			case t.upstream && t.faults.reset.Load():
				// Closing the output makes toxiproxy close both sides of the
				// connection. Then read on, discarding, until it is gone.
				stub.Close()
				for range stub.Input {
				}
				return
			case t.faults.blackhole.Load(), !t.upstream && t.faults.dropReplies.Load():
				// Dropped.
			default:
				if !t.forward(stub, c, timer) {
					return
				}
			}
		}
	}
}

// forwardTimeout is how long faultToxic waits for toxiproxy to take a chunk
// before it takes the connection for gone. On loopback a live connection
// takes one in microseconds.
const forwardTimeout = 250 * time.Millisecond

// forward hands c on, after the latency set for replies, and reports
// whether the toxic goes on. Toxiproxy's writer stops taking chunks once a
// write to the client fails, so that a chunk handed to a connection that
// has just gone would block this goroutine for good: one not taken within
// forwardTimeout is dropped, with everything after it until the connection
// ends. It waits on timer, which it resets (a stale tick never fires since
// Go 1.23).
func (t *faultToxic) forward(stub *toxics.ToxicStub, c *stream.StreamChunk, timer *time.Timer) bool {
	if d := time.Duration(t.faults.latency.Load()); d > 0 && !t.upstream {
		if wait := time.Until(c.Timestamp.Add(d)); wait > 0 {
			timer.Reset(wait)
			select {
			case <-timer.C:
			case <-stub.Interrupt:
				// Only a toxic linked after this one interrupts it, and
				// none is linked downstream.
				stub.Output <- c
				return false
			}
		}
	}
	timer.Reset(forwardTimeout)
	select {
	case stub.Output <- c:
		return true
	case <-stub.Interrupt:
		// Toxiproxy is linking a toxic after this one: hand the chunk on
		// first, as its own toxics do.
		stub.Output <- c
		return false
	case <-timer.C:
		for range stub.Input {
		}
		// Closed, so that toxiproxy no longer interrupts this stub.
		stub.Close()
		return false
	}
}
