package redistest_test

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain checks that killing and restarting servers leaves no goroutine
// behind (each process has one that reaps it) once every test's cleanups
// ran.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
