package main

import (
	"crypto/sha256"
	"encoding/hex"
	"fmt"
	"maps"
	"net/netip"
	"os"
	"slices"
	"strings"
	"time"

	"github.com/connectlimit/connectlimit/costmap"
	interceptor "github.com/connectlimit/connectlimit/interceptor/v2"
)

// config is the part of the server package's configuration file that this
// example reads: the limits, the API keys, the store and the HTTP
// server's settings. Other fields of the server package (auth_failures,
// cors) are errors here, naming the field.
type config struct {
	costmap.Config `yaml:",inline"`
	// APIKeys maps each accepted API key, sent as "Authorization: Bearer
	// <key>", to who owns it, as in the server package.
	APIKeys map[string]apiKey `yaml:"api_keys"`
	// TrustedProxies lists the addresses or CIDR prefixes of reverse proxies
	// whose X-Forwarded-For header is believed.
	TrustedProxies []string `yaml:"trusted_proxies"`
	// FailurePolicy is "local" (the default), "open" or "closed".
	FailurePolicy string `yaml:"failure_policy"`
	// LocalShare is the share of every limit this instance keeps under the
	// local policy; zero means the default.
	LocalShare float64 `yaml:"local_share"`
	// StoreTimeout bounds each store round trip; zero means the default.
	StoreTimeout time.Duration `yaml:"store_timeout"`
	// MaxMessageBytes is the largest request message read; zero means 4
	// MiB, connect-go v2's default.
	MaxMessageBytes int `yaml:"max_message_bytes"`
	// ReadTimeout and IdleTimeout are the HTTP server's; unset means 1m
	// and 2m, 0s none.
	ReadTimeout *time.Duration `yaml:"read_timeout"`
	IdleTimeout *time.Duration `yaml:"idle_timeout"`
}

// apiKey describes the owner of an API key.
type apiKey struct {
	User string `yaml:"user"`
	// Name is how the key shows in subjects; it defaults to "sha256:" and
	// the first 12 hex digits of the key's SHA-256, as in the server
	// package, so that both examples charge a key to the same buckets.
	Name string `yaml:"name"`
	Tier string `yaml:"tier"`
}

// loadConfig reads the configuration file at path, or the built-in one
// when path is empty, and checks what the cost map does not.
func loadConfig(path string) (config, error) {
	data := defaultConfig
	if path != "" {
		var err error
		if data, err = os.ReadFile(path); err != nil {
			return config{}, err
		}
	}
	var cfg config
	if err := costmap.DecodeYAML(data, &cfg); err != nil {
		return config{}, err
	}
	if err := cfg.Config.Validate(); err != nil {
		return config{}, err
	}
	if _, err := cfg.failurePolicy(); err != nil {
		return config{}, err
	}
	if _, err := cfg.trustedProxies(); err != nil {
		return config{}, err
	}
	names := map[string]bool{}
	for _, key := range slices.Sorted(maps.Keys(cfg.APIKeys)) {
		owner := cfg.APIKeys[key]
		if _, declared := cfg.Tiers[owner.Tier]; owner.Tier != "" && !declared {
			return config{}, fmt.Errorf("api_keys: the key of user %q has tier %q, which is not declared under tiers:", owner.User, owner.Tier)
		}
		name := keyName(key, owner)
		if names[name] {
			return config{}, fmt.Errorf("api_keys: two keys have the name %q; give each key its own name", name)
		}
		names[name] = true
	}
	return cfg, nil
}

func (cfg config) failurePolicy() (interceptor.FailurePolicy, error) {
	if cfg.FailurePolicy == "" {
		return interceptor.FailLocal, nil
	}
	return interceptor.ParseFailurePolicy(cfg.FailurePolicy)
}

func (cfg config) trustedProxies() ([]netip.Prefix, error) {
	prefixes := make([]netip.Prefix, 0, len(cfg.TrustedProxies))
	for i, s := range cfg.TrustedProxies {
		if p, err := netip.ParsePrefix(s); err == nil {
			prefixes = append(prefixes, p.Masked())
			continue
		}
		a, err := netip.ParseAddr(s)
		if err != nil {
			return nil, fmt.Errorf("trusted_proxies[%d] must be an IP address or CIDR prefix, got %q", i, s)
		}
		prefixes = append(prefixes, netip.PrefixFrom(a, a.BitLen()))
	}
	return prefixes, nil
}

// limiterOptions are the interceptor's options the configuration sets.
func (cfg config) limiterOptions() []interceptor.Option {
	policy, _ := cfg.failurePolicy()   // loadConfig checked it
	proxies, _ := cfg.trustedProxies() // loadConfig checked them
	opts := []interceptor.Option{interceptor.WithFailurePolicy(policy), interceptor.WithTrustedProxies(proxies...)}
	if cfg.LocalShare != 0 {
		opts = append(opts, interceptor.WithLocalShare(cfg.LocalShare))
	}
	if cfg.StoreTimeout != 0 {
		opts = append(opts, interceptor.WithStoreTimeout(cfg.StoreTimeout))
	}
	return opts
}

func (cfg config) storeTimeout() time.Duration {
	if cfg.StoreTimeout == 0 {
		return interceptor.DefaultStoreTimeout
	}
	return cfg.StoreTimeout
}

func durationOr(d *time.Duration, def time.Duration) time.Duration {
	if d == nil {
		return def
	}
	return *d
}

// keyName is how a key shows in subjects: its name, or a prefix of its
// SHA-256, never the secret.
func keyName(key string, owner apiKey) string {
	if owner.Name != "" {
		return owner.Name
	}
	digest := sha256.Sum256([]byte(key))
	return "sha256:" + hex.EncodeToString(digest[:6])
}

// apiKeys returns the identities of the keys by their SHA-256, so that a
// lookup does not compare secrets byte by byte.
func (cfg config) apiKeys() map[[sha256.Size]byte]interceptor.Identity {
	keys := make(map[[sha256.Size]byte]interceptor.Identity, len(cfg.APIKeys))
	for key, owner := range cfg.APIKeys {
		keys[sha256.Sum256([]byte(key))] = interceptor.Identity{APIKey: keyName(key, owner), User: owner.User, Tier: owner.Tier}
	}
	return keys
}

// bearer returns the token of an Authorization header's Bearer scheme
// (any case), and false for another scheme.
func bearer(header string) (string, bool) {
	scheme, token, _ := strings.Cut(strings.TrimSpace(header), " ")
	return strings.TrimSpace(token), strings.EqualFold(scheme, "Bearer")
}
