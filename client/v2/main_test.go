package client_test

import (
	"testing"

	"go.uber.org/goleak"
)

// TestMain checks that no test leaves a goroutine behind: the servers'
// settle queues and the clients' streams must all end.
func TestMain(m *testing.M) {
	goleak.VerifyTestMain(m)
}
