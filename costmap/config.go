package costmap

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"regexp"
	"slices"
	"strings"
	"time"

	"go.yaml.in/yaml/v3"

	"github.com/connectlimit/connectlimit/bucket"
)

// identifier is what buckets, concurrency limits and tiers may be called:
// short, lower case and free of the characters that delimit keys and header
// fields.
var identifier = regexp.MustCompile(`^[a-z0-9_.-]{1,64}$`)

// Config is the rate-limit part of a connectlimit configuration file. In
// YAML:
//
//	buckets:                      # the limits of the default tier
//	  search:          { capacity: 60,    refill_per_second: 1 }
//	  generate_tokens: { capacity: 10000, period: 1h }   # 10,000 tokens an hour
//	concurrency:                  # optional
//	  generate_streams: { limit: 2, lease: 30s }
//	tiers:                        # optional: per-tier limits
//	  pro:
//	    scale: 10                 # every bucket ×10 unless listed below
//	    buckets:
//	      generate_tokens: { capacity: 1000000, period: 1h }
//	    concurrency:
//	      generate_streams: { limit: 5 }
//	default_tier: free            # tier of authenticated callers that have none
//	default_bucket: search        # optional; unset means unannotated procedures are unlimited
//	procedures:                   # optional overrides of the proto annotations
//	  /aiservice.v1.AIService/Search: { bucket: search, cost: 2 }
type Config struct {
	// Buckets declares every bucket by name with its capacity and refill
	// rate, as they apply to the default tier. Names match [a-z0-9_.-]{1,64}.
	Buckets map[string]BucketConfig `yaml:"buckets"`
	// Concurrency declares concurrency limits by name: how many calls of
	// one identity may run at once in the procedures that name the limit.
	Concurrency map[string]ConcurrencyConfig `yaml:"concurrency"`
	// Tiers gives tiers of callers (for example anonymous, free, pro,
	// service) limits of their own. A tier not declared here uses the
	// limits above, except that an identity naming an undeclared tier other
	// than "anonymous" is an error.
	Tiers map[string]TierConfig `yaml:"tiers"`
	// DefaultTier is the tier of authenticated callers whose identity names
	// none. Empty (the default) means the limits of Buckets. Anonymous
	// callers are always in tier "anonymous".
	DefaultTier string `yaml:"default_tier"`
	// DefaultBucket, when set, is charged DefaultCost by every procedure
	// that has neither an annotation nor an entry in Procedures. When
	// empty (the default), such procedures are not limited.
	DefaultBucket string `yaml:"default_bucket"`
	// DefaultCost is what a call to an unannotated procedure costs in
	// DefaultBucket. Zero means 1.
	DefaultCost float64 `yaml:"default_cost"`
	// Procedures overrides or adds limits by procedure name
	// ("/package.Service/Method"), taking precedence over the proto
	// annotations. Use it to tune costs without regenerating code, or to
	// limit services whose protos you do not own.
	Procedures map[string]ProcedureConfig `yaml:"procedures"`
}

// BucketConfig is one bucket's limit in a [Config]. Give the refill rate
// either per second or as a period: {capacity: 20, period: 1h} refills 20
// tokens an hour.
type BucketConfig struct {
	// Capacity is the most tokens the bucket holds (its burst), > 0.
	Capacity float64 `yaml:"capacity"`
	// RefillPerSecond is how many tokens come back per second, > 0.
	RefillPerSecond float64 `yaml:"refill_per_second"`
	// Period, instead of RefillPerSecond, is how long an empty bucket takes
	// to refill completely: RefillPerSecond is Capacity / Period.
	Period time.Duration `yaml:"period"`
}

// ConcurrencyConfig is a concurrency limit in a [Config].
type ConcurrencyConfig struct {
	// Limit is how many calls of one identity may run at once, from 1 to
	// [MaxConcurrency].
	Limit int `yaml:"limit"`
	// Lease is how long a slot stays taken if the server holding it stops
	// renewing it (it crashed). Zero means [DefaultLease]. Servers renew
	// the leases of calls still running every Lease/3.
	Lease time.Duration `yaml:"lease"`
}

// DefaultLease is the lease of a concurrency limit whose configuration sets
// none.
const DefaultLease = 30 * time.Second

// TierConfig is the limits of one tier of callers.
type TierConfig struct {
	// Scale multiplies the capacity and refill rate of every bucket, and
	// the limit of every concurrency limit (rounded down, at least 1), that
	// Buckets or Concurrency below do not list. Zero means 1.
	Scale float64 `yaml:"scale"`
	// Buckets overrides the limits of buckets for this tier. Every name
	// must be declared in [Config.Buckets].
	Buckets map[string]BucketConfig `yaml:"buckets"`
	// Concurrency overrides concurrency limits for this tier. A Lease of
	// zero keeps the default tier's lease.
	Concurrency map[string]ConcurrencyConfig `yaml:"concurrency"`
}

// ProcedureConfig is a procedure's limit set in a [Config], with the same
// meaning as the connectlimit.v1.limit annotation, which it replaces, plus
// settings only the configuration can give.
type ProcedureConfig struct {
	// External declares that the procedure belongs to a service that is not
	// among those given to [New], so that it is not reported as a misspelt
	// procedure name. Without it, when New is given services, every
	// procedure listed must be one of their methods.
	External bool `yaml:"external"`
	// FailurePolicy overrides the configuration's failure policy for this
	// procedure: "open", "closed" or "local" (see the interceptor package).
	// Empty means the configuration's default.
	FailurePolicy string `yaml:"failure_policy"`
	// Bucket names a bucket of [Config.Buckets].
	Bucket string `yaml:"bucket"`
	// Cost is what one call takes from Bucket. Zero means 1.
	Cost float64 `yaml:"cost"`
	// Charges are further buckets a call draws from.
	Charges []ChargeConfig `yaml:"charges"`
	// Concurrency names a limit of [Config.Concurrency].
	Concurrency string `yaml:"concurrency"`
}

// ChargeConfig is one bucket of a [ProcedureConfig], as connectlimit.v1.Charge.
type ChargeConfig struct {
	// Bucket names a bucket of [Config.Buckets].
	Bucket string `yaml:"bucket"`
	// Cost is a fixed cost; zero with no Estimate means 1.
	Cost float64 `yaml:"cost"`
	// Estimate is a CEL expression over request giving the tokens to
	// reserve.
	Estimate string `yaml:"estimate"`
	// Actual is a CEL expression over response giving the tokens used.
	Actual string `yaml:"actual"`
}

// ParseConfig decodes a YAML configuration and validates it. Unknown fields
// are errors, so a misspelt key is reported instead of ignored; so are
// invalid limits, each naming its field and value (for example
// "buckets.search.capacity must be greater than 0 and at most 1e+15, got -1").
func ParseConfig(data []byte) (Config, error) {
	var cfg Config
	if err := DecodeYAML(data, &cfg); err != nil {
		return Config{}, err
	}
	if err := cfg.Validate(); err != nil {
		return Config{}, err
	}
	return cfg, nil
}

// DecodeYAML decodes one YAML document into v, rejecting unknown fields and
// a second document (after "---"), which would otherwise be silently
// ignored. It is exported for configuration types that embed [Config]
// inline.
func DecodeYAML(data []byte, v any) error {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(v); err != nil {
		if errors.Is(err, io.EOF) {
			return errors.New("costmap: configuration is empty")
		}
		return fmt.Errorf("costmap: configuration: %w", err)
	}
	var next yaml.Node
	switch err := dec.Decode(&next); {
	case errors.Is(err, io.EOF):
		return nil
	case err != nil:
		return fmt.Errorf("costmap: configuration: after the first document: %w", err)
	default:
		return fmt.Errorf("costmap: configuration has a second YAML document (line %d); put everything in one document", next.Line)
	}
}

// Failure policies a [ProcedureConfig] may name. The interceptor package
// documents what each does.
const (
	// PolicyOpen lets a call through without a decision.
	PolicyOpen = "open"
	// PolicyClosed refuses a call the store cannot decide.
	PolicyClosed = "closed"
	// PolicyLocal decides a call in memory at a share of every limit.
	PolicyLocal = "local"
)

// MaxConcurrency is the largest concurrency limit: far more calls than one
// caller can have in flight, and small enough that scaling it by a tier
// never overflows. A tier's scale never takes a limit past it.
const MaxConcurrency = 1_000_000

// MinLease is the shortest lease a concurrency limit may have: a lease
// shorter than a second would expire between two renewals of a busy server
// and free slots of calls that are still running.
const MinLease = time.Second

// Validate reports the first problem in cfg, naming the field and value.
// The expressions of configured procedures are compiled later, by
// [New] or [Map.Lookup], when the methods' descriptors are known.
func (cfg Config) Validate() error {
	_, err := New(cfg)
	return err
}

// tiers validates the buckets, concurrency limits and tiers, and returns
// the limits of every tier, the default tier under the key "".
func (cfg Config) tiers() (map[string]*Tier, error) {
	if len(cfg.Buckets) == 0 {
		return nil, errors.New("costmap: configuration declares no buckets: add at least one under buckets:")
	}
	base := &Tier{Name: DefaultTierName, limits: map[string]bucket.Limit{}, concurrency: map[string]Concurrency{}}
	for _, name := range sortedKeys(cfg.Buckets) {
		if !identifier.MatchString(name) {
			return nil, fmt.Errorf("costmap: bucket name %q must match %s", name, identifier)
		}
		l, err := cfg.Buckets[name].limit("buckets." + name)
		if err != nil {
			return nil, err
		}
		base.limits[name] = l
	}
	for _, name := range sortedKeys(cfg.Concurrency) {
		if !identifier.MatchString(name) {
			return nil, fmt.Errorf("costmap: concurrency limit name %q must match %s", name, identifier)
		}
		c, err := cfg.Concurrency[name].resolve("concurrency."+name, Concurrency{Lease: DefaultLease})
		if err != nil {
			return nil, err
		}
		c.Name = name
		base.concurrency[name] = c
	}
	tiers := map[string]*Tier{"": base}
	for _, name := range sortedKeys(cfg.Tiers) {
		if !identifier.MatchString(name) {
			return nil, fmt.Errorf("costmap: tier name %q must match %s", name, identifier)
		}
		t, err := cfg.Tiers[name].resolve(name, base)
		if err != nil {
			return nil, err
		}
		tiers[name] = t
	}
	if cfg.DefaultTier != "" {
		if _, ok := tiers[cfg.DefaultTier]; !ok {
			return nil, fmt.Errorf("costmap: default_tier %q is not declared under tiers: (declared: %s)",
				cfg.DefaultTier, strings.Join(sortedKeys(cfg.Tiers), ", "))
		}
	}
	if cfg.DefaultBucket != "" {
		cost := 1.0
		if cfg.DefaultCost != 0 {
			if err := costError("default_cost", cfg.DefaultCost); err != nil {
				return nil, err
			}
			cost = cfg.DefaultCost
		}
		if err := checkStaticCost(tiers, "default_bucket", cfg.DefaultBucket, "default_cost", cost); err != nil {
			return nil, err
		}
	} else if cfg.DefaultCost != 0 {
		return nil, fmt.Errorf("costmap: default_cost is %v but default_bucket is not set", cfg.DefaultCost)
	}
	for _, proc := range sortedKeys(cfg.Procedures) {
		if err := checkProcedureName(proc); err != nil {
			return nil, fmt.Errorf("costmap: procedures: %w", err)
		}
		switch p := cfg.Procedures[proc].FailurePolicy; p {
		case "", PolicyOpen, PolicyClosed, PolicyLocal:
		default:
			return nil, fmt.Errorf("costmap: procedures.%s.failure_policy must be open, closed or local, got %q", proc, p)
		}
	}
	return tiers, nil
}

func (tc TierConfig) resolve(name string, base *Tier) (*Tier, error) {
	field := "tiers." + name
	scale := tc.Scale
	if scale == 0 {
		scale = 1
	}
	if err := costError(field+".scale", scale); err != nil {
		return nil, err
	}
	t := &Tier{Name: name, key: name, limits: make(map[string]bucket.Limit, len(base.limits)), concurrency: make(map[string]Concurrency, len(base.concurrency))}
	for b, l := range base.limits {
		t.limits[b] = bucket.Limit{Capacity: l.Capacity * scale, RefillPerSecond: l.RefillPerSecond * scale}
		if err := t.limits[b].Validate(); err != nil {
			return nil, fmt.Errorf("costmap: %s.scale %v makes bucket %q invalid: %s", field, scale, b, strings.TrimPrefix(err.Error(), "bucket: "))
		}
	}
	for _, b := range sortedKeys(tc.Buckets) {
		if _, ok := base.limits[b]; !ok {
			return nil, fmt.Errorf("costmap: %s.buckets names bucket %q, which is not declared under buckets: (declared: %s)",
				field, b, strings.Join(sortedKeys(base.limits), ", "))
		}
		l, err := tc.Buckets[b].limit(field + ".buckets." + b)
		if err != nil {
			return nil, err
		}
		t.limits[b] = l
	}
	for c, bc := range base.concurrency {
		bc.Limit = int(max(1, min(float64(bc.Limit)*scale, MaxConcurrency)))
		t.concurrency[c] = bc
	}
	for _, c := range sortedKeys(tc.Concurrency) {
		bc, ok := base.concurrency[c]
		if !ok {
			return nil, fmt.Errorf("costmap: %s.concurrency names limit %q, which is not declared under concurrency: (declared: %s)",
				field, c, strings.Join(sortedKeys(base.concurrency), ", "))
		}
		r, err := tc.Concurrency[c].resolve(field+".concurrency."+c, bc)
		if err != nil {
			return nil, err
		}
		t.concurrency[c] = r
	}
	return t, nil
}

func (bc BucketConfig) limit(field string) (bucket.Limit, error) {
	rate := bc.RefillPerSecond
	switch {
	case bc.Period != 0 && bc.RefillPerSecond != 0:
		return bucket.Limit{}, fmt.Errorf("costmap: %s sets both refill_per_second (%v) and period (%v); set one", field, bc.RefillPerSecond, bc.Period)
	case bc.Period < 0:
		return bucket.Limit{}, fmt.Errorf("costmap: %s.period must be greater than 0, got %v", field, bc.Period)
	case bc.Period > 0:
		rate = bc.Capacity / bc.Period.Seconds()
	}
	l, err := bucket.NewLimit(bc.Capacity, rate)
	if err != nil {
		// bucket's error names the field; put it under its YAML path.
		return bucket.Limit{}, fmt.Errorf("costmap: %s.%s", field, strings.TrimPrefix(err.Error(), "bucket: "))
	}
	return l, nil
}

// resolve applies cc over base: zero fields keep base's values.
func (cc ConcurrencyConfig) resolve(field string, base Concurrency) (Concurrency, error) {
	c := base
	if cc.Limit != 0 || base.Limit == 0 {
		if cc.Limit < 1 || cc.Limit > MaxConcurrency {
			return Concurrency{}, fmt.Errorf("costmap: %s.limit must be from 1 to %d, got %d", field, MaxConcurrency, cc.Limit)
		}
		c.Limit = cc.Limit
	}
	if cc.Lease < 0 || (cc.Lease > 0 && cc.Lease < MinLease) {
		return Concurrency{}, fmt.Errorf("costmap: %s.lease must be at least %v, got %v", field, MinLease, cc.Lease)
	}
	if cc.Lease > 0 {
		c.Lease = cc.Lease
	}
	return c, nil
}

// checkStaticCost checks that bucket is declared and that cost, already
// known to be finite and >= 0, is no larger than the bucket's capacity in
// any tier, since such a call could never be allowed.
func checkStaticCost(tiers map[string]*Tier, bucketField, name, costField string, cost float64) error {
	if name == "" {
		return fmt.Errorf("costmap: %s is empty", bucketField)
	}
	base := tiers[""]
	if _, ok := base.limits[name]; !ok {
		return fmt.Errorf("costmap: %s names bucket %q, which is not declared under buckets: (declared: %s)",
			bucketField, name, strings.Join(sortedKeys(base.limits), ", "))
	}
	for _, tn := range sortedKeys(tiers) {
		if l := tiers[tn].limits[name]; cost > l.Capacity {
			return fmt.Errorf("costmap: %s is %v but bucket %q holds at most %v tokens in tier %s, so no call could ever be allowed",
				costField, cost, name, l.Capacity, tiers[tn].Name)
		}
	}
	return nil
}

func costError(field string, cost float64) error {
	if !(cost > 0 && cost <= bucket.MaxTokens) {
		return fmt.Errorf("costmap: %s must be greater than 0 and at most %g, got %v", field, bucket.MaxTokens, cost)
	}
	return nil
}

func checkProcedureName(proc string) error {
	parts := strings.Split(proc, "/")
	if len(parts) != 3 || parts[0] != "" || parts[1] == "" || parts[2] == "" {
		return fmt.Errorf("procedure name %q must look like /package.Service/Method", proc)
	}
	return nil
}

func sortedKeys[V any](m map[string]V) []string {
	keys := make([]string, 0, len(m))
	for k := range m {
		keys = append(keys, k)
	}
	slices.Sort(keys)
	return keys
}
