// Package service implements the example [aiservicev1connect.AIServiceHandler]
// on top of the deterministic fake model in package llm.
package service

import (
	"context"
	"errors"
	"fmt"
	"math"
	"strings"

	"connectrpc.com/connect"
	"google.golang.org/genproto/googleapis/rpc/errdetails"

	aiservicev1 "github.com/connectlimit/connectlimit/examples/aiservice/gen/aiservice/v1"
	"github.com/connectlimit/connectlimit/examples/aiservice/gen/aiservice/v1/aiservicev1connect"
	"github.com/connectlimit/connectlimit/examples/aiservice/llm"
	"github.com/connectlimit/connectlimit/outbound"
)

// MaxMaxTokens is the largest max_tokens a GenerateReport request may ask for.
const MaxMaxTokens = 32768

// ModelAttempts is how many times GenerateReport asks the model for one
// report, behind an outbound limiter (see [WithLimiter]), when the model
// refuses for its rate limit.
const ModelAttempts = 5

// Service implements [aiservicev1connect.AIServiceHandler]. Search answers
// from [llm.Search]; GenerateReport streams a completion of [llm.Model].
// Create one with [New]. A Service is safe for concurrent use.
type Service struct {
	model   *llm.Model
	limiter *outbound.Limiter
}

var _ aiservicev1connect.AIServiceHandler = (*Service)(nil)

// Option configures a [Service].
type Option interface {
	apply(*Service)
}

type optionFunc func(*Service)

func (f optionFunc) apply(s *Service) { f(s) }

// WithLimiter puts the model behind an outbound limiter, as a service puts
// a rate-limited LLM provider: each report waits until the limiter can pay
// its prompt's tokens plus max_tokens (what the model charges), and when
// the model refuses for its rate limit ([llm.ErrRateLimited]) the refusal
// is fed back to the limiter, which slows down, and the report is asked
// for again, up to [ModelAttempts] times, so that the model's limit does not
// reach callers. By default there is no limiter, and a refusal fails the
// report with [connect.CodeUnavailable].
func WithLimiter(l *outbound.Limiter) Option {
	return optionFunc(func(s *Service) { s.limiter = l })
}

// New returns a [Service] that generates reports with model. A nil model
// means llm.New() (no streaming delay).
func New(model *llm.Model, opts ...Option) *Service {
	if model == nil {
		model = llm.New()
	}
	s := &Service{model: model}
	for _, o := range opts {
		o.apply(s)
	}
	return s
}

// Search returns the corpus documents that best match the request's query.
// An empty (or all-space) query or a negative top_k is rejected with
// [connect.CodeInvalidArgument].
func (s *Service) Search(
	_ context.Context,
	req *connect.Request[aiservicev1.SearchRequest],
) (*connect.Response[aiservicev1.SearchResponse], error) {
	query, topK := req.Msg.GetQuery(), req.Msg.GetTopK()
	if strings.TrimSpace(query) == "" {
		return nil, invalidArgument("query", fmt.Sprintf("%q", query), "must not be empty")
	}
	if topK < 0 {
		return nil, invalidArgument("top_k", fmt.Sprint(topK), "must not be negative")
	}
	results, err := llm.Search(query, int(topK))
	if err != nil {
		return nil, modelError(err)
	}
	res := &aiservicev1.SearchResponse{Results: make([]*aiservicev1.SearchResult, 0, len(results))}
	for _, r := range results {
		res.Results = append(res.Results, &aiservicev1.SearchResult{
			Title:   r.Title,
			Snippet: r.Snippet,
			Score:   r.Score,
		})
	}
	return connect.NewResponse(res), nil
}

// GenerateReport streams a report about the request's topic: every message
// carries the next chunk of text and its token count, and the last message
// also carries the call's [aiservicev1.Usage]. An empty (or all-space) topic
// or a max_tokens outside 1..[MaxMaxTokens] is rejected with
// [connect.CodeInvalidArgument] before anything is sent.
func (s *Service) GenerateReport(
	ctx context.Context,
	req *connect.Request[aiservicev1.GenerateReportRequest],
	stream *connect.ServerStream[aiservicev1.GenerateReportResponse],
) error {
	topic, maxTokens := req.Msg.GetTopic(), req.Msg.GetMaxTokens()
	if strings.TrimSpace(topic) == "" {
		return invalidArgument("topic", fmt.Sprintf("%q", topic), "must not be empty")
	}
	if maxTokens <= 0 || maxTokens > MaxMaxTokens {
		return invalidArgument("max_tokens", fmt.Sprint(maxTokens), fmt.Sprintf("must be between 1 and %d", MaxMaxTokens))
	}
	// Hold back one chunk so that the usage can ride on the last message
	// instead of an extra, empty one.
	var pending *aiservicev1.GenerateReportResponse
	prompt := "Write a short report about " + strings.TrimSpace(topic) + "."
	usage, err := s.complete(ctx, prompt, int(maxTokens), func(chunk llm.Chunk) error {
		if pending != nil {
			if err := stream.Send(pending); err != nil {
				return err
			}
		}
		pending = &aiservicev1.GenerateReportResponse{Text: chunk.Text, Tokens: toInt32(chunk.Tokens)}
		return nil
	})
	if err != nil {
		return modelError(err)
	}
	if pending == nil { // the model always yields at least one chunk, but stay safe
		pending = &aiservicev1.GenerateReportResponse{}
	}
	pending.Usage = &aiservicev1.Usage{
		PromptTokens:     toInt32(usage.PromptTokens),
		CompletionTokens: toInt32(usage.CompletionTokens),
		TotalTokens:      toInt32(usage.TotalTokens),
	}
	return stream.Send(pending)
}

// complete asks the model for a completion, through the limiter if there
// is one. The model refuses a call before it yields anything, so a refused
// call can be asked for again.
func (s *Service) complete(ctx context.Context, prompt string, maxTokens int, yield func(llm.Chunk) error) (llm.Usage, error) {
	for attempt := 1; ; attempt++ {
		var permit *outbound.Permit // nil without a limiter: Done does nothing
		if s.limiter != nil {
			var err error
			if permit, err = s.limiter.Wait(ctx, float64(llm.CountTokens(prompt)+maxTokens)); err != nil {
				return llm.Usage{}, limiterError(err)
			}
		}
		usage, err := s.model.Complete(ctx, prompt, maxTokens, yield)
		var limited *llm.RateLimitError
		if !errors.As(err, &limited) {
			permit.Done(outbound.Feedback{})
			return usage, err
		}
		permit.Done(outbound.Feedback{Limited: true, RetryAfter: limited.RetryAfter, Header: limited.Header()})
		if s.limiter == nil || attempt == ModelAttempts {
			return usage, err
		}
	}
}

// limiterError converts an error of the outbound limiter's Wait.
func limiterError(err error) error {
	switch {
	case errors.Is(err, context.Canceled), errors.Is(err, context.DeadlineExceeded):
		return err
	case errors.Is(err, outbound.ErrOverCapacity):
		return fmt.Errorf("%w: the report is larger than the model's rate limit allows at once", llm.ErrInvalidArgument)
	default:
		return errLimiter
	}
}

// errLimiter is what a report gets when the outbound limiter's store
// fails; the store's error stays out of the client's message.
var errLimiter = errors.New("the model's rate limiter is unavailable")

// invalidArgument returns a [connect.CodeInvalidArgument] error that names
// the offending field and value, with a google.rpc.BadRequest detail for
// clients that read details.
func invalidArgument(field, value, problem string) *connect.Error {
	err := connect.NewError(connect.CodeInvalidArgument, fmt.Errorf("invalid %s %s: %s", field, value, problem))
	detail, detailErr := connect.NewErrorDetail(&errdetails.BadRequest{
		FieldViolations: []*errdetails.BadRequest_FieldViolation{{
			Field:       field,
			Description: problem,
		}},
	})
	if detailErr == nil {
		err.AddDetail(detail)
	}
	return err
}

// modelError converts an error from package llm, or from a Send that llm
// passed through, into a Connect error.
func modelError(err error) error {
	switch {
	case errors.Is(err, llm.ErrInvalidArgument):
		return connect.NewError(connect.CodeInvalidArgument, err)
	case errors.Is(err, llm.ErrRateLimited), errors.Is(err, errLimiter):
		// The model is busy, not the caller over its quota: not
		// resource_exhausted, which clients read as their own limit.
		return connect.NewError(connect.CodeUnavailable, errors.New("the model is busy; try again shortly"))
	case errors.Is(err, context.Canceled):
		return connect.NewError(connect.CodeCanceled, err)
	case errors.Is(err, context.DeadlineExceeded):
		return connect.NewError(connect.CodeDeadlineExceeded, err)
	default:
		var connectErr *connect.Error
		if errors.As(err, &connectErr) {
			return connectErr
		}
		return connect.NewError(connect.CodeInternal, errors.New("report generation failed"))
	}
}

// toInt32 converts a token count to the proto's int32, saturating instead of
// wrapping around.
func toInt32(n int) int32 {
	return int32(max(min(n, math.MaxInt32), math.MinInt32))
}
