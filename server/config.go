package server

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"net/netip"
	"os"
	"strings"
	"time"

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
//	failure_policy: open            # optional: open (default) or closed
//	store_timeout: 100ms            # optional
//
// The bucket fields are those of [costmap.Config].
type Config struct {
	costmap.Config `yaml:",inline"`
	// APIKeys maps each accepted API key, sent as "Authorization: Bearer
	// <key>", to who owns it. A call with an unknown key is rejected with
	// CodeUnauthenticated; a call without the header is anonymous and
	// limited by client IP.
	APIKeys map[string]APIKey `yaml:"api_keys"`
	// TrustedProxies lists the addresses or CIDR prefixes of reverse proxies
	// whose X-Forwarded-For header is believed. Empty by default.
	TrustedProxies []string `yaml:"trusted_proxies"`
	// FailurePolicy is "open" (the default) or "closed"; see
	// [interceptor.FailurePolicy].
	FailurePolicy string `yaml:"failure_policy"`
	// StoreTimeout bounds each store call; zero means
	// [interceptor.DefaultStoreTimeout].
	StoreTimeout time.Duration `yaml:"store_timeout"`
}

// APIKey describes the owner of an API key.
type APIKey struct {
	// User is the user the key belongs to.
	User string `yaml:"user"`
	// Name identifies the key in buckets, logs and QuotaFailure details.
	// It defaults to "sha256:" and the first 12 hex digits of the key's
	// SHA-256, so the secret itself is never stored or echoed.
	Name string `yaml:"name"`
	// Tier is the key's tier, one of the configuration's tiers. Empty
	// means the configuration's default_tier.
	Tier string `yaml:"tier"`
}

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

// Validate reports the first problem in cfg.
func (cfg Config) Validate() error {
	if err := cfg.Config.Validate(); err != nil {
		return err
	}
	if _, err := cfg.failurePolicy(); err != nil {
		return err
	}
	if cfg.StoreTimeout < 0 {
		return fmt.Errorf("server: store_timeout must not be negative, got %v", cfg.StoreTimeout)
	}
	if _, err := cfg.trustedProxies(); err != nil {
		return err
	}
	for key, owner := range cfg.APIKeys {
		if key == "" || strings.ContainsFunc(key, func(r rune) bool { return r <= ' ' || r > '~' }) {
			// Never echo the key: it is a secret.
			return fmt.Errorf("server: api_keys: a key of %d bytes is empty or has spaces or non-ASCII bytes", len(key))
		}
		if _, declared := cfg.Tiers[owner.Tier]; owner.Tier != "" && !declared {
			return fmt.Errorf("server: api_keys: the key of user %q has tier %q, which is not declared under tiers:", owner.User, owner.Tier)
		}
	}
	return nil
}

func (cfg Config) failurePolicy() (interceptor.FailurePolicy, error) {
	switch cfg.FailurePolicy {
	case "", "open":
		return interceptor.FailOpen, nil
	case "closed":
		return interceptor.FailClosed, nil
	default:
		return 0, fmt.Errorf("server: failure_policy must be open or closed, got %q", cfg.FailurePolicy)
	}
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
		digest := keyDigest(sha256.Sum256([]byte(key)))
		name := owner.Name
		if name == "" {
			name = "sha256:" + hex.EncodeToString(digest[:6])
		}
		keys[digest] = interceptor.Identity{APIKey: name, User: owner.User, Tier: owner.Tier}
	}
	return keys
}
