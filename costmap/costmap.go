// Package costmap maps each Connect procedure to the token buckets it draws
// from and what one call costs, from the connectlimit.v1.limit method option
// and a configuration file that declares the buckets.
//
// A procedure's rule comes from, in order: the configuration's procedures
// section, the method's connectlimit.v1.limit annotation, the configuration's
// default_bucket. A procedure with none of these is not limited.
package costmap

import (
	"fmt"
	"strings"
	"sync"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/reflect/protoreflect"

	"github.com/connectlimit/connectlimit/bucket"
	connectlimitv1 "github.com/connectlimit/connectlimit/proto/connectlimit/v1"
)

// Rule is what one call to a procedure costs.
type Rule struct {
	// Procedure is the procedure's name, "/package.Service/Method".
	Procedure string
	// Charges are the buckets a call takes from, with their limits and
	// costs. They are shared: callers must not modify them.
	Charges []bucket.Charge
}

// Map resolves procedures to [Rule]s. It is immutable once built and safe
// for concurrent use.
type Map struct {
	cfg    Config
	limits map[string]bucket.Limit
	// rules caches resolved procedures: *Rule, or nil for unlimited ones.
	// Procedures of services passed to New are resolved up front; others
	// on first use from their method descriptor.
	rules sync.Map
}

// New builds a Map from a configuration and the services whose procedures
// it will be asked about. Every method of those services is resolved now, so
// an annotation naming an undeclared bucket, or a cost above its bucket's
// capacity, fails here with an error naming the procedure, instead of on the
// first call. Procedures of other services are resolved on first use by
// [Map.Lookup].
func New(cfg Config, services ...protoreflect.ServiceDescriptor) (*Map, error) {
	if err := cfg.Validate(); err != nil {
		return nil, err
	}
	m := &Map{cfg: cfg, limits: make(map[string]bucket.Limit, len(cfg.Buckets))}
	for name, bc := range cfg.Buckets {
		m.limits[name], _ = bc.limit() // Validate checked every limit.
	}
	for proc, pc := range cfg.Procedures {
		m.rules.Store(proc, m.rule(proc, pc.Bucket, pc.Cost))
	}
	for _, sd := range services {
		methods := sd.Methods()
		for i := range methods.Len() {
			if _, err := m.Lookup(methods.Get(i)); err != nil {
				return nil, err
			}
		}
	}
	return m, nil
}

// Procedure returns the Connect procedure name of a method,
// "/package.Service/Method".
func Procedure(md protoreflect.MethodDescriptor) string {
	return "/" + string(md.Parent().FullName()) + "/" + string(md.Name())
}

// Lookup returns the rule for a method, or nil if calls to it are not
// limited. It fails only if the method's annotation is invalid for this
// configuration (an undeclared bucket, a bad cost), naming the procedure.
func (m *Map) Lookup(md protoreflect.MethodDescriptor) (*Rule, error) {
	proc := Procedure(md)
	if r, ok := m.rules.Load(proc); ok {
		return r.(*Rule), nil //nolint:forcetypeassert // only *Rule is stored
	}
	r, err := m.resolve(proc, md)
	if err != nil {
		return nil, err
	}
	actual, _ := m.rules.LoadOrStore(proc, r)
	return actual.(*Rule), nil //nolint:forcetypeassert // only *Rule is stored
}

// LookupProcedure returns the rule for a procedure named
// "/package.Service/Method" when no descriptor is at hand. It knows only
// the procedures set in the configuration, those already resolved, and the
// default; it returns nil if the procedure is not limited by any of them.
func (m *Map) LookupProcedure(procedure string) *Rule {
	if r, ok := m.rules.Load(procedure); ok {
		return r.(*Rule) //nolint:forcetypeassert // only *Rule is stored
	}
	return m.defaultRule(procedure)
}

// Limit returns the limit of a declared bucket.
func (m *Map) Limit(bucketName string) (bucket.Limit, bool) {
	l, ok := m.limits[bucketName]
	return l, ok
}

func (m *Map) resolve(proc string, md protoreflect.MethodDescriptor) (*Rule, error) {
	opts := md.Options()
	if opts == nil || !proto.HasExtension(opts, connectlimitv1.E_Limit) {
		return m.defaultRule(proc), nil
	}
	ann, ok := proto.GetExtension(opts, connectlimitv1.E_Limit).(*connectlimitv1.Limit)
	if !ok || ann == nil {
		return m.defaultRule(proc), nil
	}
	cost := 1.0
	if ann.Cost != nil {
		cost = ann.GetCost()
		if err := costError("(connectlimit.v1.limit).cost", cost); err != nil {
			return nil, procedureError(proc, err)
		}
	}
	if err := m.cfg.checkCharge("(connectlimit.v1.limit).bucket", ann.GetBucket(), "(connectlimit.v1.limit).cost", cost); err != nil {
		return nil, procedureError(proc, err)
	}
	return m.rule(proc, ann.GetBucket(), cost), nil
}

func procedureError(proc string, err error) error {
	return fmt.Errorf("costmap: procedure %s: %s", proc, strings.TrimPrefix(err.Error(), "costmap: "))
}

func (m *Map) defaultRule(proc string) *Rule {
	if m.cfg.DefaultBucket == "" {
		return nil
	}
	return m.rule(proc, m.cfg.DefaultBucket, m.cfg.DefaultCost)
}

// rule builds a one-bucket rule; cost 0 means 1. The bucket and cost were
// validated by the caller.
func (m *Map) rule(proc, bucketName string, cost float64) *Rule {
	if cost == 0 {
		cost = 1
	}
	return &Rule{
		Procedure: proc,
		Charges:   []bucket.Charge{{Bucket: bucketName, Limit: m.limits[bucketName], Cost: cost}},
	}
}
