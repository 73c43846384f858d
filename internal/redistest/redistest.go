// Package redistest starts real redis-server processes for tests: a single
// [Server] with [Start], or a three-master [Cluster] with [StartCluster].
//
// Every server runs as a child of the test binary on free 127.0.0.1 ports,
// keeps its files in a test temporary directory, persists nothing, and is
// killed by PID when the test that started it ends. The package never
// touches a Redis it did not start, so tests may run beside a developer's
// own Redis on 6379.
//
// Only _test.go files and benchmark programs import this package.
package redistest

import (
	"bufio"
	"context"
	"errors"
	"fmt"
	"net"
	"os"
	"os/exec"
	"path/filepath"
	"strconv"
	"strings"
	"sync"
	"sync/atomic"
	"testing"
	"time"

	"github.com/redis/go-redis/v9"

	"github.com/connectlimit/connectlimit/internal/freeport"
)

// DefaultStartTimeout is how long [Start] waits for a server to answer PING,
// unless set with [WithStartTimeout].
const DefaultStartTimeout = 10 * time.Second

// bindAttempts is how many ports Start tries when another process takes the
// port it picked between picking and binding.
const bindAttempts = 5

// stopTimeout is how long [Server.Stop] waits after SIGTERM before SIGKILL.
const stopTimeout = 10 * time.Second

// Option configures [Start] and [StartCluster].
type Option interface {
	apply(*config)
}

type optionFunc func(*config)

func (f optionFunc) apply(c *config) { f(c) }

type config struct {
	args         []string
	startTimeout time.Duration
	// busPort makes Start pick a second free port for the cluster bus.
	busPort bool
}

func newConfig(opts []Option) config {
	c := config{startTimeout: DefaultStartTimeout}
	for _, o := range opts {
		o.apply(&c)
	}
	return c
}

// WithArgs appends arguments to the redis-server command line, after the
// ones Start sets, e.g. WithArgs("--maxmemory", "10mb"). By default no
// argument is added.
func WithArgs(args ...string) Option {
	return optionFunc(func(c *config) { c.args = append(c.args, args...) })
}

// WithStartTimeout sets how long Start waits for a server to answer PING
// (and StartCluster for the cluster to become healthy, twice that). The
// default is [DefaultStartTimeout].
func WithStartTimeout(d time.Duration) Option {
	return optionFunc(func(c *config) { c.startTimeout = d })
}

// Server is one redis-server started by [Start], on a fixed address and
// directory. [Server.Restart] replaces its process by a new one with the same
// command line; every method then refers to the new process. Its methods are
// safe for concurrent use.
type Server struct {
	addr         string
	port         int
	busPort      int
	dir          string
	bin          string
	args         []string
	startTimeout time.Duration

	// proc is the current process. It is replaced only by Restart, with mu
	// held, so that readers (PID, Log, Done) need no lock and never wait
	// for a Restart to finish.
	proc atomic.Pointer[process]

	// mu serialises the methods that signal or replace the process.
	mu     sync.Mutex
	resume *time.Timer
	// launches counts the processes started in dir, to name their logs.
	launches int
}

// process is one redis-server process of a [Server].
type process struct {
	cmd     *exec.Cmd
	logPath string
	// done is closed once the process has exited and been reaped.
	done chan struct{}
}

// Start starts a redis-server on a free 127.0.0.1 port, waits until it
// answers PING and registers a cleanup that kills it by PID. The server
// saves nothing (--save "" --appendonly no) and keeps its files in a
// temporary directory of tb. Start fails tb if redis-server is not on PATH
// or does not come up within the start timeout.
func Start(tb testing.TB, opts ...Option) *Server {
	tb.Helper()
	return start(tb, newConfig(opts))
}

func start(tb testing.TB, cfg config) *Server {
	tb.Helper()
	bin := lookPath(tb, "redis-server")
	dir := tb.TempDir()
	var lastErr error
	for attempt := range bindAttempts {
		s, err := launch(bin, dir, attempt, cfg)
		if err != nil {
			tb.Fatalf("redistest: %v", err)
		}
		tb.Cleanup(s.cleanup)
		err = s.proc.Load().waitReady(s.addr, s.startTimeout)
		if err == nil {
			return s
		}
		s.cleanup()
		lastErr = err
		if !strings.Contains(s.Log(), "Address already in use") {
			break
		}
	}
	tb.Fatalf("redistest: %v", lastErr)
	return nil
}

func lookPath(tb testing.TB, name string) string {
	tb.Helper()
	p, err := exec.LookPath(name)
	if err != nil {
		tb.Fatalf("%s not found on PATH: install it (apt-get install redis-server) or run scripts/test.sh, which does", name)
	}
	return p
}

// launch picks free ports and starts the process without waiting for it to
// be ready. attempt numbers its log, so that a retry on new ports keeps the
// log of the failed attempt.
func launch(bin, dir string, attempt int, cfg config) (*Server, error) {
	ports, err := freeport.Loopback(1 + boolInt(cfg.busPort))
	if err != nil {
		return nil, err
	}
	s := &Server{
		port:         ports[0],
		addr:         net.JoinHostPort("127.0.0.1", strconv.Itoa(ports[0])),
		dir:          dir,
		bin:          bin,
		startTimeout: cfg.startTimeout,
		launches:     attempt,
	}
	s.args = []string{
		"--port", strconv.Itoa(s.port),
		"--bind", "127.0.0.1",
		"--daemonize", "no",
		"--save", "",
		"--appendonly", "no",
		"--dir", dir,
		"--logfile", "",
	}
	if cfg.busPort {
		s.busPort = ports[1]
		s.args = append(s.args, "--cluster-port", strconv.Itoa(s.busPort))
	}
	s.args = append(s.args, cfg.args...)
	p, err := s.spawnLocked()
	if err != nil {
		return nil, err
	}
	s.proc.Store(p)
	return s, nil
}

// spawnLocked starts a process with the server's command line and a log of
// its own, without waiting for it to be ready. It needs mu held, or s not
// yet shared.
func (s *Server) spawnLocked() (*process, error) {
	p := &process{
		logPath: filepath.Join(s.dir, fmt.Sprintf("redis-%d.log", s.launches)),
		done:    make(chan struct{}),
	}
	s.launches++
	logFile, err := os.Create(p.logPath)
	if err != nil {
		return nil, fmt.Errorf("creating the server log: %w", err)
	}
	// The test binary owns the process: no context, so that it lives until
	// the cleanup (not until some caller's context ends).
	p.cmd = exec.Command(s.bin, s.args...) //nolint:noctx // lifetime is managed by PID
	p.cmd.Dir = s.dir
	p.cmd.Stdout = logFile
	p.cmd.Stderr = logFile
	p.cmd.SysProcAttr = sysProcAttr()
	if err := p.cmd.Start(); err != nil {
		_ = logFile.Close()
		return nil, fmt.Errorf("starting %s: %w", s.bin, err)
	}
	go func() {
		_ = p.cmd.Wait()
		_ = logFile.Close()
		close(p.done)
	}()
	return p, nil
}

func boolInt(b bool) int {
	if b {
		return 1
	}
	return 0
}

// waitReady polls PING on addr until the process answers, exits, or timeout
// passes.
func (p *process) waitReady(addr string, timeout time.Duration) error {
	deadline := time.Now().Add(timeout)
	var err error
	for {
		select {
		case <-p.done:
			return fmt.Errorf("redis-server on %s exited before answering PING (%s); its log:\n%s", addr, p.cmd.ProcessState, p.log())
		default:
		}
		if err = ping(addr, 200*time.Millisecond); err == nil {
			return nil
		}
		if time.Now().After(deadline) {
			return fmt.Errorf("redis-server on %s (pid %d) did not answer PING within %v: %w; its log:\n%s", addr, p.pid(), timeout, err, p.log())
		}
		time.Sleep(10 * time.Millisecond)
	}
}

func (p *process) pid() int { return p.cmd.Process.Pid }

func (p *process) log() string {
	b, err := os.ReadFile(p.logPath)
	if err != nil {
		return fmt.Sprintf("(log unreadable: %v)", err)
	}
	return string(b)
}

// ping sends one inline PING and expects +PONG.
func ping(addr string, timeout time.Duration) error {
	c, err := net.DialTimeout("tcp", addr, timeout)
	if err != nil {
		return err
	}
	defer c.Close()
	if err := c.SetDeadline(time.Now().Add(timeout)); err != nil {
		return err
	}
	if _, err := c.Write([]byte("PING\r\n")); err != nil {
		return err
	}
	line, err := bufio.NewReader(c).ReadString('\n')
	if err != nil {
		return err
	}
	if line != "+PONG\r\n" {
		return fmt.Errorf("PING answered %q", strings.TrimSpace(line))
	}
	return nil
}

// Addr returns the server's address, "127.0.0.1:port". It stays the same
// across [Server.Restart].
func (s *Server) Addr() string { return s.addr }

// PID returns the process id of the server's current process: after
// [Server.Restart], that of the new process.
func (s *Server) PID() int { return s.proc.Load().pid() }

// Dir returns the server's working directory, a temporary directory of the
// test that started it. It stays the same across [Server.Restart].
func (s *Server) Dir() string { return s.dir }

// Log returns what the server's current process has logged so far; after
// [Server.Restart], only what the new process logged.
func (s *Server) Log() string { return s.proc.Load().log() }

// Done returns a channel that is closed once the server's current process
// has exited. After [Server.Restart], it returns a new channel for the new
// process; channels returned before stay closed.
func (s *Server) Done() <-chan struct{} { return s.proc.Load().done }

// NewClient returns a client of the server, closed when tb ends. Each
// configure function may change the options (timeouts, retries) before the
// client is made; Addr is already set.
func (s *Server) NewClient(tb testing.TB, configure ...func(*redis.Options)) *redis.Client {
	tb.Helper()
	opts := &redis.Options{Addr: s.addr}
	for _, f := range configure {
		f(opts)
	}
	c := redis.NewClient(opts)
	tb.Cleanup(func() { _ = c.Close() })
	return c
}

// Kill kills the server with SIGKILL and waits for it to exit, to simulate
// a crash. It is a no-op once the server has exited.
func (s *Server) Kill() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	return s.killLocked()
}

func (s *Server) killLocked() error {
	s.cancelResumeLocked()
	p := s.proc.Load()
	// A stopped process dies of SIGKILL too, but continue it first so that
	// nothing is left waiting on it.
	_ = p.signal(sigCont)
	if err := p.cmd.Process.Kill(); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("redistest: killing pid %d: %w", p.pid(), err)
	}
	<-p.done
	return nil
}

// Restart replaces the server's process, like a crash and a restart by a
// supervisor: it kills the running process (if any) with SIGKILL and reaps
// it, starts a new redis-server on the same port and directory with the
// same arguments, and waits until it answers PING, for at most the start
// timeout. Since the server persists nothing, the new process starts
// empty; a node of a [Cluster] keeps its nodes.conf, so it rejoins its
// cluster as the same node. Afterwards PID, Log, Done, Kill, Stop, Pause,
// Resume and the test's cleanup all refer to the new process; clients of
// Addr reconnect to it. A pending resume of [Server.Pause] is cancelled.
//
// Restart fails if the new process does not come up, e.g. because another
// process took the port meanwhile; the error includes the new process's
// log.
func (s *Server) Restart() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	if err := s.killLocked(); err != nil {
		return err
	}
	p, err := s.spawnLocked()
	if err != nil {
		return fmt.Errorf("redistest: restarting the server on %s: %w", s.addr, err)
	}
	s.proc.Store(p)
	if err := p.waitReady(s.addr, s.startTimeout); err != nil {
		return fmt.Errorf("redistest: restarting the server: %w", err)
	}
	return nil
}

// Stop shuts the server down with SIGTERM, as an operator would, and waits
// for it to exit; after 10 s it kills it. It is a no-op once the server has
// exited.
func (s *Server) Stop() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.cancelResumeLocked()
	p := s.proc.Load()
	_ = p.signal(sigCont)
	if err := p.signal(sigTerm); err != nil {
		if errors.Is(err, os.ErrProcessDone) {
			return nil
		}
		return fmt.Errorf("redistest: stopping pid %d: %w", p.pid(), err)
	}
	select {
	case <-p.done:
		return nil
	case <-time.After(stopTimeout):
		return s.killLocked()
	}
}

// Pause stops the server process with SIGSTOP, so that it accepts
// connections but answers nothing, like a hung server. It resumes it with
// SIGCONT after d, or on [Server.Resume] if d <= 0. The cleanup resumes a
// paused server before killing it.
func (s *Server) Pause(d time.Duration) error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.cancelResumeLocked()
	p := s.proc.Load()
	if err := p.signal(sigStop); err != nil {
		return fmt.Errorf("redistest: pausing pid %d: %w", p.pid(), err)
	}
	if d > 0 {
		s.resume = time.AfterFunc(d, func() { _ = s.Resume() })
	}
	return nil
}

// Resume continues a server paused with [Server.Pause]. It is a no-op for a
// running server.
func (s *Server) Resume() error {
	s.mu.Lock()
	defer s.mu.Unlock()
	s.cancelResumeLocked()
	p := s.proc.Load()
	if err := p.signal(sigCont); err != nil && !errors.Is(err, os.ErrProcessDone) {
		return fmt.Errorf("redistest: resuming pid %d: %w", p.pid(), err)
	}
	return nil
}

func (s *Server) cancelResumeLocked() {
	if s.resume != nil {
		s.resume.Stop()
		s.resume = nil
	}
}

func (p *process) signal(sig os.Signal) error {
	if sig == nil {
		return errors.ErrUnsupported
	}
	select {
	case <-p.done:
		return os.ErrProcessDone
	default:
	}
	return p.cmd.Process.Signal(sig)
}

// cleanup kills the server; it runs when the test ends.
func (s *Server) cleanup() {
	_ = s.Kill()
}

// command runs one command on the server with a fresh connection.
func (s *Server) command(ctx context.Context, args ...any) (any, error) {
	c := redis.NewClient(&redis.Options{Addr: s.addr, MaxRetries: -1, DialTimeout: time.Second, ReadTimeout: time.Second})
	defer c.Close()
	return c.Do(ctx, args...).Result()
}
