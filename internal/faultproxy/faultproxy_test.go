package faultproxy_test

import (
	"bufio"
	"errors"
	"io"
	"net"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"
	"go.uber.org/goleak"

	"github.com/connectlimit/connectlimit/internal/faultproxy"
	"github.com/connectlimit/connectlimit/internal/redistest"
)

// TestMain checks that the proxies, their connections and the servers
// behind them leave no goroutine behind once every test's cleanups ran.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}

// timeout is how long the tests' clients wait for a reply. A fault that
// should make a request fail fast must fail well within it; one that should
// make it hang must make it time out.
const timeout = 300 * time.Millisecond

// setup starts a redis-server and a proxy to it, and returns the proxy, a
// client through the proxy that never retries, and a client of the server
// itself to check what really happened.
func setup(t *testing.T) (p *faultproxy.Proxy, viaProxy, direct *redis.Client) {
	t.Helper()
	s := redistest.Start(t)
	p = faultproxy.NewProxy(t, s.Addr())
	viaProxy = redis.NewClient(&redis.Options{
		Addr:        p.Addr(),
		MaxRetries:  -1,
		DialTimeout: timeout,
		ReadTimeout: timeout,
		PoolSize:    1,
	})
	t.Cleanup(func() { _ = viaProxy.Close() })
	// One round trip puts a connection in the pool, so that the faults
	// below meet an open connection first.
	if err := viaProxy.Ping(t.Context()).Err(); err != nil {
		t.Fatalf("PING through the proxy without faults: %v", err)
	}
	return p, viaProxy, s.NewClient(t)
}

// rawConn is a connection through the proxy that speaks Redis's inline
// protocol, to see faults on a connection opened after they were set,
// without go-redis's handshake in the way.
type rawConn struct {
	net.Conn
	r *bufio.Reader
}

func dialRaw(t *testing.T, addr string) *rawConn {
	t.Helper()
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		t.Fatalf("dialling %s: %v", addr, err)
	}
	t.Cleanup(func() { _ = c.Close() })
	return &rawConn{Conn: c, r: bufio.NewReader(c)}
}

// do sends one inline command and returns the first line of the reply.
func (c *rawConn) do(cmd string) (string, error) {
	if err := c.SetDeadline(time.Now().Add(timeout)); err != nil {
		return "", err
	}
	if _, err := c.Write([]byte(cmd + "\r\n")); err != nil {
		return "", err
	}
	line, err := c.r.ReadString('\n')
	return strings.TrimSpace(line), err
}

func isTimeout(err error) bool {
	var ne net.Error
	return errors.As(err, &ne) && ne.Timeout()
}

// wantValue checks what the server itself holds under key: want, or
// nothing if want is "".
func wantValue(t *testing.T, direct *redis.Client, key, want string) {
	t.Helper()
	got, err := direct.Get(t.Context(), key).Result()
	switch {
	case want == "" && !errors.Is(err, redis.Nil):
		t.Errorf("server holds %s = %q, %v; want no such key", key, got, err)
	case want != "" && (err != nil || got != want):
		t.Errorf("server holds %s = %q, %v; want %q", key, got, err, want)
	}
}

// wantWorks checks that requests through the proxy work again, on the
// client's connections and on a new one.
func wantWorks(t *testing.T, p *faultproxy.Proxy, viaProxy, direct *redis.Client) {
	t.Helper()
	if err := viaProxy.Set(t.Context(), "after", "1", 0).Err(); err != nil {
		t.Fatalf("SET through the proxy after Clear: %v", err)
	}
	wantValue(t, direct, "after", "1")
	if got, err := dialRaw(t, p.Addr()).do("PING"); err != nil || got != "+PONG" {
		t.Fatalf("PING on a new connection after Clear = %q, %v; want +PONG", got, err)
	}
}

func TestNoFault(t *testing.T) {
	t.Parallel()
	p, viaProxy, direct := setup(t)
	if host, _, _ := net.SplitHostPort(p.Addr()); host != "127.0.0.1" {
		t.Errorf("Addr() = %q, want a 127.0.0.1 address", p.Addr())
	}
	if err := viaProxy.Set(t.Context(), "k", "v", 0).Err(); err != nil {
		t.Fatal(err)
	}
	wantValue(t, direct, "k", "v")
}

func TestLatency(t *testing.T) {
	t.Parallel()
	p, _, _ := setup(t)
	const d = 250 * time.Millisecond
	slow := redis.NewClient(&redis.Options{Addr: p.Addr(), MaxRetries: -1, ReadTimeout: 5 * time.Second})
	t.Cleanup(func() { _ = slow.Close() })
	if err := slow.Ping(t.Context()).Err(); err != nil {
		t.Fatal(err)
	}
	ping := func() time.Duration {
		t.Helper()
		start := time.Now()
		if err := slow.Ping(t.Context()).Err(); err != nil {
			t.Fatalf("PING with latency: %v", err)
		}
		return time.Since(start)
	}
	if err := p.Latency(time.Second); err != nil {
		t.Fatal(err)
	}
	// Calling it again replaces the delay rather than adding to it.
	if err := p.Latency(d); err != nil {
		t.Fatal(err)
	}
	for range 3 {
		if got := ping(); got < d || got > d+700*time.Millisecond {
			t.Errorf("PING took %v with Latency(%v)", got, d)
		}
	}
	// A connection opened under latency is slowed down as well.
	start := time.Now()
	c := dialRaw(t, p.Addr())
	_ = c.SetDeadline(time.Now().Add(5 * time.Second))
	if _, err := c.Write([]byte("PING\r\n")); err != nil {
		t.Fatal(err)
	}
	if line, err := c.r.ReadString('\n'); err != nil || line != "+PONG\r\n" {
		t.Fatalf("PING on a new connection = %q, %v", line, err)
	}
	if got := time.Since(start); got < d {
		t.Errorf("PING on a new connection took %v with Latency(%v)", got, d)
	}
	p.Clear()
	if got := ping(); got >= d {
		t.Errorf("PING took %v after Clear, want less than %v", got, d)
	}
}

func TestBlackhole(t *testing.T) {
	t.Parallel()
	p, viaProxy, direct := setup(t)
	if err := p.Blackhole(); err != nil {
		t.Fatal(err)
	}
	// On an open connection the request is lost: the client times out,
	// and the server never executed it.
	if err := viaProxy.Set(t.Context(), "k", "v", 0).Err(); !isTimeout(err) {
		t.Fatalf("SET through a black hole: %v, want a timeout", err)
	}
	wantValue(t, direct, "k", "")
	// A new connection is accepted, and then the same happens.
	c := dialRaw(t, p.Addr())
	if got, err := c.do("SET k2 v"); !isTimeout(err) {
		t.Fatalf("SET on a new connection through a black hole = %q, %v; want a timeout", got, err)
	}
	wantValue(t, direct, "k2", "")
	p.Clear()
	// The connection stays open and works again; the lost SET stays lost.
	if got, err := c.do("PING"); err != nil || got != "+PONG" {
		t.Errorf("PING after Clear on a connection of the black hole = %q, %v; want +PONG", got, err)
	}
	wantValue(t, direct, "k2", "")
	wantWorks(t, p, viaProxy, direct)
}

func TestDropReplies(t *testing.T) {
	t.Parallel()
	p, viaProxy, direct := setup(t)
	if err := p.DropReplies(); err != nil {
		t.Fatal(err)
	}
	// The request reaches the server and is applied; the reply is lost,
	// so the client cannot tell it was.
	if err := viaProxy.Set(t.Context(), "k", "v", 0).Err(); !isTimeout(err) {
		t.Fatalf("SET with replies dropped: %v, want a timeout", err)
	}
	wantValue(t, direct, "k", "v")
	c := dialRaw(t, p.Addr())
	if got, err := c.do("SET k2 v2"); !isTimeout(err) {
		t.Fatalf("SET on a new connection with replies dropped = %q, %v; want a timeout", got, err)
	}
	wantValue(t, direct, "k2", "v2")
	p.Clear()
	// The connection stays open and works again; the lost reply stays
	// lost, so the next reply is PING's.
	if got, err := c.do("PING"); err != nil || got != "+PONG" {
		t.Errorf("PING after Clear on a connection that lost a reply = %q, %v; want +PONG", got, err)
	}
	wantWorks(t, p, viaProxy, direct)
}

func TestResetPeer(t *testing.T) {
	t.Parallel()
	p, viaProxy, direct := setup(t)
	slow := redis.NewClient(&redis.Options{Addr: p.Addr(), MaxRetries: -1, ReadTimeout: 10 * timeout})
	t.Cleanup(func() { _ = slow.Close() })
	if err := slow.Ping(t.Context()).Err(); err != nil {
		t.Fatal(err)
	}
	before := dialRaw(t, p.Addr())
	if got, err := before.do("PING"); err != nil || got != "+PONG" {
		t.Fatalf("PING = %q, %v", got, err)
	}
	if err := p.ResetPeer(); err != nil {
		t.Fatal(err)
	}
	// A connection opened before the fault is closed on first use: the
	// client reads EOF at once, long before its read timeout, and the
	// request was not delivered.
	start := time.Now()
	err := slow.Set(t.Context(), "k", "v", 0).Err()
	if err == nil || isTimeout(err) || time.Since(start) > timeout {
		t.Fatalf("SET on an open connection of a reset peer: %v after %v, want an error at once", err, time.Since(start))
	}
	if got, err := before.do("SET k v"); !errors.Is(err, io.EOF) {
		t.Errorf("SET on an open raw connection of a reset peer = %q, %v; want EOF", got, err)
	}
	// A connection opened after it is reset.
	after := dialRaw(t, p.Addr())
	if got, err := after.do("SET k2 v"); !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("SET on a new connection to a reset peer = %q, %v; want ECONNRESET", got, err)
	}
	wantValue(t, direct, "k", "")
	wantValue(t, direct, "k2", "")
	p.Clear()
	wantWorks(t, p, viaProxy, direct)
}

func TestDisable(t *testing.T) {
	t.Parallel()
	p, viaProxy, direct := setup(t)
	open := dialRaw(t, p.Addr())
	if got, err := open.do("PING"); err != nil || got != "+PONG" {
		t.Fatalf("PING = %q, %v", got, err)
	}
	p.Disable()
	p.Disable() // a no-op
	// Open connections are closed, and new ones refused.
	if got, err := open.do("PING"); !errors.Is(err, io.EOF) && !errors.Is(err, syscall.ECONNRESET) && !errors.Is(err, syscall.EPIPE) {
		t.Errorf("PING on a connection open at Disable = %q, %v; want EOF", got, err)
	}
	if c, err := net.DialTimeout("tcp", p.Addr(), timeout); !errors.Is(err, syscall.ECONNREFUSED) {
		if c != nil {
			_ = c.Close()
		}
		t.Fatalf("dialling a disabled proxy: %v, want connection refused", err)
	}
	if err := viaProxy.Set(t.Context(), "k", "v", 0).Err(); err == nil {
		t.Fatal("SET through a disabled proxy succeeded")
	}
	addr := p.Addr()
	if err := p.Enable(); err != nil {
		t.Fatal(err)
	}
	if err := p.Enable(); err != nil {
		t.Fatalf("second Enable: %v", err)
	}
	if p.Addr() != addr {
		t.Errorf("Addr() = %s after Enable, want %s", p.Addr(), addr)
	}
	if got, err := dialRaw(t, p.Addr()).do("PING"); err != nil || got != "+PONG" {
		t.Fatalf("PING on a new connection after Enable = %q, %v; want +PONG", got, err)
	}
	// go-redis, once its dials failed, dials again in the background about
	// once a second, so its client takes a while to come back.
	deadline := time.Now().Add(5 * time.Second)
	for viaProxy.Ping(t.Context()).Err() != nil {
		if time.Now().After(deadline) {
			t.Fatal("the client did not reconnect after Enable")
		}
		time.Sleep(20 * time.Millisecond)
	}
	wantWorks(t, p, viaProxy, direct)
}

func TestUpstreamDown(t *testing.T) {
	t.Parallel()
	// A proxy to nothing accepts connections and closes them at once.
	s := redistest.Start(t)
	p := faultproxy.NewProxy(t, s.Addr())
	if err := s.Kill(); err != nil {
		t.Fatal(err)
	}
	if got, err := dialRaw(t, p.Addr()).do("PING"); !errors.Is(err, io.EOF) && !errors.Is(err, syscall.ECONNRESET) {
		t.Errorf("PING through a proxy whose upstream is down = %q, %v; want EOF", got, err)
	}
	if p.Upstream() != s.Addr() {
		t.Errorf("Upstream() = %s, want %s", p.Upstream(), s.Addr())
	}
}

// TestFaultsUnderTraffic sets and clears every fault while clients keep
// sending, the case in which toxiproxy's own timeout and reset_peer toxics
// leave goroutines blocked; TestMain's goleak check fails if any is left.
func TestFaultsUnderTraffic(t *testing.T) {
	t.Parallel()
	p, _, direct := setup(t)
	stop := make(chan struct{})
	var clients sync.WaitGroup
	for range 4 {
		clients.Go(func() {
			for {
				select {
				case <-stop:
					return
				default:
				}
				c, err := net.DialTimeout("tcp", p.Addr(), timeout)
				if err != nil {
					time.Sleep(time.Millisecond)
					continue
				}
				// Commands keep coming, each in a write of its own, while
				// the replies are read, so that data is in flight whenever
				// a fault changes.
				_ = c.SetDeadline(time.Now().Add(30 * time.Millisecond))
				var reader sync.WaitGroup
				reader.Go(func() { _, _ = io.Copy(io.Discard, c) })
				for {
					if _, err := c.Write([]byte("PING\r\n")); err != nil {
						break
					}
					time.Sleep(time.Millisecond)
				}
				reader.Wait()
				_ = c.Close()
			}
		})
	}
	faults := []func() error{
		p.Blackhole, p.DropReplies, p.ResetPeer,
		func() error { return p.Latency(5 * time.Millisecond) },
		func() error { p.Disable(); return p.Enable() },
	}
	for i := range 40 {
		if err := faults[i%len(faults)](); err != nil {
			t.Fatal(err)
		}
		time.Sleep(10 * time.Millisecond)
		p.Clear()
		time.Sleep(5 * time.Millisecond)
	}
	close(stop)
	clients.Wait()
	if err := direct.Ping(t.Context()).Err(); err != nil {
		t.Fatal(err)
	}
}
