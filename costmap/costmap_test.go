package costmap_test

import (
	"math"
	"strings"
	"testing"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/costmap"
	"github.com/connectlimit/connectlimit/internal/prototest"
	connectlimitv1 "github.com/connectlimit/connectlimit/proto/connectlimit/v1"
)

func defaultTier(t *testing.T, m *costmap.Map) *costmap.Tier {
	t.Helper()
	tier, err := m.Tier("", false)
	if err != nil {
		t.Fatal(err)
	}
	return tier
}

func baseConfig() costmap.Config {
	return costmap.Config{Buckets: map[string]costmap.BucketConfig{
		"search":   {Capacity: 60, RefillPerSecond: 1},
		"generate": {Capacity: 20000, RefillPerSecond: 14},
	}}
}

func TestLookup(t *testing.T) {
	t.Parallel()
	search := bucket.Limit{Capacity: 60, RefillPerSecond: 1}
	generate := bucket.Limit{Capacity: 20000, RefillPerSecond: 14}
	svc := prototest.NewService(t,
		prototest.Method{Name: "Search", Limit: prototest.Limit("search", nil)},
		prototest.Method{Name: "GenerateReport", Limit: prototest.Limit("generate", proto.Float64(50))},
		prototest.Method{Name: "Fractional", Limit: prototest.Limit("search", proto.Float64(0.25))},
		prototest.Method{Name: "Health"},
		prototest.Method{Name: "Tuned", Limit: prototest.Limit("search", proto.Float64(5))},
	)
	withDefault := baseConfig()
	withDefault.DefaultBucket = "search"
	withDefault.DefaultCost = 2
	withOverride := baseConfig()
	withOverride.Procedures = map[string]costmap.ProcedureConfig{
		"/test.v1.TestService/Tuned":  {Bucket: "generate", Cost: 7},
		"/test.v1.TestService/Health": {Bucket: "search"},
	}
	for _, tc := range []struct {
		name       string
		cfg        costmap.Config
		method     string
		wantBucket string // empty: unlimited
		wantLimit  bucket.Limit
		wantCost   float64
	}{
		{"annotation without cost costs 1", baseConfig(), "Search", "search", search, 1},
		{"annotation with cost", baseConfig(), "GenerateReport", "generate", generate, 50},
		{"fractional cost", baseConfig(), "Fractional", "search", search, 0.25},
		{"unannotated is unlimited by default", baseConfig(), "Health", "", bucket.Limit{}, 0},
		{"unannotated uses default bucket", withDefault, "Health", "search", search, 2},
		{"annotation beats default", withDefault, "GenerateReport", "generate", generate, 50},
		{"config overrides annotation", withOverride, "Tuned", "generate", generate, 7},
		{"config limits unannotated", withOverride, "Health", "search", search, 1},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			m, err := costmap.New(tc.cfg, svc)
			if err != nil {
				t.Fatal(err)
			}
			md := svc.Methods().ByName(protoreflect.Name(tc.method))
			rule, err := m.Lookup(md)
			if err != nil {
				t.Fatal(err)
			}
			if tc.wantBucket == "" {
				if rule != nil {
					t.Fatalf("Lookup(%s) = %+v, want unlimited (nil)", tc.method, rule)
				}
				return
			}
			want := bucket.Charge{Bucket: tc.wantBucket, Limit: tc.wantLimit, Cost: tc.wantCost}
			if rule == nil {
				t.Fatalf("Lookup(%s) = nil, want one charge %+v", tc.method, want)
			}
			charges, err := rule.Charges(defaultTier(t, m), nil)
			if err != nil || len(charges) != 1 || charges[0] != want {
				t.Fatalf("Charges = %+v, %v; want one charge %+v", charges, err, want)
			}
			if wantProc := "/test.v1.TestService/" + tc.method; rule.Procedure != wantProc {
				t.Fatalf("Procedure = %q, want %q", rule.Procedure, wantProc)
			}
			if got, err := m.LookupProcedure(rule.Procedure); got != rule || err != nil {
				t.Fatalf("LookupProcedure after Lookup = %+v, %v; want the same rule", got, err)
			}
		})
	}
}

func TestNewRejectsBadAnnotations(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name   string
		limit  *connectlimitv1.Limit
		wantIn []string
	}{
		{"unknown bucket", prototest.Limit("generat", nil), []string{"/test.v1.TestService/M", `"generat"`, "declared: generate, search"}},
		{"empty bucket", prototest.Limit("", nil), []string{"/test.v1.TestService/M", "bucket is empty"}},
		{"zero cost", prototest.Limit("search", proto.Float64(0)), []string{"cost", "got 0"}},
		{"NaN cost", prototest.Limit("search", proto.Float64(math.NaN())), []string{"cost", "got NaN"}},
		{"negative cost", prototest.Limit("search", proto.Float64(-3)), []string{"cost", "got -3"}},
		{"cost over capacity", prototest.Limit("search", proto.Float64(61)), []string{"/test.v1.TestService/M", "61", "holds at most 60", "could ever be allowed"}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, err := costmap.New(baseConfig(), prototest.NewService(t, prototest.Method{Name: "M", Limit: tc.limit}))
			if err == nil {
				t.Fatal("New accepted an invalid annotation")
			}
			for _, want := range tc.wantIn {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not mention %q", err, want)
				}
			}
		})
	}
}

func TestLookupResolvesLazily(t *testing.T) {
	t.Parallel()
	// Services not passed to New are resolved from their descriptor on
	// first use, with the same checks.
	m, err := costmap.New(baseConfig())
	if err != nil {
		t.Fatal(err)
	}
	svc := prototest.NewService(t, prototest.Method{Name: "Good", Limit: prototest.Limit("generate", proto.Float64(3))}, prototest.Method{Name: "Bad", Limit: prototest.Limit("nope", nil)})
	r, err := m.Lookup(svc.Methods().ByName("Good"))
	if err != nil || r == nil {
		t.Fatalf("Lookup(Good) = %+v, %v", r, err)
	}
	if charges, _ := r.Charges(defaultTier(t, m), nil); charges[0].Cost != 3 {
		t.Fatalf("Good costs %+v, want 3", charges)
	}
	if _, err := m.Lookup(svc.Methods().ByName("Bad")); err == nil || !strings.Contains(err.Error(), `"nope"`) {
		t.Fatalf("Lookup(Bad) error = %v, want one naming the bucket", err)
	}
	if r, err := m.LookupProcedure("/test.v1.TestService/Unknown"); r != nil || err != nil {
		t.Fatalf("LookupProcedure(unknown) = %+v, %v; want nil, nil", r, err)
	}
}

func TestParseConfig(t *testing.T) {
	t.Parallel()
	cfg, err := costmap.ParseConfig([]byte(`
buckets:
  search:   { capacity: 60,    refill_per_second: 1 }
  generate: { capacity: 20000, refill_per_second: 14 }
default_bucket: search
procedures:
  /aiservice.v1.AIService/Search: { bucket: search, cost: 2.5 }
`))
	if err != nil {
		t.Fatal(err)
	}
	if got := cfg.Buckets["generate"]; got != (costmap.BucketConfig{Capacity: 20000, RefillPerSecond: 14}) {
		t.Errorf("buckets.generate = %+v", got)
	}
	if cfg.DefaultBucket != "search" || cfg.Procedures["/aiservice.v1.AIService/Search"].Cost != 2.5 {
		t.Errorf("cfg = %+v", cfg)
	}
}

func TestParseConfigErrors(t *testing.T) {
	t.Parallel()
	const ok = "buckets:\n  search: { capacity: 60, refill_per_second: 1 }\n"
	for _, tc := range []struct {
		name   string
		yaml   string
		wantIn []string
	}{
		{"empty", "", []string{"empty"}},
		{"no buckets", "buckets: {}\n", []string{"no buckets"}},
		{"unknown field", ok + "bukets: {}\n", []string{"bukets"}},
		{"misspelt bucket field", "buckets:\n  search: { capacity: 60, refill: 1 }\n", []string{"refill"}},
		{"not a number", "buckets:\n  search: { capacity: lots, refill_per_second: 1 }\n", []string{"lots"}},
		{"zero capacity", "buckets:\n  search: { capacity: 0, refill_per_second: 1 }\n", []string{"buckets.search.capacity", "got 0"}},
		{"negative rate", "buckets:\n  search: { capacity: 5, refill_per_second: -2 }\n", []string{"buckets.search.refill_per_second", "got -2"}},
		{"missing rate", "buckets:\n  search: { capacity: 5 }\n", []string{"buckets.search.refill_per_second", "got 0"}},
		{"NaN capacity", "buckets:\n  search: { capacity: .nan, refill_per_second: 1 }\n", []string{"buckets.search.capacity", "NaN"}},
		{"infinite rate", "buckets:\n  search: { capacity: 1, refill_per_second: .inf }\n", []string{"buckets.search.refill_per_second", "+Inf"}},
		{"bad bucket name", "buckets:\n  \"Search Bucket\": { capacity: 1, refill_per_second: 1 }\n", []string{`"Search Bucket"`}},
		{"unknown default bucket", ok + "default_bucket: other\n", []string{"default_bucket", `"other"`}},
		{"default cost without bucket", ok + "default_cost: 3\n", []string{"default_cost", "3"}},
		{"default cost over capacity", ok + "default_bucket: search\ndefault_cost: 100\n", []string{"default_cost", "100", "at most 60"}},
		{"bad procedure name", ok + "procedures:\n  Search: { bucket: search }\n", []string{`"Search"`, "/package.Service/Method"}},
		{"procedure unknown bucket", ok + "procedures:\n  /a.B/C: { bucket: nope }\n", []string{"procedures./a.B/C.bucket", `"nope"`}},
		{"procedure negative cost", ok + "procedures:\n  /a.B/C: { bucket: search, cost: -1 }\n", []string{"procedures./a.B/C.cost", "-1"}},
		{"second document", ok + "---\nbuckets:\n  other: { capacity: 1, refill_per_second: 1 }\n", []string{"second YAML document", "line 3"}},
		{"capacity past MaxTokens", "buckets:\n  search: { capacity: 1e20, refill_per_second: 1 }\n", []string{"buckets.search.capacity", "at most 1e+15", "1e+20"}},
		{"rate past MaxTokens", "buckets:\n  search: { capacity: 1, refill_per_second: 2e15 }\n", []string{"buckets.search.refill_per_second", "2e+15"}},
		{"procedure cost past MaxTokens", ok + "procedures:\n  /a.B/C: { bucket: search, cost: 1e16 }\n", []string{"procedures./a.B/C.cost", "1e+16"}},
		{"unknown failure policy", ok + "procedures:\n  /a.B/C: { bucket: search, failure_policy: maybe }\n", []string{"procedures./a.B/C.failure_policy", `"maybe"`}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			_, err := costmap.ParseConfig([]byte(tc.yaml))
			if err == nil {
				t.Fatal("ParseConfig accepted an invalid configuration")
			}
			for _, want := range tc.wantIn {
				if !strings.Contains(err.Error(), want) {
					t.Errorf("error %q does not mention %q", err, want)
				}
			}
		})
	}
}

func TestProceduresMustBeServed(t *testing.T) {
	t.Parallel()
	svc := prototest.NewService(t,
		prototest.Method{Name: "Search", Limit: prototest.Limit("search", nil)},
		prototest.Method{Name: "Health"},
	)
	for _, tc := range []struct {
		name       string
		procedures map[string]costmap.ProcedureConfig
		wantIn     string // empty: accepted
	}{
		{"served procedure", map[string]costmap.ProcedureConfig{"/test.v1.TestService/Health": {Bucket: "search"}}, ""},
		{"misspelt procedure", map[string]costmap.ProcedureConfig{"/test.v1.TestService/Serch": {Bucket: "search"}},
			"procedures./test.v1.TestService/Serch names no method of the served services (test.v1.TestService)"},
		{"declared external", map[string]costmap.ProcedureConfig{"/other.v1.Other/Call": {Bucket: "search", External: true}}, ""},
		{"undeclared external", map[string]costmap.ProcedureConfig{"/other.v1.Other/Call": {Bucket: "search"}}, "external: true"},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			cfg := baseConfig()
			cfg.Procedures = tc.procedures
			_, err := costmap.New(cfg, svc)
			if tc.wantIn == "" {
				if err != nil {
					t.Fatalf("New: %v", err)
				}
				return
			}
			if err == nil || !strings.Contains(err.Error(), tc.wantIn) {
				t.Fatalf("err = %v, want one mentioning %q", err, tc.wantIn)
			}
			// Without services, names cannot be checked.
			if _, err := costmap.New(cfg); err != nil {
				t.Fatalf("New without services: %v", err)
			}
		})
	}
}

func TestFailurePolicyPerProcedure(t *testing.T) {
	t.Parallel()
	svc := prototest.NewService(t,
		prototest.Method{Name: "Search", Limit: prototest.Limit("search", proto.Float64(2))},
		prototest.Method{Name: "Generate", Limit: prototest.Limit("generate", nil)},
		prototest.Method{Name: "Health"},
	)
	cfg := baseConfig()
	cfg.Procedures = map[string]costmap.ProcedureConfig{
		// Only the policy: the annotation's limit stays.
		"/test.v1.TestService/Search": {FailurePolicy: costmap.PolicyClosed},
		// A whole new limit with its policy.
		"/test.v1.TestService/Health": {Bucket: "search", FailurePolicy: costmap.PolicyOpen},
	}
	m, err := costmap.New(cfg, svc)
	if err != nil {
		t.Fatal(err)
	}
	tier := defaultTier(t, m)
	for _, tc := range []struct {
		method     string
		wantPolicy string
		wantCost   float64
	}{
		{"Search", costmap.PolicyClosed, 2},
		{"Health", costmap.PolicyOpen, 1},
		{"Generate", "", 1},
	} {
		r, err := m.Lookup(svc.Methods().ByName(protoreflect.Name(tc.method)))
		if err != nil || r == nil {
			t.Fatalf("Lookup(%s) = %v, %v", tc.method, r, err)
		}
		charges, _ := r.Charges(tier, nil)
		if r.FailurePolicy() != tc.wantPolicy || charges[0].Cost != tc.wantCost {
			t.Errorf("%s: policy %q, cost %v; want %q, %v", tc.method, r.FailurePolicy(), charges[0].Cost, tc.wantPolicy, tc.wantCost)
		}
	}
	// A policy-only entry for a procedure without a limit is an error.
	cfg.Procedures = map[string]costmap.ProcedureConfig{"/test.v1.TestService/Health": {FailurePolicy: costmap.PolicyClosed}}
	if _, err := costmap.New(cfg, svc); err == nil || !strings.Contains(err.Error(), "sets only failure_policy") {
		t.Fatalf("New = %v, want an error about a policy with nothing to apply it to", err)
	}
}
