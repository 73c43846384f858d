package conformance_test

import (
	"bytes"
	"encoding/json"
	"os"
	"os/exec"
	"path/filepath"
	"testing"
)

// TestVendoredProtos checks that proto/ holds the conformance protos of the
// connectrpc.com/conformance version go.mod requires, unchanged, so that the
// generated code (gen/, from buf.gen.yaml) speaks the runner's protocol. After
// upgrading the runner, copy the files again and regenerate (README.md).
func TestVendoredProtos(t *testing.T) {
	out, err := exec.CommandContext(t.Context(), "go", "mod", "download", "-json", "connectrpc.com/conformance").Output()
	if err != nil {
		t.Fatalf("go mod download connectrpc.com/conformance: %v", err)
	}
	var module struct{ Dir, Version string }
	if err := json.Unmarshal(out, &module); err != nil || module.Dir == "" {
		t.Fatalf("go mod download printed %s (%v)", out, err)
	}
	const dir = "proto/connectrpc/conformance/v1"
	vendored, err := os.ReadDir(dir)
	if err != nil {
		t.Fatal(err)
	}
	if len(vendored) == 0 {
		t.Fatalf("%s is empty", dir)
	}
	for _, entry := range vendored {
		ours, err := os.ReadFile(filepath.Join(dir, entry.Name()))
		if err != nil {
			t.Fatal(err)
		}
		theirs, err := os.ReadFile(filepath.Join(module.Dir, dir, entry.Name()))
		if err != nil {
			t.Errorf("%s is not in connectrpc.com/conformance@%s: %v", entry.Name(), module.Version, err)
			continue
		}
		if !bytes.Equal(ours, theirs) {
			t.Errorf("%s differs from connectrpc.com/conformance@%s's; copy it again and regenerate", filepath.Join(dir, entry.Name()), module.Version)
		}
	}
}
