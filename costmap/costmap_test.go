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
