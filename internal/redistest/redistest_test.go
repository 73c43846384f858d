//go:build unix

package redistest_test

import (
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"runtime"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/connectlimit/connectlimit/internal/redistest"
)

func TestStart(t *testing.T) {
	t.Parallel()
	s := redistest.Start(t)
	c := s.NewClient(t)
	if got, err := c.Ping(t.Context()).Result(); err != nil || got != "PONG" {
		t.Fatalf("PING = %q, %v; want PONG", got, err)
	}
	// The server persists nothing and lives in the test's directory.
	for param, want := range map[string]string{"save": "", "appendonly": "no", "dir": s.Dir(), "bind": "127.0.0.1"} {
		got, err := c.ConfigGet(t.Context(), param).Result()
		if err != nil {
			t.Fatal(err)
		}
		if got[param] != want {
			t.Errorf("CONFIG GET %s = %q, want %q", param, got[param], want)
		}
	}
	if host, _, _ := net.SplitHostPort(s.Addr()); host != "127.0.0.1" {
		t.Errorf("Addr() = %q, want a 127.0.0.1 address", s.Addr())
	}
}

func TestServersAreIndependent(t *testing.T) {
	t.Parallel()
	a, b := redistest.Start(t), redistest.Start(t)
	if a.Addr() == b.Addr() || a.PID() == b.PID() {
		t.Fatalf("two servers share %s/%d and %s/%d", a.Addr(), a.PID(), b.Addr(), b.PID())
	}
	ca, cb := a.NewClient(t), b.NewClient(t)
	if err := ca.Set(t.Context(), "k", "a", 0).Err(); err != nil {
		t.Fatal(err)
	}
	if err := cb.Get(t.Context(), "k").Err(); !errors.Is(err, redis.Nil) {
		t.Fatalf("GET k on the second server: %v, want redis.Nil", err)
	}
}

func TestKillAndStop(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name string
		stop func(*redistest.Server) error
	}{
		{"Kill", (*redistest.Server).Kill},
		{"Stop", (*redistest.Server).Stop},
		{"KillWhilePaused", func(s *redistest.Server) error {
			if err := s.Pause(0); err != nil {
				return err
			}
			return s.Kill()
		}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			s := redistest.Start(t)
			if err := tc.stop(s); err != nil {
				t.Fatal(err)
			}
			select {
			case <-s.Done():
			default:
				t.Fatal("Done() is open after the server was stopped")
			}
			// The process is gone (reaped), not merely disconnected.
			if err := syscall.Kill(s.PID(), 0); !errors.Is(err, syscall.ESRCH) {
				t.Errorf("kill(%d, 0) = %v, want ESRCH", s.PID(), err)
			}
			if c, err := net.DialTimeout("tcp", s.Addr(), time.Second); err == nil {
				_ = c.Close()
				t.Errorf("%s still accepts connections", s.Addr())
			}
			// Stopping twice is harmless.
			if err := s.Kill(); err != nil {
				t.Errorf("second Kill: %v", err)
			}
		})
	}
}

func TestPause(t *testing.T) {
	t.Parallel()
	s := redistest.Start(t)
	c := s.NewClient(t, func(o *redis.Options) {
		o.ContextTimeoutEnabled = true
		o.MaxRetries = -1
	})
	if err := s.Pause(300 * time.Millisecond); err != nil {
		t.Fatal(err)
	}
	ctx, cancel := context.WithTimeout(t.Context(), 100*time.Millisecond)
	defer cancel()
	if err := c.Ping(ctx).Err(); err == nil {
		t.Fatal("PING to a paused server succeeded")
	}
	// After d the server resumes by itself.
	deadline := time.Now().Add(5 * time.Second)
	for c.Ping(t.Context()).Err() != nil {
		if time.Now().After(deadline) {
			t.Fatal("server did not resume after its pause")
		}
		time.Sleep(10 * time.Millisecond)
	}
	// A pause without a duration lasts until Resume.
	if err := s.Pause(0); err != nil {
		t.Fatal(err)
	}
	if err := s.Resume(); err != nil {
		t.Fatal(err)
	}
	if err := c.Ping(t.Context()).Err(); err != nil {
		t.Fatalf("PING after Resume: %v", err)
	}
}

func TestStartFailureIsReported(t *testing.T) {
	t.Parallel()
	// An invalid argument makes redis-server exit at once; Start must say
	// so with the server's log rather than wait for its timeout.
	ft := &fatalRecorder{T: t}
	done := make(chan struct{})
	go func() {
		defer close(done)
		redistest.Start(ft, redistest.WithArgs("--no-such-option", "1"))
	}()
	select {
	case <-done:
	case <-time.After(5 * time.Second):
		t.Fatal("Start did not give up on a server that exited")
	}
	if !strings.Contains(ft.msg, "exited before answering PING") || !strings.Contains(ft.msg, "no-such-option") {
		t.Fatalf("Start failed with %q, want the exit and the server's complaint", ft.msg)
	}
}

func TestCluster(t *testing.T) {
	t.Parallel()
	cl := redistest.StartCluster(t)
	if got := len(cl.Addrs()); got != 6 {
		t.Fatalf("%d nodes, want 6", got)
	}
	c := cl.NewClient(t)
	info, err := c.ClusterInfo(t.Context()).Result()
	if err != nil || !strings.Contains(info, "cluster_state:ok") {
		t.Fatalf("CLUSTER INFO = %q, %v", info, err)
	}
	masters := 0
	for _, n := range cl.Nodes() {
		role, err := n.NewClient(t).Do(t.Context(), "ROLE").Slice()
		if err != nil || len(role) == 0 {
			t.Fatalf("ROLE on %s: %v, %v", n.Addr(), role, err)
		}
		if role[0] == "master" {
			masters++
		}
	}
	if masters != 3 {
		t.Fatalf("%d masters, want 3", masters)
	}
	// Keys spread over the masters, and hash tags keep keys together.
	for i := range 50 {
		k := "{user" + string(rune('a'+i%26)) + "}:" + strings.Repeat("x", i)
		if err := c.Set(t.Context(), k, i, 0).Err(); err != nil {
			t.Fatalf("SET %s: %v", k, err)
		}
	}
	if err := c.MSet(t.Context(), "{tag}a", 1, "{tag}b", 2).Err(); err != nil {
		t.Fatalf("MSET within one hash tag: %v", err)
	}
}

// fatalRecorder is a testing.TB whose Fatalf records the message and ends
// the calling goroutine, so that a test can check how a helper fails.
type fatalRecorder struct {
	*testing.T
	msg string
}

func (f *fatalRecorder) Fatalf(format string, args ...any) {
	f.msg = fmt.Sprintf(format, args...)
	runtime.Goexit()
}

func TestRestart(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		before func(*redistest.Server) error
	}{
		{"WhileRunning", func(*redistest.Server) error { return nil }},
		{"AfterKill", (*redistest.Server).Kill},
		{"AfterStop", (*redistest.Server).Stop},
		{"WhilePaused", func(s *redistest.Server) error { return s.Pause(0) }},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			s := redistest.Start(t)
			c := s.NewClient(t)
			if err := c.Set(t.Context(), "k", "v", 0).Err(); err != nil {
				t.Fatal(err)
			}
			addr, oldPID, oldDone := s.Addr(), s.PID(), s.Done()
			if err := tc.before(s); err != nil {
				t.Fatal(err)
			}
			if err := s.Restart(); err != nil {
				t.Fatal(err)
			}
			if s.Addr() != addr || s.PID() == oldPID {
				t.Fatalf("after Restart: %s pid %d, want %s and a pid other than %d", s.Addr(), s.PID(), addr, oldPID)
			}
			// The old process was killed and reaped.
			select {
			case <-oldDone:
			default:
				t.Error("the old process's Done() is still open")
			}
			if err := syscall.Kill(oldPID, 0); !errors.Is(err, syscall.ESRCH) {
				t.Errorf("kill(%d, 0) = %v, want ESRCH", oldPID, err)
			}
			select {
			case <-s.Done():
				t.Fatal("Done() is closed after Restart")
			default:
			}
			// Redis starts each log line with "pid:role"; Log shows the
			// new process only.
			if log := s.Log(); !strings.Contains(log, fmt.Sprintf("%d:M", s.PID())) || strings.Contains(log, fmt.Sprintf("%d:M", oldPID)) {
				t.Errorf("Log() is not the new process's log:\n%s", log)
			}
			// The client reconnects by itself, to an empty server.
			if err := c.Get(t.Context(), "k").Err(); !errors.Is(err, redis.Nil) {
				t.Fatalf("GET k after Restart: %v, want redis.Nil (nothing persisted)", err)
			}
			if err := c.Set(t.Context(), "k", "w", 0).Err(); err != nil {
				t.Fatalf("SET after Restart: %v", err)
			}
			// The other methods act on the new process.
			if err := s.Pause(0); err != nil {
				t.Fatal(err)
			}
			if err := s.Resume(); err != nil {
				t.Fatal(err)
			}
			if err := s.Kill(); err != nil {
				t.Fatal(err)
			}
			<-s.Done()
			if err := syscall.Kill(s.PID(), 0); !errors.Is(err, syscall.ESRCH) {
				t.Errorf("kill(%d, 0) after Kill = %v, want ESRCH", s.PID(), err)
			}
		})
	}
}

func TestRestartConcurrently(t *testing.T) {
	t.Parallel()
	s := redistest.Start(t)
	c := s.NewClient(t)
	var wg sync.WaitGroup
	errs := make(chan error, 8)
	for range 3 {
		wg.Go(func() { errs <- s.Restart() })
	}
	wg.Go(func() { errs <- s.Kill() })
	wg.Go(func() {
		// Pausing a process that a concurrent Kill ended fails; that is fine.
		if err := s.Pause(time.Millisecond); !errors.Is(err, os.ErrProcessDone) {
			errs <- err
		}
	})
	stop := make(chan struct{})
	var readers sync.WaitGroup
	readers.Go(func() {
		for {
			select {
			case <-stop:
				return
			default:
				_, _, _ = s.PID(), s.Log(), s.Done()
			}
		}
	})
	wg.Wait()
	close(stop)
	readers.Wait()
	close(errs)
	for err := range errs {
		if err != nil {
			t.Error(err)
		}
	}
	// Whatever the order, a final Restart leaves one answering server.
	if err := s.Restart(); err != nil {
		t.Fatal(err)
	}
	if err := c.Ping(t.Context()).Err(); err != nil {
		t.Fatalf("PING after the restarts: %v", err)
	}
}

func TestRestartClusterNode(t *testing.T) {
	t.Parallel()
	cl := redistest.StartCluster(t)
	n := cl.Nodes()[0]
	if err := n.Restart(); err != nil {
		t.Fatal(err)
	}
	// The node keeps its nodes.conf (the directory survives), so it rejoins
	// the cluster with its identity.
	c := n.NewClient(t)
	deadline := time.Now().Add(20 * time.Second)
	for {
		info, err := c.ClusterInfo(t.Context()).Result()
		if err == nil && strings.Contains(info, "cluster_state:ok") && strings.Contains(info, "cluster_known_nodes:6") {
			break
		}
		if time.Now().After(deadline) {
			t.Fatalf("restarted node did not rejoin: %q, %v", info, err)
		}
		time.Sleep(50 * time.Millisecond)
	}
}
