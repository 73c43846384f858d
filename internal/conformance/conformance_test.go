// Package conformance_test runs the Connect conformance suite
// (connectrpc.com/conformance, connectconformance --mode server) against
// the servers under test in cmd/serverv1 (connect-go v1) and cmd/serverv2
// (connect-go v2), each without and with connectlimit installed on every
// handler, and checks that connectlimit changes no outcome: every case
// passes either way, and the pass counts are equal. See README.md.
package conformance_test

import (
	"bufio"
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"regexp"
	"strconv"
	"strings"
	"testing"
	"time"
)

// minCases guards against a vacuous run (a config that selects nothing): a
// run of config.yaml is 3,640 cases with runner v1.0.7.
const minCases = 1000

// bin holds the binaries TestMain builds: serverv1, serverv2 and
// connectconformance.
var bin string

func TestMain(m *testing.M) {
	os.Exit(run(m))
}

func run(m *testing.M) int {
	dir, err := os.MkdirTemp("", "conformance-bin-")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		return 1
	}
	defer os.RemoveAll(dir)
	bin = dir
	out := dir + string(filepath.Separator)
	// The servers are built with the race detector when the tests are, so
	// that thousands of cases of concurrent traffic also look for data
	// races in connectlimit's stream wrappers. The runner (a tool of
	// go.mod) never is.
	servers := []string{"build", "-o", out}
	if raceEnabled {
		servers = append(servers, "-race")
	}
	for _, args := range [][]string{
		append(servers, "./cmd/serverv1", "./cmd/serverv2"),
		{"build", "-o", out, "connectrpc.com/conformance/cmd/connectconformance"},
	} {
		cmd := exec.Command("go", args...)
		if output, err := cmd.CombinedOutput(); err != nil {
			fmt.Fprintf(os.Stderr, "%s: %v\n%s", strings.Join(cmd.Args, " "), err, output)
			return 1
		}
	}
	return m.Run()
}

// summary is the outcome of one connectconformance run.
type summary struct {
	Total, Passed, Failed int
	// CouldNotRun counts cases the runner could not run (the server died).
	CouldNotRun int
	// Flaked names the known-flaky cases that failed (INFO lines).
	Flaked []string
}

func (s summary) String() string {
	out := fmt.Sprintf("%d cases: %d passed, %d failed", s.Total, s.Passed, s.Failed)
	if s.CouldNotRun > 0 {
		out += fmt.Sprintf(", %d could not run", s.CouldNotRun)
	}
	if len(s.Flaked) > 0 {
		out += fmt.Sprintf(", %d known-flaky failed", len(s.Flaked))
	}
	return out
}

var (
	totalLine   = regexp.MustCompile(`(?m)^Total cases: (\d+)$`)
	passedLine  = regexp.MustCompile(`(?m)^(\d+) passed, (\d+) failed$`)
	noRunLine   = regexp.MustCompile(`(?m)^Another (\d+) could not be run`)
	flakedLine  = regexp.MustCompile(`(?m)^INFO: (.+) failed \(as expected\):$`)
	raceWarning = "WARNING: DATA RACE"
)

// parseSummary reads the summary connectconformance prints at the end of a
// run.
func parseSummary(out []byte) (summary, error) {
	var s summary
	total := totalLine.FindSubmatch(out)
	counts := passedLine.FindSubmatch(out)
	if total == nil || counts == nil {
		return s, errors.New("no summary in the runner's output")
	}
	s.Total, _ = strconv.Atoi(string(total[1]))
	s.Passed, _ = strconv.Atoi(string(counts[1]))
	s.Failed, _ = strconv.Atoi(string(counts[2]))
	if m := noRunLine.FindSubmatch(out); m != nil {
		s.CouldNotRun, _ = strconv.Atoi(string(m[1]))
	}
	for _, m := range flakedLine.FindAllSubmatch(out, -1) {
		s.Flaked = append(s.Flaked, string(m[1]))
	}
	return s, nil
}

// runSuite runs connectconformance --mode server on config.yaml against
// server started with args, and returns its summary. It fails the test if
// the run fails (a failing case, or a known-failing one that passed), a case
// could not run, the server reported a data race, or the run is vacuous.
func runSuite(t *testing.T, server string, args ...string) summary {
	t.Helper()
	ctx, cancel := context.WithTimeout(t.Context(), 5*time.Minute)
	defer cancel()
	runnerArgs := []string{
		"--mode", "server",
		"--conf", "config.yaml",
		"--known-failing", "@known-failing.txt",
		"--known-flaky", "@known-flaky.txt",
		"--",
		server,
	}
	cmd := exec.CommandContext(ctx, filepath.Join(bin, "connectconformance"), append(runnerArgs, args...)...)
	start := time.Now()
	out, runErr := cmd.CombinedOutput()
	elapsed := time.Since(start).Round(100 * time.Millisecond)
	s, err := parseSummary(out)
	switch {
	case err != nil:
		t.Fatalf("%s: %v (exit: %v)\n%s", strings.Join(cmd.Args, " "), err, runErr, out)
	case runErr != nil || s.Failed > 0 || s.CouldNotRun > 0:
		t.Fatalf("%s: %s (exit: %v)\n%s", strings.Join(cmd.Args, " "), s, runErr, failures(out))
	case bytes.Contains(out, []byte(raceWarning)):
		t.Fatalf("%s: the server reported a data race\n%s", strings.Join(cmd.Args, " "), out)
	case s.Total < minCases:
		t.Fatalf("%s: only %s; is config.yaml selecting the cases?", strings.Join(cmd.Args, " "), s)
	}
	for _, name := range s.Flaked {
		t.Logf("known-flaky case failed: %s", name)
	}
	t.Logf("%s: %s in %v", strings.Join(append([]string{filepath.Base(server)}, args...), " "), s, elapsed)
	return s
}

// failures returns the runner's report without its HTTP traces, which can be
// long.
func failures(out []byte) string {
	var b strings.Builder
	sc := bufio.NewScanner(bytes.NewReader(out))
	sc.Buffer(nil, 1<<20)
	for sc.Scan() {
		line := sc.Text()
		if strings.HasPrefix(line, " request>") || strings.HasPrefix(line, "response<") {
			continue
		}
		b.WriteString(line)
		b.WriteByte('\n')
	}
	return b.String()
}

// TestConformance runs the suite against each server without and with
// connectlimit. With connectlimit, every case must pass as it does without:
// equal totals, no failures, and so equal pass counts (up to known-flaky
// cases, which are named when they fail).
func TestConformance(t *testing.T) {
	if testing.Short() {
		t.Skip("runs the whole conformance suite four times (about a minute)")
	}
	for _, major := range []string{"v1", "v2"} {
		t.Run(major, func(t *testing.T) {
			server := filepath.Join(bin, "server"+major)
			var plain, limited *summary
			t.Run("plain", func(t *testing.T) {
				s := runSuite(t, server)
				plain = &s
			})
			t.Run("connectlimit", func(t *testing.T) {
				s := runSuite(t, server, "-connectlimit")
				limited = &s
			})
			if plain == nil || limited == nil {
				return
			}
			if limited.Total != plain.Total {
				t.Fatalf("with connectlimit the suite ran %d cases, without %d", limited.Total, plain.Total)
			}
			if limited.Passed+len(limited.Flaked) != plain.Passed+len(plain.Flaked) {
				t.Fatalf("with connectlimit %s; without %s", limited, plain)
			}
			t.Logf("server%s passes %d of %d cases without connectlimit and %d with it", major, plain.Passed, plain.Total, limited.Passed)
		})
	}
}
