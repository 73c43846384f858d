package costmap_test

import (
	"testing"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/connectlimit/connectlimit/costmap"
	"github.com/connectlimit/connectlimit/internal/prototest"
	connectlimitv1 "github.com/connectlimit/connectlimit/proto/connectlimit/v1"
)

// BenchmarkCharges prices one call: fixed costs only, and the example's
// three charges with two CEL estimates; and reads one response's actual
// usage.
func BenchmarkCharges(b *testing.B) {
	svc := prototest.NewService(b,
		prototest.Method{Name: "Fixed", Report: true, Limit: &connectlimitv1.Limit{Charges: []*connectlimitv1.Charge{
			{Bucket: "generate_requests", Cost: proto.Float64(1)}, {Bucket: "generate_tokens", Cost: proto.Float64(500)},
		}}},
		prototest.Method{Name: "Report", Report: true, Limit: reportLimit()},
	)
	m, err := costmap.New(aiConfig(), svc)
	if err != nil {
		b.Fatal(err)
	}
	tier, err := m.Tier("", false)
	if err != nil {
		b.Fatal(err)
	}
	req := prototest.ReportRequest(svc, "rate limits for LLM endpoints", 500)
	resp := prototest.ReportResponse(svc, 4, 120)
	for _, name := range []string{"Fixed", "Report"} {
		rule, err := m.Lookup(svc.Methods().ByName(protoreflect.Name(name)))
		if err != nil {
			b.Fatal(err)
		}
		b.Run("estimate/"+name, func(b *testing.B) {
			b.ReportAllocs()
			for b.Loop() {
				if _, err := rule.Charges(tier, req); err != nil {
					b.Fatal(err)
				}
			}
		})
	}
	rule, _ := m.Lookup(svc.Methods().ByName("Report"))
	usage := make([]float64, 3)
	b.Run("actual/Report", func(b *testing.B) {
		b.ReportAllocs()
		for b.Loop() {
			if err := rule.AddActual(resp, usage); err != nil {
				b.Fatal(err)
			}
		}
	})
}
func BenchmarkLookup(b *testing.B) {
	svc := prototest.NewService(b, prototest.Method{Name: "Search", Limit: prototest.Limit("search", nil)})
	m, err := costmap.New(baseConfig(), svc)
	if err != nil {
		b.Fatal(err)
	}
	md := svc.Methods().Get(0)
	b.ReportAllocs()
	for b.Loop() {
		if r, err := m.Lookup(md); err != nil || r == nil {
			b.Fatal(r, err)
		}
	}
}
