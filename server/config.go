package server

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"maps"
	"net/netip"
	"net/url"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/costmap"
	"github.com/connectlimit/connectlimit/interceptor"
)

// Config is a whole connectlimit configuration file. In YAML:
//
//	buckets:
//	  search:   { capacity: 60,    refill_per_second: 1 }
//	  generate: { capacity: 20000, refill_per_second: 14 }
//	api_keys:
//	  demo-key-alice: { user: alice, tier: pro }
//	trusted_proxies: [10.0.0.0/8]   # optional
//	failure_policy: local           # optional: local (default), open or closed
//	local_share: 0.5                # optional: share of each limit one instance keeps under local
//	store_timeout: 100ms            # optional
//	redis_groups: 65536             # optional: the default
//	denial_cache: true              # optional: the default
//	auth_failures: { capacity: 20, period: 400s }  # optional: the default
//	max_message_bytes: 4194304      # optional: the default, 4 MiB
//	read_timeout: 1m                # optional: the default; 0s for none
//	idle_timeout: 2m                # optional: the default; 0s for none
//
// The bucket fields are those of [costmap.Config].
type Config struct {
	costmap.Config `yaml:",inline"`
	// APIKeys maps each accepted API key, sent as "Authorization: Bearer
	// <key>", to who owns it. A call with an unknown key is rejected with
	// CodeUnauthenticated; a call without the header is anonymous and
	// limited by client IP. Names must be unique: two keys with one name
	// would share buckets.
	APIKeys map[string]APIKey `yaml:"api_keys"`
	// TrustedProxies lists the addresses or CIDR prefixes of reverse proxies
	// whose X-Forwarded-For header is believed. Empty by default.
	TrustedProxies []string `yaml:"trusted_proxies"`
	// FailurePolicy is what happens to calls when the store fails: "local"
	// (the default), "open" or "closed"; see [interceptor.FailurePolicy].
	// A procedures entry may set its own.
	FailurePolicy string `yaml:"failure_policy"`
	// LocalShare is the share, in (0, 1], of every limit each instance
	// enforces on its own under the local policy; zero means
	// [interceptor.DefaultLocalShare]. With n instances an outage admits
	// at most n × local_share × limit.
	LocalShare float64 `yaml:"local_share"`
	// StoreTimeout bounds each store round trip, from 1ms to 1m; zero
	// means [interceptor.DefaultStoreTimeout]. Every concurrency lease
	// must be at least 10 times as long.
	StoreTimeout time.Duration `yaml:"store_timeout"`
	// RedisGroups is how many group hashes the Redis store spreads
	// subjects over, from 1 to 2^32; zero means
	// [redisstore.DefaultGroups]. Size it to about the number of buckets
	// that are not full at once divided by 64 (see [redisstore.WithGroups]);
	// every instance sharing a Redis must use the same value, and changing
	// it starts every bucket full.
	RedisGroups int `yaml:"redis_groups"`
	// DenialCache, when false, turns off the local denial cache in front of
	// the Redis store (see [interceptor.WithDenialCache]). Unset means
	// true.
	DenialCache *bool `yaml:"denial_cache"`
	// AuthFailures limits failed authentications (unknown API keys,
	// malformed Authorization headers) per client IP, shared through the
	// store; past it, calls from that IP get CodeResourceExhausted with a
	// RetryInfo, without their key being checked. Unset means the default,
	// [DefaultAuthFailures]: a burst of 20 failures, then 3 a minute.
	AuthFailures *AuthFailures `yaml:"auth_failures"`
	// MaxMessageBytes is the largest request message, in bytes, that the
	// handlers built with [Server.HandlerOptions] read (after
	// decompression); larger ones get CodeResourceExhausted. Zero means
	// [DefaultMaxMessageBytes].
	MaxMessageBytes int `yaml:"max_message_bytes"`
	// ReadTimeout bounds reading one request, headers and body: a client or
	// bidi stream must finish sending within it. Unset means
	// [DefaultReadTimeout]; 0s means none.
	ReadTimeout *time.Duration `yaml:"read_timeout"`
	// IdleTimeout is how long an idle keep-alive connection stays open.
	// Unset means [DefaultIdleTimeout]; 0s means none.
	IdleTimeout *time.Duration `yaml:"idle_timeout"`
	// CORS lets browser code on other origins call the server.
	CORS CORS `yaml:"cors"`
}

// CORS is the server's cross-origin resource sharing policy, for
// browsers calling it with connect-web from pages on other origins.
type CORS struct {
	// AllowedOrigins lists the origins ("https://app.example.com", scheme,
	// host and port, nothing else) whose pages may call the server; "*"
	// allows any. None by default: browsers then refuse cross-origin calls.
	// Allowed origins may send the Connect, gRPC-Web and Authorization
	// headers, and read the limiter's headers (RateLimit,
	// RateLimit-Policy, Retry-After, Connectlimit-Warning) as well as
	// Connect's and gRPC-Web's.
	AllowedOrigins []string `yaml:"allowed_origins"`
	// MaxAge is how long a browser may cache a preflight answer; zero
	// means [DefaultCORSMaxAge].
	MaxAge time.Duration `yaml:"max_age"`
}

// DefaultCORSMaxAge is how long browsers cache a preflight answer unless
// cors.max_age says otherwise.
const DefaultCORSMaxAge = 2 * time.Hour

// APIKey describes the owner of an API key.
type APIKey struct {
	// User is the user the key belongs to.
	User string `yaml:"user"`
	// Name identifies the key in buckets, logs and QuotaFailure details,
	// and must be unique among the keys. It defaults to "sha256:" and the
	// first 12 hex digits of the key's SHA-256, so the secret itself is
	// never stored or echoed.
	Name string `yaml:"name"`
	// Tier is the key's tier, one of the configuration's tiers. Empty
	// means the configuration's default_tier.
	Tier string `yaml:"tier"`
}

// AuthFailures is the bucket of failed authentications each client IP
// has. Give the refill rate per second or as a period, as for a
// [costmap.BucketConfig].
type AuthFailures struct {
	// Disabled turns the limit off.
	Disabled bool `yaml:"disabled"`
	// Capacity is how many failures in a burst, > 0.
	Capacity float64 `yaml:"capacity"`
	// RefillPerSecond is how many failures a second are forgiven.
	RefillPerSecond float64 `yaml:"refill_per_second"`
	// Period, instead of RefillPerSecond, is how long an exhausted bucket
	// takes to refill completely.
	Period time.Duration `yaml:"period"`
}

// DefaultAuthFailures is the limit on failed authentications when the
// configuration sets none: a burst of 20, then one every 20 seconds.
var DefaultAuthFailures = AuthFailures{Capacity: 20, Period: 400 * time.Second}

// DefaultMaxMessageBytes is the largest request message the server's
// handlers read unless the configuration sets max_message_bytes: 4 MiB,
// connect-go v2's default.
const DefaultMaxMessageBytes = 4 << 20

// DefaultReadTimeout bounds reading a request unless the configuration
// sets read_timeout.
const DefaultReadTimeout = time.Minute

// DefaultIdleTimeout is how long idle connections stay open unless the
// configuration sets idle_timeout.
const DefaultIdleTimeout = 2 * time.Minute

// maxRedisGroups bounds redis_groups, as redisstore.WithGroups does.
const maxRedisGroups = 1 << 32

// maxStoreTimeout bounds store_timeout: a limiter that waits longer for its
// store is itself an outage.
const maxStoreTimeout = time.Minute

// reservedBucketPrefix starts the names of the buckets the server keeps for
// itself, such as the failed-authentication bucket.
const reservedBucketPrefix = "connectlimit."

// authFailureBucket names the failed-authentication bucket of each IP.
const authFailureBucket = reservedBucketPrefix + "auth_failures"

// LoadConfig reads and validates the configuration file at path.
func LoadConfig(path string) (Config, error) {
	data, err := os.ReadFile(path)
	if err != nil {
		return Config{}, fmt.Errorf("server: reading configuration: %w", err)
	}
	cfg, err := ParseConfig(data)
	if err != nil {
		return Config{}, fmt.Errorf("%s: %w", path, err)
	}
	return cfg, nil
}

// ParseConfig decodes a YAML configuration and validates it. Unknown fields
// are errors; every error names the field and the value at fault.
func ParseConfig(data []byte) (Config, error) {
	var cfg Config
	if err := costmap.DecodeYAML(data, &cfg); err != nil {
		return Config{}, err
	}
	if err := cfg.Validate(); err != nil {
		return Config{}, err
	}
	return cfg, nil
}

// Validate reports the first problem in cfg, naming the field and value.
func (cfg Config) Validate() error {
	if err := cfg.Config.Validate(); err != nil {
		return err
	}
	if _, err := cfg.failurePolicy(); err != nil {
		return err
	}
	if cfg.LocalShare != 0 && !(cfg.LocalShare > 0 && cfg.LocalShare <= 1) {
		return fmt.Errorf("server: local_share must be greater than 0 and at most 1, got %v", cfg.LocalShare)
	}
	if cfg.StoreTimeout != 0 && (cfg.StoreTimeout < time.Millisecond || cfg.StoreTimeout > maxStoreTimeout) {
		return fmt.Errorf("server: store_timeout must be from 1ms to %v, got %v", maxStoreTimeout, cfg.StoreTimeout)
	}
	if cfg.RedisGroups < 0 || int64(cfg.RedisGroups) > maxRedisGroups {
		return fmt.Errorf("server: redis_groups must be from 1 to %d (0 for the default), got %d", maxRedisGroups, cfg.RedisGroups)
	}
	if err := cfg.checkLeases(); err != nil {
		return err
	}
	if _, err := cfg.authFailureLimit(); err != nil {
		return err
	}
	if cfg.MaxMessageBytes < 0 {
		return fmt.Errorf("server: max_message_bytes must not be negative, got %d", cfg.MaxMessageBytes)
	}
	for field, d := range map[string]*time.Duration{"read_timeout": cfg.ReadTimeout, "idle_timeout": cfg.IdleTimeout} {
		if d != nil && *d < 0 {
			return fmt.Errorf("server: %s must not be negative, got %v", field, *d)
		}
	}
	for name := range cfg.Buckets {
		if strings.HasPrefix(name, reservedBucketPrefix) {
			return fmt.Errorf("server: bucket name %q starts with %q, which the server keeps for its own buckets", name, reservedBucketPrefix)
		}
	}
	if _, err := cfg.trustedProxies(); err != nil {
		return err
	}
	if err := cfg.CORS.validate(); err != nil {
		return err
	}
	names := map[string]string{} // key name → user of the first key with it
	for _, key := range slices.Sorted(maps.Keys(cfg.APIKeys)) {
		owner := cfg.APIKeys[key]
		if key == "" || strings.ContainsFunc(key, func(r rune) bool { return r <= ' ' || r > '~' }) {
			// Never echo the key: it is a secret.
			return fmt.Errorf("server: api_keys: a key of %d bytes is empty or has spaces or non-ASCII bytes", len(key))
		}
		if _, declared := cfg.Tiers[owner.Tier]; owner.Tier != "" && !declared {
			return fmt.Errorf("server: api_keys: the key of user %q has tier %q, which is not declared under tiers:", owner.User, owner.Tier)
		}
		name := keyName(key, owner)
		if other, dup := names[name]; dup {
			return fmt.Errorf("server: api_keys: two keys (of users %q and %q) have the name %q, so they would share buckets; give each key its own name", other, owner.User, name)
		}
		names[name] = owner.User
	}
	return nil
}

// checkLeases checks that every concurrency lease outlives ten store
// timeouts, so that a lease is never lost between two renewals (every
// third of the lease) to a slow store.
func (cfg Config) checkLeases() error {
	timeout := cfg.storeTimeout()
	check := func(field string, lease time.Duration) error {
		if lease != 0 && lease < 10*timeout {
			return fmt.Errorf("server: %s.lease is %v, but must be at least 10 × store_timeout (%v)", field, lease, 10*timeout)
		}
		return nil
	}
	if timeout*10 > costmap.DefaultLease {
		for _, name := range slices.Sorted(maps.Keys(cfg.Concurrency)) {
			if cfg.Concurrency[name].Lease == 0 {
				return fmt.Errorf("server: concurrency.%s.lease is the default %v, but must be at least 10 × store_timeout (%v): set it", name, costmap.DefaultLease, 10*timeout)
			}
		}
	}
	for _, name := range slices.Sorted(maps.Keys(cfg.Concurrency)) {
		if err := check("concurrency."+name, cfg.Concurrency[name].Lease); err != nil {
			return err
		}
	}
	for _, tier := range slices.Sorted(maps.Keys(cfg.Tiers)) {
		for _, name := range slices.Sorted(maps.Keys(cfg.Tiers[tier].Concurrency)) {
			if err := check("tiers."+tier+".concurrency."+name, cfg.Tiers[tier].Concurrency[name].Lease); err != nil {
				return err
			}
		}
	}
	return nil
}

func (cfg Config) storeTimeout() time.Duration {
	if cfg.StoreTimeout == 0 {
		return interceptor.DefaultStoreTimeout
	}
	return cfg.StoreTimeout
}

func (cfg Config) failurePolicy() (interceptor.FailurePolicy, error) {
	if cfg.FailurePolicy == "" {
		return interceptor.FailLocal, nil
	}
	p, err := interceptor.ParseFailurePolicy(cfg.FailurePolicy)
	if err != nil {
		return 0, fmt.Errorf("server: failure_policy must be local, open or closed, got %q", cfg.FailurePolicy)
	}
	return p, nil
}

// authFailureLimit returns the failed-authentication bucket's limit, and
// false when the limit is disabled.
func (cfg Config) authFailureLimit() (bucket.Limit, error) {
	af := DefaultAuthFailures
	if cfg.AuthFailures != nil {
		af = *cfg.AuthFailures
	}
	if af.Disabled {
		return bucket.Limit{}, nil
	}
	rate := af.RefillPerSecond
	switch {
	case af.Period != 0 && af.RefillPerSecond != 0:
		return bucket.Limit{}, fmt.Errorf("server: auth_failures sets both refill_per_second (%v) and period (%v); set one", af.RefillPerSecond, af.Period)
	case af.Period < 0:
		return bucket.Limit{}, fmt.Errorf("server: auth_failures.period must be greater than 0, got %v", af.Period)
	case af.Period > 0:
		rate = af.Capacity / af.Period.Seconds()
	}
	l, err := bucket.NewLimit(af.Capacity, rate)
	if err != nil {
		return bucket.Limit{}, fmt.Errorf("server: auth_failures.%s", strings.TrimPrefix(err.Error(), "bucket: "))
	}
	return l, nil
}

func (cfg Config) maxMessageBytes() int {
	if cfg.MaxMessageBytes == 0 {
		return DefaultMaxMessageBytes
	}
	return cfg.MaxMessageBytes
}

func durationOr(d *time.Duration, def time.Duration) time.Duration {
	if d == nil {
		return def
	}
	return *d
}

func (cfg Config) trustedProxies() ([]netip.Prefix, error) {
	prefixes := make([]netip.Prefix, 0, len(cfg.TrustedProxies))
	for i, s := range cfg.TrustedProxies {
		if p, err := netip.ParsePrefix(s); err == nil {
			prefixes = append(prefixes, p.Masked())
			continue
		}
		a, err := netip.ParseAddr(s)
		if err != nil {
			return nil, fmt.Errorf("server: trusted_proxies[%d] must be an IP address or CIDR prefix, got %q", i, s)
		}
		prefixes = append(prefixes, netip.PrefixFrom(a, a.BitLen()))
	}
	return prefixes, nil
}

// keyDigest is how API keys are looked up, so the lookup does not compare
// secrets byte by byte.
type keyDigest [sha256.Size]byte

func (cfg Config) apiKeys() map[keyDigest]interceptor.Identity {
	keys := make(map[keyDigest]interceptor.Identity, len(cfg.APIKeys))
	for key, owner := range cfg.APIKeys {
		keys[keyDigest(sha256.Sum256([]byte(key)))] = interceptor.Identity{APIKey: keyName(key, owner), User: owner.User, Tier: owner.Tier}
	}
	return keys
}

// keyName is how a key shows in subjects: its name, or a prefix of its
// SHA-256, never the secret.
func keyName(key string, owner APIKey) string {
	if owner.Name != "" {
		return owner.Name
	}
	digest := sha256.Sum256([]byte(key))
	return "sha256:" + hex.EncodeToString(digest[:6])
}

// validate checks that every allowed origin is "*" or a bare origin: an
// http or https scheme and a host, with no path, query or trailing slash,
// since browsers send exactly that in Origin and a near miss would never
// match.
func (c CORS) validate() error {
	for i, o := range c.AllowedOrigins {
		if o == "*" {
			continue
		}
		u, err := url.Parse(o)
		if err != nil || (u.Scheme != "http" && u.Scheme != "https") || u.Host == "" || u.Path != "" || u.RawQuery != "" || u.Fragment != "" || u.User != nil {
			return fmt.Errorf("server: cors.allowed_origins[%d] must be \"*\" or an origin like \"https://app.example.com\" (scheme and host, no path), got %q", i, o)
		}
	}
	if c.MaxAge < 0 {
		return fmt.Errorf("server: cors.max_age must not be negative, got %v", c.MaxAge)
	}
	return nil
}
