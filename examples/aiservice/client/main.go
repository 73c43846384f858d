// Command client calls the example AIService until connectlimit says stop.
//
// It calls Search -n times and prints each call's status and rate-limit
// headers. When the server answers with CodeResourceExhausted it prints the
// error, its google.rpc.RetryInfo detail and the Retry-After header, and
// stops calling Search. With -report it then streams one GenerateReport call,
// which is priced in LLM tokens, and shows the caller's generate_tokens
// bucket (from connectlimit.v1.QuotaService) before the call, once the
// call's estimate is reserved, and after the stream, settled to the tokens
// the report really used.
//
// With -quota it only prints where the caller stands in every bucket of its
// tier, without charging anything.
//
// With -pace the calls go through connectlimit's Go client interceptor
// (package client), which knows what a Search costs: it holds each call
// until the caller's search bucket can pay it, so that no call is denied,
// and retries a denial that comes anyway after its RetryInfo wait.
//
//	go run ./examples/aiservice/client -n 70
//	go run ./examples/aiservice/client -n 70 -pace
//	go run ./examples/aiservice/client -key demo-key-alice -n 3 -report
//	go run ./examples/aiservice/client -key demo-key-pro -quota
package main

import (
	"context"
	"errors"
	"flag"
	"fmt"
	"math"
	"net/http"
	"os"
	"os/signal"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/genproto/googleapis/rpc/errdetails"

	"github.com/connectlimit/connectlimit/client"
	aiservicev1 "github.com/connectlimit/connectlimit/examples/aiservice/gen/aiservice/v1"
	"github.com/connectlimit/connectlimit/examples/aiservice/gen/aiservice/v1/aiservicev1connect"
	connectlimitv1 "github.com/connectlimit/connectlimit/proto/connectlimit/v1"
	"github.com/connectlimit/connectlimit/proto/connectlimit/v1/connectlimitv1connect"
)

func main() {
	addr := flag.String("addr", "http://127.0.0.1:8080", "base URL of the AIService server")
	key := flag.String("key", "", "API key, sent as \"Authorization: Bearer <key>\" (optional)")
	n := flag.Int("n", 70, "number of Search calls")
	query := flag.String("query", "token bucket rate limiting", "Search query")
	report := flag.Bool("report", false, "also call GenerateReport")
	topic := flag.String("topic", "rate limiting for LLM APIs", "GenerateReport topic (with -report)")
	maxTokens := flag.Int("max-tokens", 1000, "GenerateReport max_tokens (with -report)")
	quota := flag.Bool("quota", false, "only print the caller's quota (connectlimit.v1.QuotaService/GetQuota)")
	pace := flag.Bool("pace", false, "hold each Search until the caller's search bucket can pay it, instead of being denied")
	flag.Parse()

	ctx, stop := signal.NotifyContext(context.Background(), os.Interrupt)
	defer stop()
	var opts []connect.ClientOption
	if *pace {
		limits, err := client.NewInterceptor(
			client.WithCost(aiservicev1connect.AIServiceSearchProcedure, "search", 1),
			client.WithMaxWait(time.Minute),
		)
		if err != nil {
			fmt.Fprintf(os.Stderr, "client: %v\n", err)
			os.Exit(1)
		}
		opts = append(opts, connect.WithInterceptors(limits))
	}
	ai := aiservicev1connect.NewAIServiceClient(http.DefaultClient, *addr, opts...)
	quotas := connectlimitv1connect.NewQuotaServiceClient(http.DefaultClient, *addr)

	if *quota {
		if err := printQuota(ctx, quotas, *key); err != nil {
			fmt.Fprintf(os.Stderr, "quota: %v\n", err)
			os.Exit(1)
		}
		return
	}
	if err := search(ctx, ai, *key, *query, *n); err != nil {
		fmt.Fprintf(os.Stderr, "search: %v\n", err)
		os.Exit(1)
	}
	if *report {
		if err := generateReport(ctx, ai, quotas, *key, *topic, *maxTokens); err != nil {
			fmt.Fprintf(os.Stderr, "generate report: %v\n", err)
			os.Exit(1)
		}
	}
}

// search calls Search up to n times and stops at the first rate-limit denial.
// It returns an error only for failures other than a denial.
func search(ctx context.Context, client aiservicev1connect.AIServiceClient, key, query string, n int) error {
	for i := 1; i <= n; i++ {
		req := connect.NewRequest(&aiservicev1.SearchRequest{Query: query, TopK: 3})
		setKey(req.Header(), key)
		res, err := client.Search(ctx, req)
		if err != nil {
			fmt.Fprintf(os.Stdout, "search %3d: %v\n", i, connect.CodeOf(err))
			return explainDenial(err)
		}
		fmt.Fprintf(os.Stdout, "search %3d: ok, %d results  %s\n", i, len(res.Msg.GetResults()), limitHeaders(res.Header()))
	}
	return nil
}

// generateReport streams one report to stdout and prints its usage, with
// the caller's generate_tokens bucket before the call, once the call's
// estimate is reserved, and after the stream is settled.
func generateReport(ctx context.Context, client aiservicev1connect.AIServiceClient, quotas connectlimitv1connect.QuotaServiceClient, key, topic string, maxTokens int) error {
	if err := printTokens(ctx, quotas, key, "before the call"); err != nil {
		return err
	}
	// Out-of-range values are clamped to int32 so that the server, not this
	// client, gets to reject them.
	clamped := int32(max(min(maxTokens, math.MaxInt32), math.MinInt32))
	req := connect.NewRequest(&aiservicev1.GenerateReportRequest{Topic: topic, MaxTokens: clamped})
	setKey(req.Header(), key)
	stream, err := client.GenerateReport(ctx, req)
	if err != nil {
		fmt.Fprintf(os.Stdout, "report: %v\n", connect.CodeOf(err))
		return explainDenial(err)
	}
	defer stream.Close()
	var usage *aiservicev1.Usage
	received := false
	for stream.Receive() {
		if !received {
			received = true
			// The estimate was reserved before the first message, and the
			// stream is still running.
			fmt.Fprintf(os.Stdout, "report: %s\n", limitHeaders(stream.ResponseHeader()))
			if err := printTokens(ctx, quotas, key, "estimate reserved"); err != nil {
				return err
			}
		}
		fmt.Fprint(os.Stdout, stream.Msg().GetText())
		if u := stream.Msg().GetUsage(); u != nil {
			usage = u
		}
	}
	if received {
		fmt.Fprintln(os.Stdout)
	}
	if err := stream.Err(); err != nil {
		fmt.Fprintf(os.Stdout, "report: %v\n", connect.CodeOf(err))
		return explainDenial(err)
	}
	fmt.Fprintf(os.Stdout, "report usage: prompt=%d completion=%d total=%d tokens\n",
		usage.GetPromptTokens(), usage.GetCompletionTokens(), usage.GetTotalTokens())
	return printTokens(ctx, quotas, key, "settled to usage")
}

// printQuota prints every bucket and concurrency limit of the caller's tier.
func printQuota(ctx context.Context, quotas connectlimitv1connect.QuotaServiceClient, key string) error {
	req := connect.NewRequest(&connectlimitv1.GetQuotaRequest{})
	setKey(req.Header(), key)
	res, err := quotas.GetQuota(ctx, req)
	if err != nil {
		return err
	}
	fmt.Fprintf(os.Stdout, "%s, tier %s\n", res.Msg.GetSubject(), res.Msg.GetTier())
	for _, b := range res.Msg.GetBuckets() {
		fmt.Fprintf(os.Stdout, "  %-18s %s\n", b.GetName(), formatBucket(b))
	}
	for _, c := range res.Msg.GetConcurrency() {
		fmt.Fprintf(os.Stdout, "  %-18s %d at once\n", c.GetName(), c.GetLimit())
	}
	return nil
}

// printTokens prints the caller's generate_tokens bucket, labelled with when.
func printTokens(ctx context.Context, quotas connectlimitv1connect.QuotaServiceClient, key, when string) error {
	req := connect.NewRequest(&connectlimitv1.GetQuotaRequest{Buckets: []string{"generate_tokens"}})
	setKey(req.Header(), key)
	res, err := quotas.GetQuota(ctx, req)
	if err != nil {
		return fmt.Errorf("GetQuota: %w", err)
	}
	for _, b := range res.Msg.GetBuckets() {
		fmt.Fprintf(os.Stdout, "quota: %-18s %s  (%s)\n", b.GetName(), formatBucket(b), when)
	}
	return nil
}

// formatBucket formats one bucket of a GetQuota response.
func formatBucket(b *connectlimitv1.BucketQuota) string {
	return fmt.Sprintf("%11.1f / %-9.0f refill %.4g/s, full in %v",
		b.GetRemaining(), b.GetCapacity(), b.GetRefillPerSecond(), b.GetResetAfter().AsDuration().Round(time.Millisecond))
}

// setKey sends the API key, if any, as a bearer token.
func setKey(header http.Header, key string) {
	if key != "" {
		header.Set("Authorization", "Bearer "+key)
	}
}

// explainDenial prints what a rate-limit denial says about when to retry and
// returns nil; any other error is returned unchanged.
func explainDenial(err error) error {
	var connectErr *connect.Error
	if !errors.As(err, &connectErr) || connectErr.Code() != connect.CodeResourceExhausted {
		return err
	}
	fmt.Fprintf(os.Stdout, "  rate limited: %s\n", connectErr.Message())
	for _, detail := range connectErr.Details() {
		value, valueErr := detail.Value()
		if valueErr != nil {
			continue
		}
		switch v := value.(type) {
		case *errdetails.RetryInfo:
			fmt.Fprintf(os.Stdout, "  RetryInfo.retry_delay: %v\n", v.GetRetryDelay().AsDuration())
		case *errdetails.QuotaFailure:
			for _, violation := range v.GetViolations() {
				fmt.Fprintf(os.Stdout, "  QuotaFailure: %s: %s\n", violation.GetSubject(), violation.GetDescription())
			}
		}
	}
	fmt.Fprintf(os.Stdout, "  Retry-After: %s  %s\n", orDash(connectErr.Meta().Get("Retry-After")), limitHeaders(connectErr.Meta()))
	return nil
}

// limitHeaders formats the RateLimit and RateLimit-Policy headers of h.
func limitHeaders(h http.Header) string {
	return "RateLimit: " + orDash(h.Get("RateLimit")) + "  RateLimit-Policy: " + orDash(h.Get("RateLimit-Policy"))
}

// orDash returns s, or "-" if s is empty.
func orDash(s string) string {
	if s == "" {
		return "-"
	}
	return s
}
