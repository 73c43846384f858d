package llm_test

import (
	"context"
	"fmt"

	"github.com/connectlimit/connectlimit/examples/aiservice/llm"
)

func ExampleModel_Complete() {
	model := llm.New(llm.WithChunkTokens(4))
	usage, err := model.Complete(context.Background(), "Write a short report about token buckets.", 10,
		func(chunk llm.Chunk) error {
			fmt.Printf("%q (%d tokens)\n", chunk.Text, chunk.Tokens)
			return nil
		})
	if err != nil {
		fmt.Println(err)
		return
	}
	fmt.Printf("%+v\n", usage)
	// Output:
	// "The response denies this" (4 tokens)
	// " distributed completion, so" (4 tokens)
	// " the global" (2 tokens)
	// {PromptTokens:11 CompletionTokens:10 TotalTokens:21}
}

func ExampleSearch() {
	results, err := llm.Search("How do token buckets refill?", 3)
	if err != nil {
		fmt.Println(err)
		return
	}
	for _, r := range results {
		fmt.Printf("%.2f %s: %s\n", r.Score, r.Title, r.Snippet)
	}
	// Output:
	// 1.00 Token buckets: A token bucket holds up to a fixed capacity of tokens and refills at a steady rate.
	// 0.33 Leaky buckets: A leaky bucket drains queued requests at a constant rate.
	// 0.33 Cost-aware rate limiting: Cost-aware rate limiting charges each procedure a different number of tokens.
}
