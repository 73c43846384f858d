// Package llm is a deterministic fake large language model that backs the
// example AIService's Connect handlers.
//
// It needs no network and no model files: a completion is a pseudo-random
// sequence of words drawn from a fixed vocabulary (mixed with the prompt's own
// words), seeded by a hash of the prompt. The same prompt always produces the
// same text, token counts and [Usage], which makes the example's rate-limit
// behaviour reproducible in tests and demos.
package llm

import (
	"context"
	"errors"
	"fmt"
	"hash/fnv"
	"slices"
	"strings"
	"time"
	"unicode"
	"unicode/utf8"
)

// ErrInvalidArgument is wrapped by the errors [Model.Complete] and [Search]
// return for arguments they reject, such as a non-positive token limit or a
// negative topK. Callers can map it to [connectrpc.com/connect.CodeInvalidArgument]
// with [errors.Is].
var ErrInvalidArgument = errors.New("llm: invalid argument")

const (
	// defaultChunkTokens is the number of completion tokens per [Chunk]
	// unless [WithChunkTokens] says otherwise.
	defaultChunkTokens = 4
	// minNaturalTokens and naturalTokensSpread bound the length after which
	// a completion ends at the next sentence end when maxTokens does not cut
	// it short: between 64 and 319 tokens.
	minNaturalTokens    = 64
	naturalTokensSpread = 256
)

// Chunk is one piece of a streamed completion.
type Chunk struct {
	// Text is the chunk's text. Concatenating the Text of every chunk, in
	// order, gives the whole completion.
	Text string
	// Tokens is the number of completion tokens in Text. It is at least 1.
	Tokens int
}

// Usage counts the tokens one completion consumed, like the usage object of
// the OpenAI API.
type Usage struct {
	// PromptTokens is the number of tokens in the prompt, as [CountTokens]
	// counts them.
	PromptTokens int
	// CompletionTokens is the number of tokens generated. It equals the sum
	// of [Chunk.Tokens] over the chunks that yield accepted.
	CompletionTokens int
	// TotalTokens is PromptTokens + CompletionTokens.
	TotalTokens int
}

// Model is a deterministic fake language model. Create one with [New]. A
// Model is safe for concurrent use by multiple goroutines; it is immutable
// but for its rate limit (see [WithRateLimit]).
type Model struct {
	chunkDelay  time.Duration
	chunkTokens int
	limit       *rateLimit
}

// Option configures a [Model].
type Option interface {
	apply(m *Model)
}

type optionFunc func(m *Model)

func (f optionFunc) apply(m *Model) { f(m) }

// WithChunkDelay makes [Model.Complete] wait d before yielding each chunk, so
// that a demo looks like a model streaming its answer. The wait ends early if
// the context is cancelled. The default is 0 (no delay); negative values are
// treated as 0.
func WithChunkDelay(d time.Duration) Option {
	return optionFunc(func(m *Model) { m.chunkDelay = max(d, 0) })
}

// WithChunkTokens sets how many completion tokens [Model.Complete] puts in
// each [Chunk]; the last chunk may hold fewer. The default is 4; values below
// 1 are treated as 1.
func WithChunkTokens(n int) Option {
	return optionFunc(func(m *Model) { m.chunkTokens = max(n, 1) })
}

// New returns a [Model] configured by opts.
func New(opts ...Option) *Model {
	m := &Model{chunkTokens: defaultChunkTokens}
	for _, opt := range opts {
		opt.apply(m)
	}
	return m
}

// CountTokens estimates the number of tokens in text the way rules of thumb
// for real tokenizers do: one token per four bytes, rounded up, and at least
// one token even for empty text (real APIs charge for message framing).
func CountTokens(text string) int {
	return max((len(text)+3)/4, 1)
}

// Complete generates a completion for prompt and passes it to yield one
// [Chunk] at a time, in order. It returns the [Usage] of the call.
//
// The completion is deterministic: the same prompt, maxTokens and options
// always give the same chunks, and the completion for a smaller maxTokens is a prefix of
// the completion for a larger one. Left alone, the model stops at the end of
// the first sentence that takes it past a prompt-dependent length of 64 to 319
// tokens (so a completion has at most 335 tokens); it never emits more than
// maxTokens completion tokens. maxTokens must be positive, or
// Complete returns an error wrapping [ErrInvalidArgument] without calling
// yield. A model with a rate limit ([WithRateLimit]) first charges the
// prompt's tokens plus maxTokens, and refuses a call it cannot pay with a
// [*RateLimitError] (wrapping [ErrRateLimited]), without calling yield.
//
// Complete stops early if ctx is done (returning ctx's error) or if yield
// returns an error (returning that error). In both cases the returned Usage
// still counts the prompt and the chunks yield accepted (returned nil for) so
// far, which is what a caller should bill.
func (m *Model) Complete(ctx context.Context, prompt string, maxTokens int, yield func(Chunk) error) (Usage, error) {
	if maxTokens <= 0 {
		return Usage{}, fmt.Errorf("%w: maxTokens %d must be positive", ErrInvalidArgument, maxTokens)
	}
	usage := Usage{PromptTokens: CountTokens(prompt)}
	if m.limit != nil {
		if err := m.limit.take(usage.PromptTokens + maxTokens); err != nil {
			return Usage{}, err
		}
	}
	usage.TotalTokens = usage.PromptTokens
	tokens := generate(prompt, maxTokens)
	for start := 0; start < len(tokens); start += m.chunkTokens {
		if err := m.wait(ctx); err != nil {
			return usage, err
		}
		end := min(start+m.chunkTokens, len(tokens))
		chunk := Chunk{Text: strings.Join(tokens[start:end], ""), Tokens: end - start}
		if err := yield(chunk); err != nil {
			return usage, err
		}
		usage.CompletionTokens += chunk.Tokens
		usage.TotalTokens += chunk.Tokens
	}
	return usage, nil
}

// wait sleeps for the chunk delay, or until ctx is done.
func (m *Model) wait(ctx context.Context) error {
	if m.chunkDelay <= 0 {
		return ctx.Err()
	}
	timer := time.NewTimer(m.chunkDelay)
	defer timer.Stop()
	select {
	case <-ctx.Done():
		return ctx.Err()
	case <-timer.C:
		return nil
	}
}

// The fixed vocabulary completions are drawn from, by part of speech.
var (
	determiners = []string{"the", "each", "every", "a", "this", "one"}
	adjectives  = []string{
		"shared", "expensive", "cheap", "distributed", "fair", "streaming",
		"deterministic", "global", "remaining", "steady", "independent", "noisy",
	}
	nouns = []string{
		"model", "request", "bucket", "limit", "token", "client", "server",
		"quota", "budget", "tenant", "stream", "response", "prompt",
		"completion", "cache", "policy", "header", "interceptor", "window", "key",
	}
	verbs = []string{
		"protects", "limits", "charges", "refills", "tracks", "denies", "allows",
		"spends", "measures", "delays", "shapes", "balances", "reduces", "shares",
		"streams", "caches",
	}
	conjunctions = []string{"because", "while", "when", "so", "and", "but"}
	// instructionWords are prompt words that ask for a completion rather
	// than say what it is about, so they never become topic nouns.
	instructionWords = []string{"write", "short", "report", "about", "explain", "describe", "summarize", "please"}
)

// generator produces the token sequence of one completion.
type generator struct {
	rng    splitMix64
	topic  []string // the prompt's words, used as extra nouns
	tokens []string
}

// generate returns the completion for prompt as a list of tokens, at most
// maxTokens long. Every token is one word (with its leading space) or one
// punctuation mark. Sentences follow the pattern "Determiner [adjective] noun
// verb determiner [adjective] noun[, conjunction ...]." so the output reads
// like (very bland) prose.
func generate(prompt string, maxTokens int) []string {
	h := fnv.New64a()
	_, _ = h.Write([]byte(prompt)) // hash.Hash.Write never fails
	g := &generator{rng: splitMix64(h.Sum64())}
	for _, term := range terms(prompt) {
		if !slices.Contains(instructionWords, term) {
			g.topic = append(g.topic, term)
		}
	}
	natural := minNaturalTokens + int(g.rng.next()%naturalTokensSpread)

	// A sentence has at most 17 tokens, so the loop overshoots natural by
	// fewer than 32 tokens.
	g.tokens = make([]string, 0, min(maxTokens, natural+32))
	for len(g.tokens) < natural && len(g.tokens) < maxTokens {
		g.clause(true)
		if g.rng.next()%3 == 0 {
			g.emit(",")
			g.word(conjunctions)
			g.clause(false)
		}
		g.emit(".")
	}
	return g.tokens[:min(len(g.tokens), maxTokens)]
}

// clause emits "determiner [adjective] noun verb determiner [adjective] noun".
func (g *generator) clause(capital bool) {
	g.nounPhrase(capital)
	g.word(verbs)
	g.nounPhrase(false)
}

// nounPhrase emits "determiner [adjective] noun", using "an" before a vowel.
func (g *generator) nounPhrase(capital bool) {
	det := g.pick(determiners)
	var adj string
	if g.rng.next()%2 == 0 {
		adj = g.pick(adjectives)
	}
	noun := g.pick(nouns)
	if len(g.topic) > 0 && g.rng.next()%3 == 0 {
		noun = g.pick(g.topic)
	}
	next := noun
	if adj != "" {
		next = adj
	}
	if det == "a" && strings.ContainsRune("aeiou", rune(next[0])) {
		det = "an"
	}
	if capital {
		det = capitalize(det)
	}
	g.emitWord(det)
	if adj != "" {
		g.emitWord(adj)
	}
	g.emitWord(noun)
}

// word emits a word picked from list.
func (g *generator) word(list []string) { g.emitWord(g.pick(list)) }

// pick returns a pseudo-random element of list.
func (g *generator) pick(list []string) string {
	return list[g.rng.next()%uint64(len(list))]
}

// emitWord emits word as a token, preceded by a space unless it starts the
// completion.
func (g *generator) emitWord(word string) {
	if len(g.tokens) > 0 {
		word = " " + word
	}
	g.emit(word)
}

// emit appends one token.
func (g *generator) emit(token string) { g.tokens = append(g.tokens, token) }

// capitalize upper-cases the first letter of word.
func capitalize(word string) string {
	r, size := utf8.DecodeRuneInString(word)
	return string(unicode.ToUpper(r)) + word[size:]
}

// splitMix64 is the SplitMix64 pseudo-random generator. It is written out
// here, rather than taken from math/rand, so that completions stay the same
// across Go releases.
type splitMix64 uint64

func (s *splitMix64) next() uint64 {
	*s += 0x9e3779b97f4a7c15
	z := uint64(*s)
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9
	z = (z ^ (z >> 27)) * 0x94d049bb133111eb
	return z ^ (z >> 31)
}
