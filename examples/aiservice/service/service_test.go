package service_test

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"slices"
	"strings"
	"testing"
	"time"

	"connectrpc.com/connect"
	"google.golang.org/genproto/googleapis/rpc/errdetails"

	aiservicev1 "github.com/connectlimit/connectlimit/examples/aiservice/gen/aiservice/v1"
	"github.com/connectlimit/connectlimit/examples/aiservice/gen/aiservice/v1/aiservicev1connect"
	"github.com/connectlimit/connectlimit/examples/aiservice/llm"
	"github.com/connectlimit/connectlimit/examples/aiservice/service"
)

// newServer starts an HTTP/2 (TLS) server for svc and returns its URL and a
// client that trusts it. The server is closed when the test ends.
func newServer(tb testing.TB, svc *service.Service) (string, *http.Client) {
	tb.Helper()
	mux := http.NewServeMux()
	mux.Handle(aiservicev1connect.NewAIServiceHandler(svc))
	server := httptest.NewUnstartedServer(mux)
	server.EnableHTTP2 = true
	server.StartTLS()
	tb.Cleanup(server.Close)
	return server.URL, server.Client()
}

// protocols are the client options for each protocol a Connect server speaks.
var protocols = []struct {
	name string
	opts []connect.ClientOption
}{
	{name: "connect"},
	{name: "grpc", opts: []connect.ClientOption{connect.WithGRPC()}},
	{name: "grpcweb", opts: []connect.ClientOption{connect.WithGRPCWeb()}},
}

// checkInvalidArgument fails the test unless err is a CodeInvalidArgument
// error whose message contains wantMsg and which names field in a
// google.rpc.BadRequest detail.
func checkInvalidArgument(t *testing.T, err error, field, wantMsg string) {
	t.Helper()
	if connect.CodeOf(err) != connect.CodeInvalidArgument {
		t.Fatalf("error = %v, want code %v", err, connect.CodeInvalidArgument)
	}
	var connectErr *connect.Error
	if !errors.As(err, &connectErr) {
		t.Fatalf("error %v is not a *connect.Error", err)
	}
	if !strings.Contains(connectErr.Message(), wantMsg) {
		t.Errorf("message = %q, want it to contain %q", connectErr.Message(), wantMsg)
	}
	var fields []string
	for _, detail := range connectErr.Details() {
		value, valueErr := detail.Value()
		if badRequest, ok := value.(*errdetails.BadRequest); ok && valueErr == nil {
			for _, v := range badRequest.GetFieldViolations() {
				fields = append(fields, v.GetField())
			}
		}
	}
	if len(fields) != 1 || fields[0] != field {
		t.Errorf("BadRequest field violations name %q, want [%q]", fields, field)
	}
}

func TestSearch(t *testing.T) {
	t.Parallel()
	url, httpClient := newServer(t, service.New(nil))
	tests := []struct {
		name       string
		req        *aiservicev1.SearchRequest
		wantN      int
		wantFirst  string
		wantField  string // non-empty: want CodeInvalidArgument naming this field
		wantErrMsg string
	}{
		{name: "top k", req: &aiservicev1.SearchRequest{Query: "token bucket refill", TopK: 2}, wantN: 2, wantFirst: "Token buckets"},
		{name: "default top k", req: &aiservicev1.SearchRequest{Query: "rate limit"}, wantN: 5},
		{name: "no match", req: &aiservicev1.SearchRequest{Query: "zebra"}, wantN: 0},
		{name: "empty query", req: &aiservicev1.SearchRequest{TopK: 3}, wantField: "query", wantErrMsg: `invalid query "": must not be empty`},
		{name: "blank query", req: &aiservicev1.SearchRequest{Query: "  "}, wantField: "query", wantErrMsg: `invalid query "  "`},
		{name: "negative top k", req: &aiservicev1.SearchRequest{Query: "rate", TopK: -1}, wantField: "top_k", wantErrMsg: "invalid top_k -1: must not be negative"},
	}
	for _, proto := range protocols {
		client := aiservicev1connect.NewAIServiceClient(httpClient, url, proto.opts...)
		for _, tt := range tests {
			t.Run(proto.name+"/"+tt.name, func(t *testing.T) {
				t.Parallel()
				res, err := client.Search(t.Context(), connect.NewRequest(tt.req))
				if tt.wantField != "" {
					checkInvalidArgument(t, err, tt.wantField, tt.wantErrMsg)
					return
				}
				if err != nil {
					t.Fatalf("Search: %v", err)
				}
				results := res.Msg.GetResults()
				if len(results) != tt.wantN {
					t.Fatalf("got %d results, want %d: %v", len(results), tt.wantN, results)
				}
				if tt.wantFirst != "" && results[0].GetTitle() != tt.wantFirst {
					t.Errorf("first result = %q, want %q", results[0].GetTitle(), tt.wantFirst)
				}
				for _, r := range results {
					if r.GetScore() <= 0 || r.GetScore() > 1 || r.GetSnippet() == "" {
						t.Errorf("bad result %v", r)
					}
				}
			})
		}
	}
}

func TestGenerateReport(t *testing.T) {
	t.Parallel()
	url, httpClient := newServer(t, service.New(nil))
	tests := []struct {
		name           string
		req            *aiservicev1.GenerateReportRequest
		wantCompletion int32 // 0: the model's natural length, at most max_tokens
		wantMessages   int   // 0: don't check
		wantField      string
		wantErrMsg     string
	}{
		{name: "one token", req: &aiservicev1.GenerateReportRequest{Topic: "buckets", MaxTokens: 1}, wantCompletion: 1, wantMessages: 1},
		{name: "cut short", req: &aiservicev1.GenerateReportRequest{Topic: "buckets", MaxTokens: 30}, wantCompletion: 30, wantMessages: 8},
		{name: "natural length", req: &aiservicev1.GenerateReportRequest{Topic: "rate limiting for LLM APIs", MaxTokens: 32768}},
		{name: "empty topic", req: &aiservicev1.GenerateReportRequest{MaxTokens: 10}, wantField: "topic", wantErrMsg: `invalid topic "": must not be empty`},
		{name: "zero max tokens", req: &aiservicev1.GenerateReportRequest{Topic: "x"}, wantField: "max_tokens", wantErrMsg: "invalid max_tokens 0: must be between 1 and 32768"},
		{name: "negative max tokens", req: &aiservicev1.GenerateReportRequest{Topic: "x", MaxTokens: -3}, wantField: "max_tokens", wantErrMsg: "invalid max_tokens -3"},
		{name: "too many max tokens", req: &aiservicev1.GenerateReportRequest{Topic: "x", MaxTokens: 32769}, wantField: "max_tokens", wantErrMsg: "invalid max_tokens 32769"},
	}
	for _, proto := range protocols {
		client := aiservicev1connect.NewAIServiceClient(httpClient, url, proto.opts...)
		for _, tt := range tests {
			t.Run(proto.name+"/"+tt.name, func(t *testing.T) {
				t.Parallel()
				stream, err := client.GenerateReport(t.Context(), connect.NewRequest(tt.req))
				if err != nil {
					t.Fatalf("GenerateReport: %v", err)
				}
				defer stream.Close()
				var (
					messages []*aiservicev1.GenerateReportResponse
					text     strings.Builder
					sum      int32
				)
				for stream.Receive() {
					msg := stream.Msg()
					messages = append(messages, msg)
					text.WriteString(msg.GetText())
					sum += msg.GetTokens()
				}
				if tt.wantField != "" {
					if len(messages) != 0 {
						t.Errorf("got %d messages before the error, want 0", len(messages))
					}
					checkInvalidArgument(t, stream.Err(), tt.wantField, tt.wantErrMsg)
					return
				}
				if err := stream.Err(); err != nil {
					t.Fatalf("stream error: %v", err)
				}
				if len(messages) == 0 {
					t.Fatal("got no messages")
				}
				if tt.wantMessages != 0 && len(messages) != tt.wantMessages {
					t.Errorf("got %d messages, want %d", len(messages), tt.wantMessages)
				}
				for i, msg := range messages {
					if msg.GetText() == "" || msg.GetTokens() < 1 {
						t.Errorf("message %d has text %q and %d tokens", i, msg.GetText(), msg.GetTokens())
					}
					if last := i == len(messages)-1; (msg.GetUsage() != nil) != last {
						t.Errorf("message %d of %d has usage %v", i, len(messages), msg.GetUsage())
					}
				}
				usage := messages[len(messages)-1].GetUsage()
				if usage.GetCompletionTokens() != sum {
					t.Errorf("completion_tokens = %d, sum of message tokens = %d", usage.GetCompletionTokens(), sum)
				}
				if usage.GetPromptTokens() < 1 || usage.GetTotalTokens() != usage.GetPromptTokens()+usage.GetCompletionTokens() {
					t.Errorf("inconsistent usage %v", usage)
				}
				if sum > tt.req.GetMaxTokens() {
					t.Errorf("got %d completion tokens, more than max_tokens %d", sum, tt.req.GetMaxTokens())
				}
				if tt.wantCompletion != 0 && sum != tt.wantCompletion {
					t.Errorf("got %d completion tokens, want %d", sum, tt.wantCompletion)
				}
				if tt.wantCompletion == 0 && !strings.HasSuffix(text.String(), ".") {
					t.Errorf("natural-length report does not end a sentence: %q", text.String())
				}
			})
		}
	}
}

// handlerErrors is a server-side interceptor that reports when a streaming
// handler starts and what error it returns.
type handlerErrors struct {
	started chan struct{}
	errs    chan error
}

func (h *handlerErrors) WrapUnary(next connect.UnaryFunc) connect.UnaryFunc { return next }

func (h *handlerErrors) WrapStreamingClient(next connect.StreamingClientFunc) connect.StreamingClientFunc {
	return next
}

func (h *handlerErrors) WrapStreamingHandler(next connect.StreamingHandlerFunc) connect.StreamingHandlerFunc {
	return func(ctx context.Context, conn connect.StreamingHandlerConn) error {
		h.started <- struct{}{}
		err := next(ctx, conn)
		h.errs <- err
		return err
	}
}

func TestGenerateReportClientGoesAway(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name             string
		timeout          time.Duration // 0: cancel the call once the handler runs
		wantCode         connect.Code
		wantHandlerCodes []connect.Code
	}{
		{
			name:             "cancelled",
			wantCode:         connect.CodeCanceled,
			wantHandlerCodes: []connect.Code{connect.CodeCanceled},
		},
		{
			// The server sees its own deadline (from the Connect-Timeout-Ms
			// header) or the client resetting the stream, whichever is first.
			name:             "deadline",
			timeout:          200 * time.Millisecond,
			wantCode:         connect.CodeDeadlineExceeded,
			wantHandlerCodes: []connect.Code{connect.CodeDeadlineExceeded, connect.CodeCanceled},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			// The model waits an hour before its first chunk, so only the
			// client going away can end the call.
			svc := service.New(llm.New(llm.WithChunkDelay(time.Hour)))
			observer := &handlerErrors{started: make(chan struct{}, 1), errs: make(chan error, 1)}
			mux := http.NewServeMux()
			mux.Handle(aiservicev1connect.NewAIServiceHandler(svc, connect.WithInterceptors(observer)))
			server := httptest.NewUnstartedServer(mux)
			server.EnableHTTP2 = true
			server.StartTLS()
			t.Cleanup(server.Close)
			client := aiservicev1connect.NewAIServiceClient(server.Client(), server.URL)
			// Connect first, so that the TLS handshake does not eat into the
			// deadline below.
			if _, err := client.Search(t.Context(), connect.NewRequest(&aiservicev1.SearchRequest{Query: "warm up"})); err != nil {
				t.Fatal(err)
			}

			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			if tt.timeout > 0 {
				ctx, cancel = context.WithTimeout(ctx, tt.timeout)
				defer cancel()
			}
			// The client call blocks until the server sends response headers,
			// which this handler never does, so it runs in its own goroutine.
			clientErr := make(chan error, 1)
			go func() {
				stream, err := client.GenerateReport(ctx, connect.NewRequest(&aiservicev1.GenerateReportRequest{Topic: "slow", MaxTokens: 10}))
				if err != nil {
					clientErr <- err
					return
				}
				defer stream.Close()
				if stream.Receive() {
					clientErr <- errors.New("client received a message")
					return
				}
				clientErr <- stream.Err()
			}()
			select {
			case <-observer.started:
			case err := <-clientErr:
				// Rather than wait forever for a handler that will not run.
				t.Fatalf("the call ended before its handler started (%v): the deadline of %v is too short for this machine", err, tt.timeout)
			}
			if tt.timeout == 0 {
				cancel()
			}
			if err := <-observer.errs; !slices.Contains(tt.wantHandlerCodes, connect.CodeOf(err)) {
				t.Errorf("handler returned %v, want a code in %v", err, tt.wantHandlerCodes)
			}
			if err := <-clientErr; connect.CodeOf(err) != tt.wantCode {
				t.Errorf("client got %v, want code %v", err, tt.wantCode)
			}
		})
	}
}
