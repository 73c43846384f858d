package costmap_test

import (
	"errors"
	"math"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"

	"github.com/connectlimit/connectlimit/costmap"
	"github.com/connectlimit/connectlimit/internal/prototest"
	connectlimitv1 "github.com/connectlimit/connectlimit/proto/connectlimit/v1"
)

func aiConfig() costmap.Config {
	return costmap.Config{Buckets: map[string]costmap.BucketConfig{
		"generate_requests": {Capacity: 20, RefillPerSecond: 1},
		"generate_tokens":   {Capacity: 10000, RefillPerSecond: 3},
		"all_ai_tokens":     {Capacity: 50000, RefillPerSecond: 10},
	}}
}

// reportLimit is the example service's GenerateReport annotation.
func reportLimit() *connectlimitv1.Limit {
	return &connectlimitv1.Limit{Charges: []*connectlimitv1.Charge{
		{Bucket: "generate_requests", Cost: proto.Float64(1)},
		{Bucket: "generate_tokens", Estimate: "size(request.topic) / 4 + request.max_tokens", Actual: "response.tokens"},
		{Bucket: "all_ai_tokens", Estimate: "size(request.topic) / 4 + request.max_tokens", Actual: "has(response.usage) ? response.usage.total_tokens : 0"},
	}}
}

func TestEstimateAndActual(t *testing.T) {
	t.Parallel()
	svc := prototest.NewService(t, prototest.Method{Name: "Report", Report: true, ServerStreaming: true, Limit: reportLimit()})
	m, err := costmap.New(aiConfig(), svc)
	if err != nil {
		t.Fatal(err)
	}
	rule, err := m.Lookup(svc.Methods().Get(0))
	if err != nil {
		t.Fatal(err)
	}
	if !rule.Estimated() || !rule.Metered() || rule.MeteredAt(0) || !rule.MeteredAt(1) {
		t.Fatalf("Estimated %v Metered %v MeteredAt %v %v", rule.Estimated(), rule.Metered(), rule.MeteredAt(0), rule.MeteredAt(1))
	}
	charges, err := rule.Charges(defaultTier(t, m), prototest.ReportRequest(svc, "rate limits for LLMs", 500))
	if err != nil {
		t.Fatal(err)
	}
	for i, want := range []float64{1, 20/4 + 500, 20/4 + 500} {
		if charges[i].Cost != want {
			t.Errorf("charges[%d].Cost = %v, want %v", i, charges[i].Cost, want)
		}
	}
	usage := make([]float64, 3)
	for _, msg := range []proto.Message{
		prototest.ReportResponse(svc, 4, 0),
		prototest.ReportResponse(svc, 4, 0),
		prototest.ReportResponse(svc, 2, 15),
	} {
		if err := rule.AddActual(msg, usage); err != nil {
			t.Fatal(err)
		}
	}
	if usage[0] != 0 || usage[1] != 10 || usage[2] != 15 {
		t.Fatalf("usage = %v, want [0 10 15]", usage)
	}
}

func TestExpressionErrorsStopStartup(t *testing.T) {
	t.Parallel()
	charge := func(c *connectlimitv1.Charge) *connectlimitv1.Limit {
		return &connectlimitv1.Limit{Charges: []*connectlimitv1.Charge{c}}
	}
	for _, tc := range []struct {
		name   string
		limit  *connectlimitv1.Limit
		wantIn []string
	}{
		{"syntax error", charge(&connectlimitv1.Charge{Bucket: "generate_tokens", Estimate: "request.max_tokens +"}), []string{"/test.v1.TestService/Report", "charges[0].estimate", "request.max_tokens +"}},
		{"unknown field", charge(&connectlimitv1.Charge{Bucket: "generate_tokens", Estimate: "request.max_tokenz"}), []string{"max_tokenz"}},
		{"response in estimate", charge(&connectlimitv1.Charge{Bucket: "generate_tokens", Estimate: "response.tokens"}), []string{"response"}},
		{"string result", charge(&connectlimitv1.Charge{Bucket: "generate_tokens", Estimate: "request.topic"}), []string{"string", "want int, uint or double"}},
		{"bool actual", charge(&connectlimitv1.Charge{Bucket: "generate_tokens", Estimate: "1", Actual: "response.tokens > 3"}), []string{"charges[0].actual", "bool"}},
		{"cost and estimate", charge(&connectlimitv1.Charge{Bucket: "generate_tokens", Cost: proto.Float64(2), Estimate: "1"}), []string{"estimate", "cost", "set one"}},
		{"unknown bucket", charge(&connectlimitv1.Charge{Bucket: "nope", Estimate: "1"}), []string{`"nope"`}},
		{"bucket twice", &connectlimitv1.Limit{Bucket: "generate_tokens", Charges: []*connectlimitv1.Charge{{Bucket: "generate_tokens"}}}, []string{"twice"}},
		{"unknown concurrency", &connectlimitv1.Limit{Bucket: "generate_tokens", Concurrency: "streams"}, []string{`"streams"`, "concurrency"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			svc := prototest.NewService(t, prototest.Method{Name: "Report", Report: true, Limit: tc.limit})
			_, err := costmap.New(aiConfig(), svc)
			if err == nil {
				t.Fatal("New accepted an invalid limit")
			}
			for _, want := range tc.wantIn {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not mention %q", err, want)
				}
			}
		})
	}
}

func TestEvalErrors(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name, estimate string
		wantIn         string
	}{
		{"negative", "request.max_tokens - 1000", "want a number from 0 to 1e+15"},
		{"division by zero", "request.max_tokens / (size(request.topic) - size(request.topic))", "division by zero"},
		{"overflow", "request.max_tokens * 9223372036854775807", "overflow"},
		{"infinite", "double(request.max_tokens) / 0.0", "+Inf"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			limit := &connectlimitv1.Limit{Charges: []*connectlimitv1.Charge{{Bucket: "generate_tokens", Estimate: tc.estimate}}}
			svc := prototest.NewService(t, prototest.Method{Name: "Report", Report: true, Limit: limit})
			m, err := costmap.New(aiConfig(), svc)
			if err != nil {
				t.Fatal(err)
			}
			rule, err := m.Lookup(svc.Methods().Get(0))
			if err != nil {
				t.Fatal(err)
			}
			_, err = rule.Charges(defaultTier(t, m), prototest.ReportRequest(svc, "topic", 10))
			var evalErr *costmap.EvalError
			if !errors.As(err, &evalErr) || evalErr.Bucket != "generate_tokens" || !strings.Contains(err.Error(), tc.wantIn) {
				t.Fatalf("err = %v, want an EvalError mentioning %q", err, tc.wantIn)
			}
		})
	}
}

// FuzzEstimate feeds arbitrary requests to the example's estimate: it must
// return a finite cost >= 0 or an EvalError, never panic or hang.
func FuzzEstimate(f *testing.F) {
	f.Add("rate limits", int32(500))
	f.Add("", int32(0))
	f.Add(strings.Repeat("é", 1000), int32(math.MaxInt32))
	f.Add("\x00\xff", int32(-5))
	svc := prototest.NewService(f, prototest.Method{Name: "Report", Report: true, Limit: reportLimit()})
	m, err := costmap.New(aiConfig(), svc)
	if err != nil {
		f.Fatal(err)
	}
	rule, err := m.Lookup(svc.Methods().Get(0))
	if err != nil {
		f.Fatal(err)
	}
	tier, err := m.Tier("", false)
	if err != nil {
		f.Fatal(err)
	}
	f.Fuzz(func(t *testing.T, topic string, maxTokens int32) {
		charges, err := rule.Charges(tier, prototest.ReportRequest(svc, topic, maxTokens))
		if err != nil {
			var evalErr *costmap.EvalError
			if !errors.As(err, &evalErr) {
				t.Fatalf("error is not an EvalError: %v", err)
			}
			return
		}
		for _, c := range charges {
			if math.IsNaN(c.Cost) || math.IsInf(c.Cost, 0) || c.Cost < 0 {
				t.Fatalf("cost %v for topic %q max_tokens %d", c.Cost, topic, maxTokens)
			}
		}
		usage := make([]float64, len(charges))
		if err := rule.AddActual(prototest.ReportResponse(svc, maxTokens, maxTokens), usage); err != nil {
			var evalErr *costmap.EvalError
			if !errors.As(err, &evalErr) {
				t.Fatalf("error is not an EvalError: %v", err)
			}
		}
	})
}
