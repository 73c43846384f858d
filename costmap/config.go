package costmap

import (
	"bytes"
	"errors"
	"fmt"
	"io"
	"regexp"
	"slices"
	"strings"

	"go.yaml.in/yaml/v3"

	"github.com/connectlimit/connectlimit/bucket"
)

// bucketName is what a bucket may be called: short, lower case and free of
// the characters that delimit keys and header fields.
var bucketName = regexp.MustCompile(`^[a-z0-9_.-]{1,64}$`)

// Config is the rate-limit part of a connectlimit configuration file. In
// YAML:
//
//	buckets:
//	  search:   { capacity: 60,    refill_per_second: 1 }
//	  generate: { capacity: 20000, refill_per_second: 14 }
//	default_bucket: search        # optional; unset means unannotated procedures are unlimited
//	procedures:                   # optional overrides of the proto annotations
//	  /aiservice.v1.AIService/Search: { bucket: search, cost: 2 }
type Config struct {
	// Buckets declares every bucket by name with its capacity and refill
	// rate. Names match [a-z0-9_.-]{1,64}.
	Buckets map[string]BucketConfig `yaml:"buckets"`
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

// BucketConfig is one bucket's limit in a [Config].
type BucketConfig struct {
	// Capacity is the most tokens the bucket holds (its burst), > 0.
	Capacity float64 `yaml:"capacity"`
	// RefillPerSecond is how many tokens come back per second, > 0.
	RefillPerSecond float64 `yaml:"refill_per_second"`
}

// ProcedureConfig is a procedure's limit set in a [Config], with the same
// meaning as the connectlimit.v1.limit annotation.
type ProcedureConfig struct {
	// Bucket names a bucket of [Config.Buckets].
	Bucket string `yaml:"bucket"`
	// Cost is what one call takes from Bucket. Zero means 1.
	Cost float64 `yaml:"cost"`
}

// ParseConfig decodes a YAML configuration and validates it. Unknown fields
// are errors, so a misspelt key is reported instead of ignored; so are
// invalid limits, each naming its field and value (for example
// "buckets.search.capacity must be a finite number greater than 0, got -1").
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

// DecodeYAML decodes one YAML document into v, rejecting unknown fields. It
// is exported for configuration types that embed [Config] inline.
func DecodeYAML(data []byte, v any) error {
	dec := yaml.NewDecoder(bytes.NewReader(data))
	dec.KnownFields(true)
	if err := dec.Decode(v); err != nil {
		if errors.Is(err, io.EOF) {
			return errors.New("costmap: configuration is empty")
		}
		return fmt.Errorf("costmap: configuration: %w", err)
	}
	return nil
}

// Validate reports the first problem in cfg, naming the field and value.
func (cfg Config) Validate() error {
	if len(cfg.Buckets) == 0 {
		return errors.New("costmap: configuration declares no buckets: add at least one under buckets:")
	}
	for _, name := range sortedKeys(cfg.Buckets) {
		if !bucketName.MatchString(name) {
			return fmt.Errorf("costmap: bucket name %q must match %s", name, bucketName)
		}
		if _, err := cfg.Buckets[name].limit(); err != nil {
			// bucket's error names the field; put it under its YAML path.
			return fmt.Errorf("costmap: buckets.%s.%s", name, strings.TrimPrefix(err.Error(), "bucket: "))
		}
	}
	if cfg.DefaultBucket != "" {
		if err := cfg.checkCharge("default_bucket", cfg.DefaultBucket, "default_cost", cfg.DefaultCost); err != nil {
			return err
		}
	} else if cfg.DefaultCost != 0 {
		return fmt.Errorf("costmap: default_cost is %v but default_bucket is not set", cfg.DefaultCost)
	}
	for _, proc := range sortedKeys(cfg.Procedures) {
		if err := checkProcedureName(proc); err != nil {
			return fmt.Errorf("costmap: procedures: %w", err)
		}
		p := cfg.Procedures[proc]
		field := "procedures." + proc
		if err := cfg.checkCharge(field+".bucket", p.Bucket, field+".cost", p.Cost); err != nil {
			return err
		}
	}
	return nil
}

// checkCharge checks that bucket is declared and that cost (0 meaning 1)
// is positive, finite and no larger than the bucket's capacity.
func (cfg Config) checkCharge(bucketField, name, costField string, cost float64) error {
	if name == "" {
		return fmt.Errorf("costmap: %s is empty", bucketField)
	}
	bc, ok := cfg.Buckets[name]
	if !ok {
		return fmt.Errorf("costmap: %s names bucket %q, which is not declared under buckets: (declared: %s)",
			bucketField, name, strings.Join(sortedKeys(cfg.Buckets), ", "))
	}
	if cost == 0 {
		return nil
	}
	if err := costError(costField, cost); err != nil {
		return err
	}
	if cost > bc.Capacity {
		return fmt.Errorf("costmap: %s is %v but bucket %q holds at most %v tokens, so no call could ever be allowed",
			costField, cost, name, bc.Capacity)
	}
	return nil
}

func costError(field string, cost float64) error {
	if err := (bucket.Limit{Capacity: cost, RefillPerSecond: 1}).Validate(); err != nil {
		return fmt.Errorf("costmap: %s must be a finite number greater than 0, got %v", field, cost)
	}
	return nil
}

func (bc BucketConfig) limit() (bucket.Limit, error) {
	return bucket.NewLimit(bc.Capacity, bc.RefillPerSecond)
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
