package llm_test

import (
	"context"
	"errors"
	"strings"
	"testing"
	"time"

	"github.com/connectlimit/connectlimit/examples/aiservice/llm"
)

// complete runs Complete and collects the chunks it yields.
func complete(ctx context.Context, t *testing.T, m *llm.Model, prompt string, maxTokens int) ([]llm.Chunk, llm.Usage) {
	t.Helper()
	var chunks []llm.Chunk
	usage, err := m.Complete(ctx, prompt, maxTokens, func(c llm.Chunk) error {
		chunks = append(chunks, c)
		return nil
	})
	if err != nil {
		t.Fatalf("Complete(%q, %d): %v", prompt, maxTokens, err)
	}
	return chunks, usage
}

func joinText(chunks []llm.Chunk) string {
	var b strings.Builder
	for _, c := range chunks {
		b.WriteString(c.Text)
	}
	return b.String()
}

func TestCompleteUsageAndBounds(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name            string
		opts            []llm.Option
		prompt          string
		maxTokens       int
		wantCompletion  int // 0 means "model's natural length", checked to be within bounds
		wantChunkTokens int
	}{
		{name: "one token", prompt: "rate limits", maxTokens: 1, wantCompletion: 1, wantChunkTokens: 4},
		{name: "cut short", prompt: "rate limits", maxTokens: 10, wantCompletion: 10, wantChunkTokens: 4},
		{name: "natural stop", prompt: "rate limits", maxTokens: 32768, wantChunkTokens: 4},
		{name: "empty prompt", prompt: "", maxTokens: 50, wantCompletion: 50, wantChunkTokens: 4},
		{name: "unicode prompt", prompt: "Ratenbegrenzung für Modelle ✓", maxTokens: 2000, wantChunkTokens: 4},
		{name: "chunk size 1", opts: []llm.Option{llm.WithChunkTokens(1)}, prompt: "tokens", maxTokens: 7, wantCompletion: 7, wantChunkTokens: 1},
		{name: "chunk size clamped", opts: []llm.Option{llm.WithChunkTokens(-3)}, prompt: "tokens", maxTokens: 5, wantCompletion: 5, wantChunkTokens: 1},
		{name: "big chunks", opts: []llm.Option{llm.WithChunkTokens(100)}, prompt: "buckets", maxTokens: 250, wantChunkTokens: 100},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			chunks, usage := complete(t.Context(), t, llm.New(tt.opts...), tt.prompt, tt.maxTokens)
			sum := 0
			for i, c := range chunks {
				if c.Tokens < 1 || c.Tokens > tt.wantChunkTokens {
					t.Errorf("chunk %d has %d tokens, want 1..%d", i, c.Tokens, tt.wantChunkTokens)
				}
				if i < len(chunks)-1 && c.Tokens != tt.wantChunkTokens {
					t.Errorf("non-final chunk %d has %d tokens, want %d", i, c.Tokens, tt.wantChunkTokens)
				}
				if c.Text == "" {
					t.Errorf("chunk %d is empty", i)
				}
				sum += c.Tokens
			}
			if usage.CompletionTokens != sum {
				t.Errorf("CompletionTokens = %d, sum of chunk tokens = %d", usage.CompletionTokens, sum)
			}
			if want := llm.CountTokens(tt.prompt); usage.PromptTokens != want {
				t.Errorf("PromptTokens = %d, want %d", usage.PromptTokens, want)
			}
			if usage.TotalTokens != usage.PromptTokens+usage.CompletionTokens {
				t.Errorf("TotalTokens = %d, want %d", usage.TotalTokens, usage.PromptTokens+usage.CompletionTokens)
			}
			if usage.CompletionTokens > tt.maxTokens {
				t.Errorf("CompletionTokens = %d exceeds maxTokens %d", usage.CompletionTokens, tt.maxTokens)
			}
			if tt.wantCompletion != 0 && usage.CompletionTokens != tt.wantCompletion {
				t.Errorf("CompletionTokens = %d, want %d", usage.CompletionTokens, tt.wantCompletion)
			}
			if tt.wantCompletion == 0 {
				if usage.CompletionTokens < 64 || usage.CompletionTokens > 335 {
					t.Errorf("natural CompletionTokens = %d, want within [64, 335]", usage.CompletionTokens)
				}
				if text := joinText(chunks); !strings.HasSuffix(text, ".") {
					t.Errorf("natural completion does not end a sentence: %q", text[max(len(text)-20, 0):])
				}
			}
		})
	}
}

func TestCompleteDeterministic(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name   string
		prompt string
	}{
		{name: "simple", prompt: "Write a short report about token buckets."},
		{name: "empty", prompt: ""},
		{name: "unicode", prompt: "速率限制"},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			first, firstUsage := complete(t.Context(), t, llm.New(), tt.prompt, 1000)
			again, againUsage := complete(t.Context(), t, llm.New(llm.WithChunkTokens(3)), tt.prompt, 1000)
			if joinText(first) != joinText(again) || firstUsage != againUsage {
				t.Errorf("two runs differ:\n%q %+v\n%q %+v", joinText(first), firstUsage, joinText(again), againUsage)
			}
			short, _ := complete(t.Context(), t, llm.New(), tt.prompt, 17)
			if !strings.HasPrefix(joinText(first), joinText(short)) {
				t.Errorf("completion with maxTokens 17 %q is not a prefix of %q", joinText(short), joinText(first))
			}
			other, _ := complete(t.Context(), t, llm.New(), tt.prompt+" (other)", 1000)
			if joinText(other) == joinText(first) {
				t.Errorf("different prompts gave the same completion %q", joinText(first))
			}
		})
	}
}

func TestCompleteStopsEarly(t *testing.T) {
	t.Parallel()
	errStop := errors.New("client went away")
	tests := []struct {
		name           string
		preCancel      bool
		delay          time.Duration
		cancelAfter    int // cancel the context while yielding this many chunks
		failAfter      int // return errStop from the yield of this many chunks
		wantErr        error
		wantCompletion int
	}{
		{name: "cancelled before start", preCancel: true, delay: time.Hour, wantErr: context.Canceled, wantCompletion: 0},
		{name: "cancelled mid stream", cancelAfter: 2, wantErr: context.Canceled, wantCompletion: 8},
		{name: "yield fails", failAfter: 3, wantErr: errStop, wantCompletion: 8},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			ctx, cancel := context.WithCancel(t.Context())
			defer cancel()
			if tt.preCancel {
				cancel()
			}
			// An hour-long delay proves that waiting ends as soon as ctx is done.
			m := llm.New(llm.WithChunkDelay(tt.delay), llm.WithChunkTokens(4))
			calls := 0
			usage, err := m.Complete(ctx, "cancel me", 1000, func(llm.Chunk) error {
				calls++
				if calls == tt.failAfter {
					return errStop
				}
				if calls == tt.cancelAfter {
					cancel()
				}
				return nil
			})
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("Complete error = %v, want %v", err, tt.wantErr)
			}
			if usage.CompletionTokens != tt.wantCompletion {
				t.Errorf("CompletionTokens = %d, want %d", usage.CompletionTokens, tt.wantCompletion)
			}
			if usage.TotalTokens != usage.PromptTokens+usage.CompletionTokens || usage.PromptTokens < 1 {
				t.Errorf("inconsistent usage %+v", usage)
			}
		})
	}
}

func TestCompleteDelayCancelled(t *testing.T) {
	t.Parallel()
	ctx, cancel := context.WithCancel(t.Context())
	m := llm.New(llm.WithChunkDelay(time.Hour))
	calls := 0
	done := make(chan error, 1)
	go func() {
		_, err := m.Complete(ctx, "slow", 100, func(llm.Chunk) error {
			calls++
			return nil
		})
		done <- err
	}()
	cancel()
	if err := <-done; !errors.Is(err, context.Canceled) {
		t.Fatalf("Complete error = %v, want context.Canceled", err)
	}
	if calls != 0 {
		t.Errorf("yield called %d times, want 0", calls)
	}
}

func TestCompleteInvalid(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name      string
		maxTokens int
	}{
		{name: "zero", maxTokens: 0},
		{name: "negative", maxTokens: -5},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			_, err := llm.New().Complete(t.Context(), "x", tt.maxTokens, func(llm.Chunk) error {
				t.Error("yield called")
				return nil
			})
			if !errors.Is(err, llm.ErrInvalidArgument) {
				t.Errorf("Complete error = %v, want ErrInvalidArgument", err)
			}
		})
	}
}

func TestCountTokens(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name string
		text string
		want int
	}{
		{name: "empty", text: "", want: 1},
		{name: "one byte", text: "a", want: 1},
		{name: "four bytes", text: "abcd", want: 1},
		{name: "five bytes", text: "abcde", want: 2},
		{name: "sentence", text: "Write a short report about token buckets.", want: 11},
		{name: "multibyte", text: "✓✓", want: 2},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			if got := llm.CountTokens(tt.text); got != tt.want {
				t.Errorf("CountTokens(%q) = %d, want %d", tt.text, got, tt.want)
			}
		})
	}
}
