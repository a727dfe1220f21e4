package e2e

import (
	"context"
	"errors"
	"net"
	"net/http"
	"strings"
	"testing"
	"time"

	"github.com/anthropics/anthropic-sdk-go"
	aoption "github.com/anthropics/anthropic-sdk-go/option"
	"github.com/openai/openai-go/v3"
	"github.com/openai/openai-go/v3/option"
	"github.com/openai/openai-go/v3/responses"
	"github.com/openai/openai-go/v3/shared"

	"github.com/tokenlb/tokenlb/internal/envoycfg"
	"github.com/tokenlb/tokenlb/internal/sim"
)

// simStack is Envoy (deploy/envoy.yaml) + tokenlb + three llmsim backends,
// for the official SDKs: real servers of every API they call.
type simStack struct {
	envoy   *envoy
	tokenlb *tokenlb
}

// startSimStack starts three llmsim backends on loopback, tokenlb over them
// with model routing (their models discovered), and Envoy.
func startSimStack(t *testing.T) *simStack {
	t.Helper()
	var addrs []string
	for i := range 3 {
		l, err := net.Listen("tcp", "127.0.0.1:0")
		if err != nil {
			t.Fatal(err)
		}
		s := sim.New(sim.Config{TimeScale: 0.02, OutputMedian: 20, IgnoreEOS: true, Seed: uint64(i + 1)})
		ctx, cancel := context.WithCancel(context.Background())
		go s.Run(ctx)
		srv := &http.Server{Handler: s}
		go srv.Serve(l)
		t.Cleanup(func() { srv.Close(); cancel() })
		addrs = append(addrs, l.Addr().String())
	}
	st := &simStack{tokenlb: startTokenlb(t, addrs, "--model-routing", "--model-discovery-interval=50ms")}
	waitFor(t, 5*time.Second, "every host's models discovered", func() bool {
		for _, h := range st.tokenlb.hostLoads() {
			if h.Models == nil {
				return false
			}
		}
		return true
	})
	st.envoy = startEnvoy(t, envoyOpts{config: "envoy.yaml", Options: envoycfg.Options{TokenlbPort: st.tokenlb.grpcPort, Backends: addrs}})
	return st
}

func (s *simStack) openai() openai.Client {
	return openai.NewClient(option.WithBaseURL(s.envoy.url("/v1/")), option.WithAPIKey("unused"), option.WithMaxRetries(0))
}

// TestOpenAIClient: the official OpenAI Go SDK, through Envoy and tokenlb
// to llmsim, on every API tokenlb counts: each call succeeds as it would
// against a vLLM server, errors are typed, and no load is left behind.
func TestOpenAIClient(t *testing.T) {
	s := startSimStack(t)
	client := s.openai()
	ctx := context.Background()
	const model = "llmsim"
	user := []openai.ChatCompletionMessageParamUnion{openai.UserMessage("Say something about load balancing.")}

	t.Run("chat", func(t *testing.T) {
		c, err := client.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{Model: model, Messages: user,
			MaxCompletionTokens: openai.Int(8)})
		if err != nil || len(c.Choices) != 1 || c.Choices[0].Message.Content == "" || c.Usage.CompletionTokens != 8 ||
			c.Choices[0].FinishReason != "length" {
			t.Fatalf("%+v, %v", c, err)
		}
	})
	t.Run("chat stream with usage", func(t *testing.T) {
		stream := client.Chat.Completions.NewStreaming(ctx, openai.ChatCompletionNewParams{Model: model, Messages: user,
			StreamOptions: openai.ChatCompletionStreamOptionsParam{IncludeUsage: openai.Bool(true)}})
		acc := openai.ChatCompletionAccumulator{}
		for stream.Next() {
			acc.AddChunk(stream.Current())
		}
		if err := stream.Err(); err != nil {
			t.Fatal(err)
		}
		if len(acc.Choices) != 1 || acc.Choices[0].FinishReason != "stop" || acc.Usage.CompletionTokens == 0 ||
			acc.Usage.PromptTokens == 0 {
			t.Fatalf("accumulated %+v", acc.ChatCompletion)
		}
	})
	t.Run("tools", func(t *testing.T) {
		c, err := client.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{Model: model, Messages: user, MaxTokens: openai.Int(4),
			Tools: []openai.ChatCompletionToolUnionParam{openai.ChatCompletionFunctionTool(shared.FunctionDefinitionParam{
				Name: "get_weather", Parameters: shared.FunctionParameters{"type": "object",
					"properties": map[string]any{"city": map[string]string{"type": "string"}}}})}})
		if err != nil || len(c.Choices) != 1 {
			t.Fatalf("%+v, %v", c, err)
		}
	})
	t.Run("completions", func(t *testing.T) {
		c, err := client.Completions.New(ctx, openai.CompletionNewParams{Model: model,
			Prompt: openai.CompletionNewParamsPromptUnion{OfString: openai.String("Once upon a time")}, MaxTokens: openai.Int(5)})
		if err != nil || len(c.Choices) != 1 || c.Usage.CompletionTokens != 5 {
			t.Fatalf("%+v, %v", c, err)
		}
	})
	t.Run("embeddings", func(t *testing.T) {
		e, err := client.Embeddings.New(ctx, openai.EmbeddingNewParams{Model: model,
			Input: openai.EmbeddingNewParamsInputUnion{OfArrayOfStrings: []string{"one text", "another text"}}})
		if err != nil || len(e.Data) != 2 || len(e.Data[1].Embedding) == 0 || e.Usage.PromptTokens == 0 {
			t.Fatalf("%+v, %v", e, err)
		}
	})
	t.Run("responses", func(t *testing.T) {
		r, err := client.Responses.New(ctx, responses.ResponseNewParams{Model: model,
			Input: responses.ResponseNewParamsInputUnion{OfString: openai.String("Write a haiku")}, MaxOutputTokens: openai.Int(6)})
		if err != nil || r.OutputText() == "" || r.Usage.OutputTokens != 6 || r.Status != responses.ResponseStatusIncomplete {
			t.Fatalf("%+v, %v", r, err)
		}
		stream := client.Responses.NewStreaming(ctx, responses.ResponseNewParams{Model: model,
			Input: responses.ResponseNewParamsInputUnion{OfString: openai.String("Write a haiku")}})
		var text strings.Builder
		completed := false
		for stream.Next() {
			ev := stream.Current()
			text.WriteString(ev.Delta)
			completed = completed || ev.Type == "response.completed"
		}
		if err := stream.Err(); err != nil || text.Len() == 0 || !completed {
			t.Fatalf("streamed %q, completed %v, %v", text.String(), completed, err)
		}
	})
	t.Run("models", func(t *testing.T) {
		page, err := client.Models.List(ctx)
		if err != nil || len(page.Data) != 1 || page.Data[0].ID != model {
			t.Fatalf("%+v, %v", page, err)
		}
	})
	t.Run("unknown model", func(t *testing.T) {
		_, err := client.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{Model: "gpt-nope", Messages: user})
		var apiErr *openai.Error
		if !errors.As(err, &apiErr) || apiErr.StatusCode != 404 || apiErr.Code != "model_not_found" {
			t.Fatalf("error %v, want a 404 model_not_found", err)
		}
	})
	t.Run("too large", func(t *testing.T) {
		big := strings.Repeat("word ", 9<<20/5)
		_, err := client.Chat.Completions.New(ctx, openai.ChatCompletionNewParams{Model: model,
			Messages: []openai.ChatCompletionMessageParamUnion{openai.UserMessage(big)}})
		var apiErr *openai.Error
		if !errors.As(err, &apiErr) || apiErr.StatusCode != 413 || apiErr.Code != "request_too_large" {
			t.Fatalf("error %v, want a 413 request_too_large", err)
		}
	})
	t.Run("cancelled mid-stream", func(t *testing.T) {
		cctx, cancel := context.WithCancel(ctx)
		stream := client.Chat.Completions.NewStreaming(cctx, openai.ChatCompletionNewParams{Model: model, Messages: user,
			MaxCompletionTokens: openai.Int(5000)})
		if !stream.Next() {
			t.Fatalf("no first chunk: %v", stream.Err())
		}
		if s.tokenlb.idle() {
			t.Fatal("nothing in flight while the stream runs")
		}
		cancel()
		stream.Close()
	})
	s.tokenlb.waitIdle()
}

// TestAnthropicClient: the official Anthropic Go SDK on /v1/messages,
// through Envoy and tokenlb to llmsim: whole and streamed, and tokenlb's
// own 404 in Anthropic's error shape, which the SDK types.
func TestAnthropicClient(t *testing.T) {
	s := startSimStack(t)
	client := anthropic.NewClient(aoption.WithBaseURL(s.envoy.url("/")), aoption.WithAPIKey("unused"), aoption.WithMaxRetries(0))
	ctx := context.Background()
	params := anthropic.MessageNewParams{Model: "llmsim", MaxTokens: 7,
		Messages: []anthropic.MessageParam{anthropic.NewUserMessage(anthropic.NewTextBlock("Say something."))}}

	m, err := client.Messages.New(ctx, params)
	if err != nil || len(m.Content) != 1 || m.Content[0].Text == "" || m.Usage.OutputTokens != 7 || m.StopReason != "max_tokens" {
		t.Fatalf("%+v, %v", m, err)
	}
	stream := client.Messages.NewStreaming(ctx, params)
	acc := anthropic.Message{}
	for stream.Next() {
		if err := acc.Accumulate(stream.Current()); err != nil {
			t.Fatal(err)
		}
	}
	if err := stream.Err(); err != nil || len(acc.Content) != 1 || acc.Content[0].Text == "" || acc.Usage.OutputTokens != 7 {
		t.Fatalf("accumulated %+v, %v", acc, err)
	}
	params.Model = "claude-nope"
	_, err = client.Messages.New(ctx, params)
	var apiErr *anthropic.Error
	if !errors.As(err, &apiErr) || apiErr.StatusCode != 404 || !strings.Contains(apiErr.RawJSON(), `"not_found_error"`) {
		t.Fatalf("error %v, want a 404 not_found_error", err)
	}
	s.tokenlb.waitIdle()
}
