package llm

import (
	"fmt"
	"slices"
	"strings"
	"unicode"
)

const (
	// DefaultTopK is the number of results [Search] returns when topK is 0.
	DefaultTopK = 5
	// MaxTopK is the largest topK [Search] honours; larger values are
	// clamped to it.
	MaxTopK = 50
)

// Result is one document [Search] found.
type Result struct {
	// Title is the document's title.
	Title string
	// Snippet is the first sentence of the document's body.
	Snippet string
	// Score is the fraction of the query's distinct terms that the document
	// contains, in (0, 1]. Higher is better.
	Score float64
}

// document is one entry of the built-in corpus.
type document struct {
	title string
	body  string
}

// corpus is the small built-in collection [Search] searches.
var corpus = []document{
	{"Token buckets", "A token bucket holds up to a fixed capacity of tokens and refills at a steady rate. Each request takes tokens; when the bucket is empty the request is denied until it refills."},
	{"Leaky buckets", "A leaky bucket drains queued requests at a constant rate. It smooths bursts instead of allowing them, at the price of added latency."},
	{"Fixed and sliding windows", "A fixed window counter resets at the start of every period, so clients can burst at window edges. Sliding windows weigh the previous period to smooth that edge."},
	{"Cost-aware rate limiting", "Cost-aware rate limiting charges each procedure a different number of tokens. A cheap search costs one token while an expensive generation costs fifty."},
	{"Rate limits for language models", "Language model APIs limit both requests per minute and tokens per minute. A long completion spends far more of the budget than a short one."},
	{"Retry-After and backoff", "A denied client should wait for the Retry-After interval before trying again. Exponential backoff with jitter keeps many clients from retrying at the same instant."},
	{"RateLimit headers", "The RateLimit and RateLimit-Policy response headers tell a client its remaining quota and the policy that applies. Clients can slow down before they are denied."},
	{"Resource exhausted errors", "Connect and gRPC report a rate limit denial with the resource exhausted code, which maps to HTTP status 429. A RetryInfo error detail says how long to wait."},
	{"Distributed rate limiting with Redis", "A shared Redis store lets many server replicas enforce one limit per client. An atomic Lua script reads and updates the bucket in a single round trip."},
	{"Redis Cluster hash tags", "Redis Cluster only runs multi-key scripts when all keys hash to one slot. Putting a hash tag in braces in every key keeps a client's buckets together."},
	{"Identifying clients", "A rate limiter needs a key for each client: an API key, an authenticated user, or the remote IP address as a last resort. Keys from headers must be validated."},
	{"Fail open or fail closed", "When the rate limit store is unavailable a service must choose to allow traffic or deny it. Failing open keeps the service up; failing closed protects the backend."},
	{"Streaming responses", "A streamed response sends a completion in chunks as the model produces them. Rate limiters can charge per message or once for the whole stream."},
	{"Token usage accounting", "Model APIs report prompt tokens, completion tokens and total tokens for every call. Usage reports let a service bill and limit by the work actually done."},
	{"Tokenizers", "Tokenizers split text into subword tokens. As a rule of thumb an English token is about four characters long."},
	{"Embeddings and vector search", "Embeddings map text to vectors so that similar meanings land close together. Vector search ranks documents by the similarity of their embeddings to the query."},
	{"Retrieval augmented generation", "Retrieval augmented generation searches a corpus first and puts the best documents into the prompt. Grounding the model in retrieved text reduces hallucination."},
	{"Caching model responses", "Caching responses for repeated prompts saves latency and cost. Deterministic models make caching exact, while sampled models need care."},
	{"Load shedding", "Load shedding rejects work early when a server is overloaded. Unlike per-client rate limits it protects the server as a whole."},
	{"Fairness between tenants", "A multi-tenant service gives each tenant its own buckets so that one noisy tenant cannot exhaust the capacity of others. Weighted limits give paying tenants more."},
}

// Search returns up to topK documents of the built-in corpus that share words
// with query, best match first. A document's score is the fraction of the
// query's distinct terms (lower-cased words, plural "s" removed, common
// stopwords dropped) that appear in its title or body; ties keep corpus order.
// Documents that match no term are left out, so a query with no terms returns
// no results.
//
// A topK of 0 means [DefaultTopK]; values above [MaxTopK] are clamped to it.
// A negative topK is an error wrapping [ErrInvalidArgument]. Search is
// deterministic and safe for concurrent use.
func Search(query string, topK int) ([]Result, error) {
	switch {
	case topK < 0:
		return nil, fmt.Errorf("%w: topK %d must not be negative", ErrInvalidArgument, topK)
	case topK == 0:
		topK = DefaultTopK
	case topK > MaxTopK:
		topK = MaxTopK
	}
	queryTerms := terms(query)
	if len(queryTerms) == 0 {
		return nil, nil
	}
	var results []Result
	for _, doc := range corpus {
		docTerms := terms(doc.title + " " + doc.body)
		matched := 0
		for _, term := range queryTerms {
			if slices.Contains(docTerms, term) {
				matched++
			}
		}
		if matched == 0 {
			continue
		}
		results = append(results, Result{
			Title:   doc.title,
			Snippet: firstSentence(doc.body),
			Score:   float64(matched) / float64(len(queryTerms)),
		})
	}
	slices.SortStableFunc(results, func(a, b Result) int {
		switch {
		case a.Score > b.Score:
			return -1
		case a.Score < b.Score:
			return 1
		default:
			return 0
		}
	})
	return results[:min(len(results), topK)], nil
}

// stopwords are words too common to say anything about a match.
var stopwords = map[string]bool{
	"a": true, "an": true, "and": true, "are": true, "as": true, "at": true,
	"be": true, "by": true, "can": true, "do": true, "doe": true, "for": true,
	"from": true, "how": true, "i": true, "in": true, "is": true, "it": true,
	"its": true, "me": true, "my": true, "of": true, "on": true, "or": true,
	"the": true, "their": true, "that": true, "thi": true, "to": true,
	"what": true, "when": true, "why": true, "with": true,
}

// terms returns the distinct search terms of text in order of first
// appearance: lower-cased runs of letters and digits, with a plural "s"
// removed and stopwords dropped.
func terms(text string) []string {
	fields := strings.FieldsFunc(strings.ToLower(text), func(r rune) bool {
		return !unicode.IsLetter(r) && !unicode.IsDigit(r)
	})
	var out []string
	for _, field := range fields {
		if len(field) > 3 && strings.HasSuffix(field, "s") && !strings.HasSuffix(field, "ss") {
			field = strings.TrimSuffix(field, "s")
		}
		if !stopwords[field] && !slices.Contains(out, field) {
			out = append(out, field)
		}
	}
	return out
}

// firstSentence returns text up to and including its first period.
func firstSentence(text string) string {
	if i := strings.Index(text, ". "); i >= 0 {
		return text[:i+1]
	}
	return text
}
