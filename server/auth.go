package server

import (
	"context"
	"crypto/sha256"
	"errors"
	"strconv"
	"strings"
	"sync"
	"time"

	"connectrpc.com/authn"
	"connectrpc.com/connect"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/protobuf/types/known/durationpb"

	"github.com/connectlimit/connectlimit/bucket"
	"github.com/connectlimit/connectlimit/interceptor"
)

// maxBlocked bounds how many client IPs the server remembers as over their
// failed-authentication limit.
const maxBlocked = 100_000

// authenticate turns "Authorization: Bearer <key>" (the scheme in any case)
// into an identity. No header means an anonymous caller; a header that is
// not a known key is an error, so a typo in a key never silently becomes
// anonymous access. Failures are limited per client IP: past the limit, the
// IP's calls are refused with CodeResourceExhausted before their key is
// looked at, so a key cannot be guessed by trying many.
func (s *Server) authenticate(ctx context.Context, r authn.Request) (any, error) {
	h := r.Header().Get("Authorization")
	if h == "" {
		return nil, nil //nolint:nilnil // anonymous
	}
	// IPv6 clients are counted per /64, as the interceptor does.
	subject := interceptor.Identity{IP: interceptor.ClientIP(r.ClientAddr(), r.Header(), s.proxies)}.Subject()
	if until, ok := s.blocked.get(subject, time.Now()); ok {
		return nil, authLimitError(time.Until(until))
	}
	scheme, token, _ := strings.Cut(strings.TrimSpace(h), " ")
	if !strings.EqualFold(scheme, "Bearer") {
		return nil, s.authFailed(ctx, subject, authn.Errorf("Authorization must be \"Bearer <api key>\""))
	}
	id, ok := s.keys[sha256.Sum256([]byte(strings.TrimSpace(token)))]
	if !ok {
		return nil, s.authFailed(ctx, subject, authn.Errorf("unknown API key"))
	}
	return id, nil
}

// authFailed charges a failed authentication to the client IP's bucket and
// returns the error to send: fail, or a denial once the bucket is empty. A
// store that cannot decide does not block authentication: the call is
// refused as unauthenticated either way.
func (s *Server) authFailed(ctx context.Context, subject string, fail error) error {
	if s.authLimit == (bucket.Limit{}) {
		return fail
	}
	tctx, cancel := context.WithTimeout(ctx, s.cfg.storeTimeout()+interceptor.StoreQueueWait)
	defer cancel()
	// Through the interceptor's circuit breaker: a dead store costs
	// nothing here either.
	d, err := s.interceptor.Store().Take(tctx, bucket.Request{Subject: subject, Charges: []bucket.Charge{{Bucket: authFailureBucket, Limit: s.authLimit, Cost: 1}}})
	if err != nil {
		s.opts.logger.WarnContext(ctx, "server: cannot count a failed authentication", "subject", subject, "error", err)
		return fail
	}
	if d.Allowed {
		return fail
	}
	s.blocked.put(subject, time.Now().Add(d.RetryAfter))
	s.opts.logger.WarnContext(ctx, "server: too many failed authentications; refusing this address for a while", "subject", subject, "retry_after", d.RetryAfter)
	return authLimitError(d.RetryAfter)
}

// authLimitError is the error for a client IP over its failed
// authentication limit.
func authLimitError(wait time.Duration) *connect.Error {
	wait = max(wait, time.Millisecond)
	err := connect.NewError(connect.CodeResourceExhausted,
		errors.New("connectlimit: too many failed authentications from this address: retry in "+wait.Round(time.Second).String()))
	if detail, e := connect.NewErrorDetail(&errdetails.RetryInfo{RetryDelay: durationpb.New(wait)}); e == nil {
		err.AddDetail(detail)
	}
	secs := int64((wait + time.Second - 1) / time.Second)
	err.Meta().Set(interceptor.HeaderRetryAfter, strconv.FormatInt(secs, 10))
	return err
}

// blockList remembers, in this process, the client addresses over their
// failed-authentication limit until they may try again, so their calls are
// refused without asking the store. It holds at most max entries; when
// full, expired entries are dropped, then the one that expires first.
type blockList struct {
	max      int
	mu       sync.Mutex
	subjects map[string]time.Time
}

func newBlockList(max int) *blockList {
	return &blockList{max: max, subjects: map[string]time.Time{}}
}

func (b *blockList) get(subject string, now time.Time) (time.Time, bool) {
	b.mu.Lock()
	defer b.mu.Unlock()
	until, ok := b.subjects[subject]
	if ok && !now.Before(until) {
		delete(b.subjects, subject)
		return time.Time{}, false
	}
	return until, ok
}

func (b *blockList) put(subject string, until time.Time) {
	b.mu.Lock()
	defer b.mu.Unlock()
	if _, ok := b.subjects[subject]; !ok && len(b.subjects) >= b.max {
		now := time.Now()
		var first string
		var firstUntil time.Time
		for k, u := range b.subjects {
			if !now.Before(u) {
				delete(b.subjects, k)
				continue
			}
			if firstUntil.IsZero() || u.Before(firstUntil) {
				first, firstUntil = k, u
			}
		}
		if len(b.subjects) >= b.max {
			delete(b.subjects, first)
		}
	}
	b.subjects[subject] = until
}
