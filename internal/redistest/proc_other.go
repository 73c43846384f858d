//go:build !unix

package redistest

import (
	"os"
	"syscall"
)

// Without SIGSTOP and SIGCONT, Pause and Resume report errors.unsupported
// and Stop falls back to killing.
var (
	sigStop os.Signal
	sigCont os.Signal
	sigTerm os.Signal = os.Kill
)

func sysProcAttr() *syscall.SysProcAttr { return nil }
