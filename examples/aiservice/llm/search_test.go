package llm_test

import (
	"errors"
	"slices"
	"testing"

	"github.com/connectlimit/connectlimit/examples/aiservice/llm"
)

func TestSearch(t *testing.T) {
	t.Parallel()
	tests := []struct {
		name       string
		query      string
		topK       int
		wantTitles []string // checked as a prefix of the result titles
		wantN      int
		wantErr    error
	}{
		{name: "best match first", query: "redis cluster hash tags", topK: 3, wantTitles: []string{"Redis Cluster hash tags", "Distributed rate limiting with Redis"}, wantN: 2},
		{name: "plural and case folded", query: "TOKEN BUCKET", topK: 1, wantTitles: []string{"Token buckets"}, wantN: 1},
		{name: "default topK", query: "rate limit tokens", topK: 0, wantN: llm.DefaultTopK},
		{name: "clamped topK returns every match", query: "the rate", topK: 1000, wantN: 10},
		{name: "stopwords only", query: "what is the", topK: 5, wantN: 0},
		{name: "empty query", query: "", topK: 5, wantN: 0},
		{name: "no match", query: "zebra", topK: 5, wantN: 0},
		{name: "negative topK", query: "rate", topK: -1, wantErr: llm.ErrInvalidArgument},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			t.Parallel()
			results, err := llm.Search(tt.query, tt.topK)
			if !errors.Is(err, tt.wantErr) {
				t.Fatalf("Search(%q, %d) error = %v, want %v", tt.query, tt.topK, err, tt.wantErr)
			}
			if len(results) != tt.wantN {
				t.Errorf("Search(%q, %d) returned %d results, want %d: %+v", tt.query, tt.topK, len(results), tt.wantN, results)
			}
			titles := make([]string, len(results))
			for i, r := range results {
				titles[i] = r.Title
				if r.Score <= 0 || r.Score > 1 {
					t.Errorf("result %q has score %v, want (0, 1]", r.Title, r.Score)
				}
				if r.Snippet == "" {
					t.Errorf("result %q has an empty snippet", r.Title)
				}
				if i > 0 && r.Score > results[i-1].Score {
					t.Errorf("results not sorted by score: %v after %v", r.Score, results[i-1].Score)
				}
			}
			if len(titles) < len(tt.wantTitles) || !slices.Equal(titles[:len(tt.wantTitles)], tt.wantTitles) {
				t.Errorf("titles = %q, want prefix %q", titles, tt.wantTitles)
			}
			again, _ := llm.Search(tt.query, tt.topK)
			if !slices.Equal(results, again) {
				t.Errorf("Search is not deterministic: %+v then %+v", results, again)
			}
		})
	}
}
