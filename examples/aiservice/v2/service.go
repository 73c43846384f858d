package main

import (
	"context"
	"errors"
	"fmt"
	"math"
	"strings"

	"connectrpc.com/connect/v2"
	"connectrpc.com/connect/v2/connectproto"
	"google.golang.org/genproto/googleapis/rpc/errdetails"

	aiservicev1 "github.com/connectlimit/connectlimit/examples/aiservice/gen/aiservice/v1"
	"github.com/connectlimit/connectlimit/examples/aiservice/llm"
	"github.com/connectlimit/connectlimit/examples/aiservice/v2/gen/aiservice/v1/aiservicev1connect"
)

// maxMaxTokens is the largest max_tokens a GenerateReport request may ask
// for, as in the connect-go v1 example's service package.
const maxMaxTokens = 32768

// service implements aiservice.v1.AIService with connect-go v2 on the
// deterministic fake model in package llm, answering exactly as the
// connect-go v1 example's service package does. It is safe for concurrent
// use.
type service struct {
	model *llm.Model
}

var _ aiservicev1connect.AIServiceHandler = service{}

// Search returns the corpus documents that best match the request's query.
func (service) Search(_ context.Context, req *aiservicev1.SearchRequest) (*aiservicev1.SearchResponse, error) {
	query, topK := req.GetQuery(), req.GetTopK()
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
		res.Results = append(res.Results, &aiservicev1.SearchResult{Title: r.Title, Snippet: r.Snippet, Score: r.Score})
	}
	return res, nil
}

// GenerateReport streams a report about the request's topic: every message
// carries the next chunk of text and its token count, and the last one
// also the call's usage, which the limiter settles the call to.
func (s service) GenerateReport(ctx context.Context, req *aiservicev1.GenerateReportRequest, stream aiservicev1connect.AIServiceGenerateReportServerStream) error {
	topic, maxTokens := req.GetTopic(), req.GetMaxTokens()
	if strings.TrimSpace(topic) == "" {
		return invalidArgument("topic", fmt.Sprintf("%q", topic), "must not be empty")
	}
	if maxTokens <= 0 || maxTokens > maxMaxTokens {
		return invalidArgument("max_tokens", fmt.Sprint(maxTokens), fmt.Sprintf("must be between 1 and %d", maxMaxTokens))
	}
	// Hold back one chunk so that the usage can ride on the last message
	// instead of an extra, empty one.
	var pending *aiservicev1.GenerateReportResponse
	prompt := "Write a short report about " + strings.TrimSpace(topic) + "."
	usage, err := s.model.Complete(ctx, prompt, int(maxTokens), func(chunk llm.Chunk) error {
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

// invalidArgument returns a [connect.CodeInvalidArgument] error that names
// the offending field and value, with a google.rpc.BadRequest detail.
func invalidArgument(field, value, problem string) *connect.Error {
	err := connect.Errorf(connect.CodeInvalidArgument, "invalid %s %s: %s", field, value, problem)
	detail, detailErr := connectproto.NewErrorDetail(&errdetails.BadRequest{
		FieldViolations: []*errdetails.BadRequest_FieldViolation{{Field: field, Description: problem}},
	})
	if detailErr == nil {
		err = err.WithDetail(detail)
	}
	return err
}

// modelError converts an error from package llm, or from a Send that llm
// passed through, into a Connect error.
func modelError(err error) error {
	var connectErr *connect.Error
	switch {
	case errors.Is(err, llm.ErrInvalidArgument):
		return connect.NewError(connect.CodeInvalidArgument, err.Error()).WithCause(err)
	case errors.Is(err, llm.ErrRateLimited):
		// The model is busy, not the caller over its quota: not
		// resource_exhausted, which clients read as their own limit.
		return connect.NewError(connect.CodeUnavailable, "the model is busy; try again shortly").WithCause(err)
	case errors.Is(err, context.Canceled):
		return connect.NewError(connect.CodeCanceled, err.Error()).WithCause(err)
	case errors.Is(err, context.DeadlineExceeded):
		return connect.NewError(connect.CodeDeadlineExceeded, err.Error()).WithCause(err)
	case errors.As(err, &connectErr):
		return connectErr
	default:
		return connect.NewError(connect.CodeInternal, "report generation failed").WithCause(err)
	}
}

// toInt32 converts a token count to the proto's int32, saturating instead
// of wrapping around.
func toInt32(n int) int32 {
	return int32(max(min(n, math.MaxInt32), math.MinInt32))
}
