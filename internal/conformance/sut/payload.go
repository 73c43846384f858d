package sut

import (
	"context"
	"errors"
	"iter"
	"net/url"
	"slices"
	"strings"
	"time"

	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/anypb"

	conformancev1 "github.com/connectlimit/connectlimit/internal/conformance/gen/connectrpc/conformance/v1"
)

// ErrRawResponse is the error for a response definition with raw_response
// set: the suite uses it only with its own reference servers, and a server
// under test may refuse it (service.proto, UnaryResponseDefinition).
var ErrRawResponse = errors.New("raw_response is only for the suite's reference servers")

// Headers converts metadata (an http.Header's or a connect.Header's entries)
// into the suite's Header list, sorted by name so that what a server echoes
// does not depend on map order.
func Headers(all iter.Seq2[string, []string]) []*conformancev1.Header {
	var headers []*conformancev1.Header
	for name, values := range all {
		headers = append(headers, &conformancev1.Header{Name: name, Value: slices.Clone(values)})
	}
	slices.SortFunc(headers, func(a, b *conformancev1.Header) int { return strings.Compare(a.GetName(), b.GetName()) })
	return headers
}

// AddHeaders adds every value of headers, in order, with add (the Add method
// of an http.Header or a connect.Header).
func AddHeaders(headers []*conformancev1.Header, add func(name, value string)) {
	for _, h := range headers {
		for _, v := range h.GetValue() {
			add(h.GetName(), v)
		}
	}
}

// RequestInfo returns what a response echoes about its call: the request
// headers, the timeout left on ctx's deadline (the one the protocol's
// timeout header set), the Connect GET query parameters (nil for other
// requests) and the request messages.
func RequestInfo(ctx context.Context, headers []*conformancev1.Header, query url.Values, requests []*anypb.Any) *conformancev1.ConformancePayload_RequestInfo {
	info := &conformancev1.ConformancePayload_RequestInfo{
		RequestHeaders: headers,
		Requests:       requests,
	}
	if deadline, ok := ctx.Deadline(); ok {
		info.TimeoutMs = proto.Int64(time.Until(deadline).Milliseconds())
	}
	if query != nil {
		info.ConnectGetInfo = &conformancev1.ConformancePayload_ConnectGetInfo{
			QueryParams: Headers(func(yield func(string, []string) bool) {
				for name, values := range query {
					if !yield(name, values) {
						return
					}
				}
			}),
		}
	}
	return info
}

// Any packs a request message to be echoed in a RequestInfo.
func Any(msg proto.Message) (*anypb.Any, error) {
	return anypb.New(msg)
}

// WithRequestInfo returns a copy of spec, a requested error, with info
// appended to its details, as the suite expects of an error raised before
// any response message.
func WithRequestInfo(spec *conformancev1.Error, info *conformancev1.ConformancePayload_RequestInfo) (*conformancev1.Error, error) {
	detail, err := anypb.New(info)
	if err != nil {
		return nil, err
	}
	spec = proto.CloneOf(spec)
	spec.Details = append(spec.Details, detail)
	return spec, nil
}

// Sleep waits for a response definition's delay, in milliseconds, or until
// ctx ends (its deadline, the call's timeout, passed: the server enforces
// it), in which case it returns ctx's error.
func Sleep(ctx context.Context, ms uint32) error {
	if ms == 0 {
		return nil
	}
	timer := time.NewTimer(time.Duration(ms) * time.Millisecond)
	defer timer.Stop()
	select {
	case <-timer.C:
		return nil
	case <-ctx.Done():
		return ctx.Err()
	}
}
