package quota_test

import (
	"net/http"
	"testing"
	"time"

	"google.golang.org/genproto/googleapis/rpc/errdetails"
	"google.golang.org/protobuf/proto"
	"google.golang.org/protobuf/types/known/durationpb"
	"google.golang.org/protobuf/types/known/wrapperspb"

	"github.com/connectlimit/connectlimit/client/quota"
)

func TestDescribeDenial(t *testing.T) {
	t.Parallel()
	violation := func(subject, bucket string) *errdetails.QuotaFailure_Violation {
		return &errdetails.QuotaFailure_Violation{Subject: subject, QuotaId: bucket}
	}
	retry := func(d time.Duration) *errdetails.RetryInfo {
		return &errdetails.RetryInfo{RetryDelay: durationpb.New(d)}
	}
	for _, tc := range []struct {
		name    string
		message string
		details []proto.Message
		meta    quota.Header
		want    quota.Limit
	}{
		{
			name:    "the bucket the message names, and the RetryInfo over Retry-After",
			message: `connectlimit: rate limit exceeded for bucket "tokens": retry in 2s`,
			details: []proto.Message{
				wrapperspb.String("ignored"),
				&errdetails.QuotaFailure{Violations: []*errdetails.QuotaFailure_Violation{violation("ip:10.0.0.1", "requests"), violation("ip:10.0.0.1", "tokens")}},
				retry(1500 * time.Millisecond),
			},
			meta: http.Header{"Retry-After": {"2"}},
			want: quota.Limit{Bucket: "tokens", Subject: "ip:10.0.0.1", RetryAfter: 1500 * time.Millisecond,
				Message: `connectlimit: rate limit exceeded for bucket "tokens": retry in 2s`},
		},
		{
			name:    "no bucket named: the first violation; Retry-After without RetryInfo",
			message: "slow down",
			details: []proto.Message{&errdetails.QuotaFailure{Violations: []*errdetails.QuotaFailure_Violation{violation("key:k", "a"), violation("key:k", "b")}}},
			meta:    http.Header{"Retry-After": {" 3 "}},
			want:    quota.Limit{Bucket: "a", Subject: "key:k", RetryAfter: 3 * time.Second, Message: "slow down"},
		},
		{
			name:    "no wait helps",
			message: `connectlimit: a call costs 200 tokens but bucket "tokens" holds at most 100, so it can never be allowed`,
			details: []proto.Message{&errdetails.QuotaFailure{Violations: []*errdetails.QuotaFailure_Violation{violation("user:u", "tokens")}}},
			want: quota.Limit{Bucket: "tokens", Subject: "user:u",
				Message: `connectlimit: a call costs 200 tokens but bucket "tokens" holds at most 100, so it can never be allowed`},
		},
		{
			name:    "an invalid RetryInfo and Retry-After are ignored",
			details: []proto.Message{retry(-time.Second)},
			meta:    http.Header{"Retry-After": {"soon"}},
			want:    quota.Limit{},
		},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := quota.DescribeDenial(tc.message, tc.details, tc.meta); got != tc.want {
				t.Fatalf("DescribeDenial = %+v, want %+v", got, tc.want)
			}
		})
	}
}

func TestRetryDelay(t *testing.T) {
	t.Parallel()
	for _, tc := range []struct {
		name      string
		details   []proto.Message
		wantDelay time.Duration
		wantOK    bool
	}{
		{"none", nil, 0, false},
		{"first valid one", []proto.Message{
			&errdetails.RetryInfo{RetryDelay: &durationpb.Duration{Seconds: 1, Nanos: -1}},
			&errdetails.RetryInfo{RetryDelay: durationpb.New(time.Second)},
			&errdetails.RetryInfo{RetryDelay: durationpb.New(time.Minute)},
		}, time.Second, true},
		{"zero is a delay", []proto.Message{&errdetails.RetryInfo{RetryDelay: durationpb.New(0)}}, 0, true},
		{"an unset delay is invalid", []proto.Message{&errdetails.RetryInfo{}}, 0, false},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			delay, ok := quota.RetryDelay(tc.details)
			if delay != tc.wantDelay || ok != tc.wantOK {
				t.Fatalf("RetryDelay = %v, %v; want %v, %v", delay, ok, tc.wantDelay, tc.wantOK)
			}
		})
	}
}
