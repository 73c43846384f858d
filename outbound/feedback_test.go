package outbound

import (
	"net/http"
	"testing"
	"time"
)

func TestFeedbackSignal(t *testing.T) {
	t.Parallel()
	h := func(kv ...string) http.Header {
		header := http.Header{}
		for i := 0; i < len(kv); i += 2 {
			header.Set(kv[i], kv[i+1])
		}
		return header
	}
	for _, tc := range []struct {
		name string
		f    Feedback
		want signal
	}{
		{"nothing said", Feedback{}, signal{}},
		{"refused, no hint", Feedback{Limited: true}, signal{limited: true, drain: true}},
		{"RetryInfo", Feedback{Limited: true, RetryAfter: 1500 * time.Millisecond}, signal{limited: true, pause: 1500 * time.Millisecond, drain: true}},
		{"Retry-After seconds", Feedback{Limited: true, Header: h("Retry-After", "3")}, signal{limited: true, pause: 3 * time.Second, drain: true}},
		{"Retry-After date", Feedback{Limited: true, Header: h("Retry-After", t0.Add(10*time.Second).Format(http.TimeFormat))}, signal{limited: true, pause: 10 * time.Second, drain: true}},
		{"Retry-After date in the past", Feedback{Limited: true, Header: h("Retry-After", t0.Add(-time.Hour).Format(http.TimeFormat))}, signal{limited: true, drain: true}},
		{"Retry-After garbage", Feedback{Limited: true, Header: h("Retry-After", "soon")}, signal{limited: true, drain: true}},
		{"Retry-After negative", Feedback{Limited: true, Header: h("Retry-After", "-3")}, signal{limited: true, drain: true}},
		{"retry-after-ms", Feedback{Limited: true, Header: h("retry-after-ms", "250")}, signal{limited: true, pause: 250 * time.Millisecond, drain: true}},
		{"RetryInfo is more precise than the headers", Feedback{Limited: true, RetryAfter: 100 * time.Millisecond, Header: h("retry-after-ms", "250", "Retry-After", "1")}, signal{limited: true, pause: 100 * time.Millisecond, drain: true}},
		{"retry-after-ms is more precise than Retry-After", Feedback{Limited: true, Header: h("retry-after-ms", "250", "Retry-After", "1")}, signal{limited: true, pause: 250 * time.Millisecond, drain: true}},
		{"an explicit wait wins over an exhausted count's reset", Feedback{Limited: true, RetryAfter: 100 * time.Millisecond, Header: h("x-ratelimit-remaining-tokens", "0", "x-ratelimit-reset-tokens", "2s")}, signal{limited: true, pause: 100 * time.Millisecond, drain: true}},
		{"refused without a wait: the exhausted count's reset", Feedback{Limited: true, Header: h("x-ratelimit-remaining-tokens", "0", "x-ratelimit-reset-tokens", "2s")}, signal{limited: true, pause: 2 * time.Second, drain: true}},
		{"Retry-After on a success is not a pause", Feedback{Header: h("Retry-After", "3")}, signal{}},
		{"OpenAI: tokens exhausted", Feedback{Header: h(
			"x-ratelimit-limit-requests", "60", "x-ratelimit-remaining-requests", "59", "x-ratelimit-reset-requests", "1s",
			"x-ratelimit-limit-tokens", "150000", "x-ratelimit-remaining-tokens", "0", "x-ratelimit-reset-tokens", "6m0s")},
			signal{pause: 6 * time.Minute, drain: true}},
		{"OpenAI: both exhausted, refused", Feedback{Limited: true, Header: h(
			"x-ratelimit-remaining-requests", "0", "x-ratelimit-reset-requests", "20ms",
			"x-ratelimit-remaining-tokens", "0", "x-ratelimit-reset-tokens", "1.5")},
			signal{limited: true, pause: 1500 * time.Millisecond, drain: true}},
		{"counts left: no pause", Feedback{Header: h("x-ratelimit-remaining-tokens", "12", "x-ratelimit-reset-tokens", "6s")}, signal{}},
		{"exhausted without a valid reset", Feedback{Header: h("x-ratelimit-remaining-tokens", "0", "x-ratelimit-reset-tokens", "-1s")}, signal{drain: true}},
		{"refused with tokens left: drain to them", Feedback{Limited: true, RetryAfter: time.Second, Header: h("x-ratelimit-remaining-tokens", "42")}, signal{limited: true, pause: time.Second, drain: true, drainTo: 42}},
		{"a malformed count", Feedback{Header: h("x-ratelimit-remaining-tokens", "none", "x-ratelimit-reset-tokens", "6s")}, signal{}},
	} {
		t.Run(tc.name, func(t *testing.T) {
			t.Parallel()
			if got := tc.f.signal(t0); got != tc.want {
				t.Fatalf("signal = %+v, want %+v", got, tc.want)
			}
		})
	}
	if f := ResponseFeedback(&http.Response{StatusCode: http.StatusTooManyRequests, Header: h("Retry-After", "2")}); !f.Limited || f.signal(t0).pause != 2*time.Second {
		t.Fatalf("ResponseFeedback of a 429 = %+v", f)
	}
	if f := ResponseFeedback(&http.Response{StatusCode: http.StatusServiceUnavailable}); f.Limited {
		t.Fatalf("ResponseFeedback of a 503 = %+v, want not limited", f)
	}
}
