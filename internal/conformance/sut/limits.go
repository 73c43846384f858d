package sut

import (
	_ "embed"
	"fmt"

	"github.com/connectlimit/connectlimit/costmap"
	conformancev1 "github.com/connectlimit/connectlimit/internal/conformance/gen/connectrpc/conformance/v1"
)

// limitsYAML limits every ConformanceService procedure; see the file's
// comment.
//
//go:embed connectlimit.yaml
var limitsYAML []byte

// Costs returns the connectlimit cost map of ConformanceService that the
// servers under test install with -connectlimit: every procedure is limited
// (fixed, estimated and metered, per-message and concurrency charges), with
// buckets large enough that no conformance case is denied. It is independent
// of the connect-go major, so both servers share it.
func Costs() (*costmap.Map, error) {
	cfg, err := costmap.ParseConfig(limitsYAML)
	if err != nil {
		return nil, fmt.Errorf("connectlimit.yaml: %w", err)
	}
	service := conformancev1.File_connectrpc_conformance_v1_service_proto.Services().ByName("ConformanceService")
	costs, err := costmap.New(cfg, service)
	if err != nil {
		return nil, fmt.Errorf("connectlimit.yaml: %w", err)
	}
	methods := service.Methods()
	for i := range methods.Len() {
		method := methods.Get(i)
		if rule, err := costs.Lookup(method); err != nil || rule == nil {
			return nil, fmt.Errorf("connectlimit.yaml: %s is not limited (%v)", costmap.Procedure(method), err)
		}
	}
	return costs, nil
}
