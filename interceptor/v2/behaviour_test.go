package interceptor_test

import (
	"bytes"
	"context"
	"encoding/binary"
	"errors"
	"io"
	"net/http"
	"slices"
	"strconv"
	"strings"
	"sync"
	"testing"
	"time"

	connectv1 "connectrpc.com/connect"
	"connectrpc.com/connect/v2"
	"connectrpc.com/connect/v2/connecthttp"
	"github.com/redis/go-redis/v9"
	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/connectlimit/connectlimit/bucket/memstore"
	"github.com/connectlimit/connectlimit/bucket/redisstore"
	"github.com/connectlimit/connectlimit/costmap"
	connectlimitv2connect "github.com/connectlimit/connectlimit/interceptor/v2/gen/connectlimit/v1/connectlimitv1connect"
	"github.com/connectlimit/connectlimit/internal/redistest"
	"github.com/connectlimit/connectlimit/limiter"
	connectlimitv1 "github.com/connectlimit/connectlimit/proto/connectlimit/v1"
)

// behaviours is the one table of what both adapters must do alike: each
// case runs against the test service on connect-go v1 (package interceptor)
// and on connect-go v2 (this module), through real HTTP clients.
var behaviours = []struct {
	name string
	run  func(t *testing.T, m major)
}{
	{"an allowed call carries RateLimit headers", allowedCall},
	{"a denial has RetryInfo, QuotaFailure and the fields", denial},
	{"a unary denial's fields are response headers", denialHeaderPlacement},
	{"a cost over capacity is denied without RetryInfo", overCapacity},
	{"a concurrency limit", concurrencyLimit},
	{"a server stream reserves and settles exactly", streamReserveAndSettle},
	{"a server stream is cut when its bucket cannot pay", streamCut},
	{"a client stream charges every message", clientStream},
	{"a bidi stream charges every message", bidiStream},
	{"a bidi stream's Receive and Send run at once", duplexStream},
	{"ReportUsage and actual usage settle a unary call", reportUsage},
	{"GetQuota through the quota service", getQuota},
	{"failure policies with the store down", storeDown},
}

func TestBehaviour(t *testing.T) {
	t.Parallel()
	for _, tc := range behaviours {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			for _, m := range majors {
				t.Run(m.name, func(t *testing.T) {
					t.Parallel()
					tc.run(t, m)
				})
			}
		})
	}
}

// protocols are the client options for each protocol a Connect server
// speaks.
var protocols = []struct {
	name string
	opts []connectv1.ClientOption
}{
	{"connect", nil},
	{"grpc", []connectv1.ClientOption{connectv1.WithGRPC()}},
	{"grpcweb", []connectv1.ClientOption{connectv1.WithGRPCWeb()}},
}

// details returns the RetryInfo and QuotaFailure of a resource_exhausted
// error, failing the test for any other error.
func details(t *testing.T, err error) (*connectv1.Error, *errdetails.RetryInfo, *errdetails.QuotaFailure) {
	t.Helper()
	var ce *connectv1.Error
	if !errors.As(err, &ce) || ce.Code() != connectv1.CodeResourceExhausted {
		t.Fatalf("err = %v, want resource_exhausted", err)
	}
	var ri *errdetails.RetryInfo
	var qf *errdetails.QuotaFailure
	for _, d := range ce.Details() {
		v, derr := d.Value()
		if derr != nil {
			t.Fatalf("decoding detail %s: %v", d.Type(), derr)
		}
		switch v := v.(type) {
		case *errdetails.RetryInfo:
			ri = v
		case *errdetails.QuotaFailure:
			qf = v
		}
	}
	return ce, ri, qf
}

func allowedCall(t *testing.T, m major) {
	tg := m.start(t, setup{})
	for _, p := range protocols {
		for i, want := range []string{`"search";r=2;t=1`, `"search";r=1;t=2`, `"search";r=0;t=3`} {
			res, err := tg.search(t.Context(), p.name, p.opts...)
			if err != nil {
				t.Fatalf("%s: call %d: %v", p.name, i, err)
			}
			h := res.Header()
			if got := h.Get("RateLimit-Policy"); got != `"search";q=3;w=3` {
				t.Errorf("%s: call %d: RateLimit-Policy = %q", p.name, i, got)
			}
			if got := h.Get("RateLimit"); got != want {
				t.Errorf("%s: call %d: RateLimit = %q, want %q", p.name, i, got, want)
			}
			// Under 10% of the capacity (0.3 tokens), the bucket is low.
			if got, wantWarn := h.Get("Connectlimit-Warning"), i == 2; (got != "") != wantWarn || wantWarn && got != `"search";r=0;q=3` {
				t.Errorf("%s: call %d: Connectlimit-Warning = %q", p.name, i, got)
			}
		}
	}
}

func denial(t *testing.T, m major) {
	tg := m.start(t, setup{})
	for _, p := range protocols {
		for range 3 {
			if _, err := tg.search(t.Context(), p.name, p.opts...); err != nil {
				t.Fatal(err)
			}
		}
		_, err := tg.search(t.Context(), p.name, p.opts...)
		ce, ri, qf := details(t, err)
		if got, want := ce.Message(), `connectlimit: rate limit exceeded for bucket "search": retry in 1s`; got != want {
			t.Errorf("%s: message %q, want %q", p.name, got, want)
		}
		if ri == nil || ri.GetRetryDelay().AsDuration() != time.Second {
			t.Errorf("%s: RetryInfo = %v, want 1s", p.name, ri)
		}
		if v := qf.GetViolations(); len(v) != 1 || v[0].GetSubject() != "user:"+p.name || v[0].GetQuotaId() != "search" {
			t.Errorf("%s: QuotaFailure = %v, want one violation of user:%s, search", p.name, qf, p.name)
		}
		for name, want := range map[string]string{
			"Retry-After":      "1",
			"RateLimit":        `"search";r=0;t=3`,
			"RateLimit-Policy": `"search";q=3;w=3`,
		} {
			if got := ce.Meta().Get(name); got != want {
				t.Errorf("%s: %s = %q, want %q", p.name, name, got, want)
			}
		}
		// A denial changes no bucket.
		if got := tg.levels(t, "user:"+p.name, "search")["search"]; !near(got, 0) {
			t.Errorf("%s: search holds %v after the denial, want 0", p.name, got)
		}
	}
}

// denialHeaderPlacement sends raw HTTP requests, to see where each
// protocol carries the fields of a unary denial: in the response headers,
// where HTTP clients and proxies look, for gRPC too.
func denialHeaderPlacement(t *testing.T, m major) {
	tg := m.start(t, setup{})
	body, err := proto.Marshal(wrapperspb.String("q"))
	if err != nil {
		t.Fatal(err)
	}
	framed := binary.BigEndian.AppendUint32([]byte{0}, uint32(len(body)))
	framed = append(framed, body...)
	for _, tc := range []struct {
		protocol, contentType string
		body                  []byte
		wantStatus            int
	}{
		{"connect", "application/proto", body, http.StatusTooManyRequests},
		{"grpc", "application/grpc", framed, http.StatusOK},
		{"grpcweb", "application/grpc-web+proto", framed, http.StatusOK},
	} {
		user := "raw-" + tc.protocol
		for range 3 {
			if _, err := tg.search(t.Context(), user); err != nil {
				t.Fatal(err)
			}
		}
		req, err := http.NewRequestWithContext(t.Context(), http.MethodPost, tg.url+searchProc, bytes.NewReader(tc.body))
		if err != nil {
			t.Fatal(err)
		}
		req.Header.Set("Content-Type", tc.contentType)
		req.Header.Set(userHeader, user)
		if tc.protocol == "grpc" {
			req.Header.Set("Te", "trailers")
		}
		res, err := tg.http.Do(req)
		if err != nil {
			t.Fatal(err)
		}
		_, _ = io.Copy(io.Discard, res.Body)
		_ = res.Body.Close()
		if res.StatusCode != tc.wantStatus {
			t.Errorf("%s: status %d, want %d", tc.protocol, res.StatusCode, tc.wantStatus)
		}
		for _, name := range []string{"Retry-After", "RateLimit", "RateLimit-Policy"} {
			if res.Header.Get(name) == "" {
				t.Errorf("%s: no %s in the response headers (headers %v, trailers %v)", tc.protocol, name, res.Header, res.Trailer)
			}
		}
		if tc.protocol == "grpc" {
			if got := res.Trailer.Get("Grpc-Status"); got != "8" {
				t.Errorf("grpc: grpc-status %q, want 8 (resource_exhausted)", got)
			}
			if got := res.Trailer.Get("RateLimit"); got != "" {
				t.Errorf("grpc: RateLimit %q in trailers too", got)
			}
		}
	}
}

func overCapacity(t *testing.T, m major) {
	tg := m.start(t, setup{})
	_, err := tg.ask(t.Context(), "use=1", 5000, "")
	ce, ri, qf := details(t, err)
	if !strings.Contains(ce.Message(), "can never be allowed") {
		t.Errorf("message %q does not say the call can never be allowed", ce.Message())
	}
	if ri != nil || ce.Meta().Get("Retry-After") != "" {
		t.Errorf("RetryInfo %v, Retry-After %q on a denial no wait can cure", ri, ce.Meta().Get("Retry-After"))
	}
	if v := qf.GetViolations(); len(v) != 1 || v[0].GetQuotaId() != "tokens" {
		t.Errorf("QuotaFailure = %v, want one violation for tokens", qf)
	}
	if got := tg.levels(t, "ip:127.0.0.1", "requests", "tokens"); !near(got["requests"], 1000) || !near(got["tokens"], 1000) {
		t.Errorf("levels %v after a denial, want both full", got)
	}
}

func concurrencyLimit(t *testing.T, m major) {
	tg := m.start(t, setup{})
	ctx, cancel := context.WithCancel(t.Context())
	defer cancel()
	holding, err := tg.msgClient(reportProc).CallServerStream(ctx, tg.request("hold", 10, ""))
	if err != nil {
		t.Fatal(err)
	}
	defer holding.Close()
	if !holding.Receive() {
		t.Fatalf("holding stream: %v", holding.Err())
	}
	_, _, err = tg.report(t.Context(), "use=4", 10, "")
	_, ri, qf := details(t, err)
	if ri != nil {
		t.Errorf("RetryInfo %v on a concurrency denial", ri)
	}
	if v := qf.GetViolations(); len(v) != 1 || v[0].GetQuotaId() != "streams" || v[0].GetQuotaValue() != 1 {
		t.Errorf("QuotaFailure = %v, want one violation of streams, limit 1", qf)
	}
	// Ending the holding stream frees its slot.
	cancel()
	for holding.Receive() {
	}
	eventually(t, "the slot is released", func() bool {
		_, _, err := tg.report(t.Context(), "use=4", 10, "")
		return err == nil
	})
}

func streamReserveAndSettle(t *testing.T, m major) {
	tg := m.start(t, setup{})
	got, header, err := tg.report(t.Context(), "use=20", 100, "u")
	if err != nil || got != 20 {
		t.Fatalf("received %d tokens, err %v; want 20, nil", got, err)
	}
	// The headers went out with the first message: the reservation.
	if got, want := header.Get("RateLimit"), `"requests";r=999`; !strings.Contains(got, want) || !strings.Contains(got, `"tokens";r=900`) {
		t.Errorf("RateLimit = %q, want the reservation (requests 999, tokens 900)", got)
	}
	eventually(t, "the stream settles", func() bool {
		l := tg.levels(t, "user:u", "requests", "tokens")
		return near(l["requests"], 999) && near(l["tokens"], 980)
	})
	q, err := tg.quota(t.Context(), "u")
	if err != nil {
		t.Fatal(err)
	}
	for _, b := range q.GetBuckets() {
		if b.GetName() == "tokens" && !near(b.GetRemaining(), 980) {
			t.Errorf("GetQuota: tokens %v, want 980", b.GetRemaining())
		}
	}
}

func streamCut(t *testing.T, m major) {
	cfg := testConfig()
	cfg.Buckets["tokens"] = costmap.BucketConfig{Capacity: 30, RefillPerSecond: 1e-9}
	tg := m.start(t, setup{cfg: cfg})
	// 30 tokens, 10 reserved: messages of 4 are paid for up to 28 tokens;
	// the 8th (32) cannot be paid: it is delivered, then the stream ends
	// and the bucket owes 2.
	got, _, err := tg.report(t.Context(), "use=100", 10, "")
	if got != 32 {
		t.Errorf("received %d tokens, want 32", got)
	}
	ce, ri, qf := details(t, err)
	if ri == nil {
		t.Error("no RetryInfo on a stream cut off by its bucket")
	}
	if v := qf.GetViolations(); len(v) != 1 || v[0].GetQuotaId() != "tokens" {
		t.Errorf("QuotaFailure = %v, want one violation for tokens", qf)
	}
	// The headers went out: the fields travel with the error, in trailers
	// (which a client's error metadata merges with the headers, whose
	// RateLimit shows the reservation): the denied charge found 2 tokens.
	if !slices.Contains(ce.Meta().Values("RateLimit"), `"tokens";r=2;t=9223372037`) ||
		ce.Meta().Get("Retry-After") == "" {
		t.Errorf("the cut stream's error has no RateLimit after the cut, or no Retry-After: %v", ce.Meta())
	}
	eventually(t, "the stream settles into debt", func() bool {
		return near(tg.levels(t, "ip:127.0.0.1", "tokens")["tokens"], -2)
	})
}

func clientStream(t *testing.T, m major) {
	tg := m.start(t, setup{})
	stream := tg.msgClient(uploadProc).CallClientStream(t.Context())
	for i := range 5 {
		if err := stream.Send(tg.message("x")); err != nil {
			if !errors.Is(err, io.EOF) {
				t.Fatalf("send %d: %v", i, err)
			}
			break // the server answered: CloseAndReceive says what
		}
	}
	_, err := stream.CloseAndReceive()
	_, _, qf := details(t, err)
	if v := qf.GetViolations(); len(v) != 1 || v[0].GetQuotaId() != "msgs" {
		t.Errorf("QuotaFailure = %v, want one violation for msgs", qf)
	}
	eventually(t, "three messages are charged", func() bool {
		return near(tg.levels(t, "ip:127.0.0.1", "msgs")["msgs"], 0)
	})
}

func bidiStream(t *testing.T, m major) {
	cfg := testConfig()
	cfg.Buckets["tokens"] = costmap.BucketConfig{Capacity: 10, RefillPerSecond: 1e-9}
	tg := m.start(t, setup{cfg: cfg})
	stream := tg.msgClient(chatProc).CallBidiStream(t.Context())
	defer func() { _ = stream.CloseResponse() }()
	for i, topic := range []string{"aaaa", "bbbb"} {
		if err := stream.Send(tg.message(topic)); err != nil {
			t.Fatalf("send %d: %v", i, err)
		}
		res, err := stream.Receive()
		if err != nil {
			t.Fatalf("receive %d: %v", i, err)
		}
		if tokensOf(res) != 4 {
			t.Fatalf("receive %d: %d tokens, want 4", i, tokensOf(res))
		}
	}
	// 8 of 10 taken: a third message of 4 cannot be paid.
	if err := stream.Send(tg.message("cccc")); err != nil && !errors.Is(err, io.EOF) {
		t.Fatal(err)
	}
	_, err := stream.Receive()
	_, _, qf := details(t, err)
	if v := qf.GetViolations(); len(v) != 1 || v[0].GetQuotaId() != "tokens" {
		t.Errorf("QuotaFailure = %v, want one violation for tokens", qf)
	}
	eventually(t, "two messages are charged", func() bool {
		return near(tg.levels(t, "ip:127.0.0.1", "tokens")["tokens"], 2)
	})
}

// duplexStream sends and receives on a bidi stream from two goroutines at
// once, as Connect allows, at both ends: under -race, the stream wrappers
// must not share unguarded state between Receive and Send.
func duplexStream(t *testing.T, m major) {
	tg := m.start(t, setup{})
	stream := tg.msgClient(duplexProc).CallBidiStream(t.Context())
	const messages = 50
	var wg sync.WaitGroup
	wg.Go(func() {
		for i := range messages {
			if err := stream.Send(tg.message(strconv.Itoa(i % 10))); err != nil {
				t.Errorf("send %d: %v", i, err)
				return
			}
		}
		_ = stream.CloseRequest()
	})
	received := 0
	for {
		if _, err := stream.Receive(); err != nil {
			if !errors.Is(err, io.EOF) {
				t.Fatalf("receive: %v", err)
			}
			break
		}
		received++
	}
	wg.Wait()
	_ = stream.CloseResponse()
	if received != messages {
		t.Fatalf("%d messages echoed, want %d", received, messages)
	}
	if got := tg.levels(t, "ip:127.0.0.1", "tokens")["tokens"]; !near(got, 1000-messages) {
		t.Errorf("tokens %v, want %d: one per message", got, 1000-messages)
	}
}

func reportUsage(t *testing.T, m major) {
	tg := m.start(t, setup{})
	for _, tc := range []struct {
		topic      string
		wantTokens string
		wantLevel  float64
	}{
		// Reserves 100, reports 7: settled to 7, and the headers say so.
		{"report=7", `"tokens";r=993`, 993},
		// Reserves 100, the response's usage says 30.
		{"use=30", `"tokens";r=963`, 963},
	} {
		res, err := tg.ask(t.Context(), tc.topic, 100, "u")
		if err != nil {
			t.Fatalf("%s: %v", tc.topic, err)
		}
		if got := res.Header().Get("RateLimit"); !strings.Contains(got, tc.wantTokens) {
			t.Errorf("%s: RateLimit = %q, want the settled %s", tc.topic, got, tc.wantTokens)
		}
		if got := tg.levels(t, "user:u", "tokens")["tokens"]; !near(got, tc.wantLevel) {
			t.Errorf("%s: tokens %v, want %v", tc.topic, got, tc.wantLevel)
		}
	}
}

func getQuota(t *testing.T, m major) {
	tg := m.start(t, setup{})
	if _, err := tg.search(t.Context(), "q"); err != nil {
		t.Fatal(err)
	}
	viaV1, err := tg.quota(t.Context(), "q")
	if err != nil {
		t.Fatal(err)
	}
	// The same through a connect-go v2 client and this module's stubs.
	ctx, info := connect.NewClientContext(t.Context())
	info.RequestHeader().Set(userHeader, "q")
	client := connectlimitv2connect.NewQuotaServiceClient(connect.NewClient(connecthttp.NewTransport(tg.http, tg.url)))
	viaV2, err := client.GetQuota(ctx, &connectlimitv1.GetQuotaRequest{Cost: proto.Float64(2)})
	if err != nil {
		t.Fatal(err)
	}
	if viaV1.GetSubject() != "user:q" || viaV2.GetSubject() != "user:q" || len(viaV1.GetBuckets()) != 4 {
		t.Fatalf("GetQuota: %v and %v", viaV1, viaV2)
	}
	for i, b := range viaV1.GetBuckets() {
		want := b.GetCapacity()
		if b.GetName() == "search" {
			want = 2
		}
		if !near(b.GetRemaining(), want) || !near(viaV2.GetBuckets()[i].GetRemaining(), want) {
			t.Errorf("bucket %s: remaining %v and %v, want %v", b.GetName(), b.GetRemaining(), viaV2.GetBuckets()[i].GetRemaining(), want)
		}
	}
	if c := viaV1.GetConcurrency(); len(c) != 1 || c[0].GetName() != "streams" || c[0].GetLimit() != 1 {
		t.Errorf("concurrency %v, want streams: 1", c)
	}
	// search has 2 tokens: a cost of 2 needs no wait.
	for _, b := range viaV2.GetBuckets() {
		if b.GetName() == "search" && b.GetRetryAfter().AsDuration() != 0 {
			t.Errorf("search: retry after %v for a cost of 2, want 0", b.GetRetryAfter().AsDuration())
		}
	}
	// GetQuota charges nothing.
	if got := tg.levels(t, "user:q", "search")["search"]; !near(got, 2) {
		t.Errorf("search holds %v after GetQuota, want 2", got)
	}
}

func storeDown(t *testing.T, m major) {
	rs := redistest.Start(t)
	if err := rs.Kill(); err != nil {
		t.Fatal(err)
	}
	for _, tc := range []struct {
		name     string
		policy   limiter.FailurePolicy
		wantCode connectv1.Code // 0: allowed
		counted  func(limiter.Stats) uint64
	}{
		{"closed", limiter.FailClosed, connectv1.CodeUnavailable, func(s limiter.Stats) uint64 { return s.RejectedUnavailable }},
		{"open", limiter.FailOpen, 0, func(s limiter.Stats) uint64 { return s.AllowedWithoutStore }},
		{"local", limiter.FailLocal, 0, func(s limiter.Stats) uint64 { return s.LocalDecisions }},
	} {
		client := rs.NewClient(t, func(o *redis.Options) {
			o.ContextTimeoutEnabled, o.MaxRetries, o.DialerRetries = true, -1, 1
		})
		s := setup{store: redisstore.New(client, redisstore.WithTimeout(time.Second)), policy: tc.policy, timeout: time.Second}
		if tc.policy == limiter.FailLocal {
			local := memstore.New()
			t.Cleanup(func() { _ = local.Close() })
			s.local = local
		}
		tg := m.start(t, s)
		res, err := tg.search(t.Context(), "")
		if got := connectv1.CodeOf(err); err != nil && got != tc.wantCode || err == nil && tc.wantCode != 0 {
			t.Errorf("%s: err %v, want code %v", tc.name, err, tc.wantCode)
		}
		if err != nil && connectv1.CodeOf(err) == connectv1.CodeResourceExhausted {
			t.Errorf("%s: a store failure reported as a denial", tc.name)
		}
		if tc.policy == limiter.FailLocal && err == nil && res.Header().Get("RateLimit") == "" {
			t.Errorf("local: no RateLimit header on a local decision")
		}
		if n := tc.counted(tg.lim.Stats()); n == 0 {
			t.Errorf("%s: the policy's counter is 0: %+v", tc.name, tg.lim.Stats())
		}
	}
}
