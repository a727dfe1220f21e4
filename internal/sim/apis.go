package sim

import (
	"encoding/base64"
	"encoding/binary"
	"encoding/json"
	"errors"
	"fmt"
	"math"
	"net/http"
	"strings"
	"time"
)

// The APIs beyond chat and text completions that clients of a vLLM server
// use: embeddings, OpenAI's Responses API and Anthropic's Messages API,
// each in its own shape, on the same engine.

// textOf returns the text of a JSON value as llmsim tokenizes it: a
// string's content, or for anything else (content parts, items, blocks) its
// JSON.
func textOf(v json.RawMessage) string {
	var s string
	if json.Unmarshal(v, &s) == nil {
		return s
	}
	return string(v)
}

// embeddings answers POST /v1/embeddings: one vector per input (a string
// or a list of strings), after prefilling all of them.
func (s *Server) embeddings(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Input          json.RawMessage `json:"input"`
		EncodingFormat string          `json:"encoding_format"`
	}
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		apiError(w, 400, "invalid_json", err.Error())
		return
	}
	var inputs []string
	if err := json.Unmarshal(req.Input, &inputs); err != nil {
		inputs = []string{textOf(req.Input)}
	}
	var toks []uint32
	for _, in := range inputs {
		toks = append(toks, Tokenize(in)...)
	}
	if len(toks) == 0 {
		apiError(w, 400, "invalid_prompt", "empty input")
		return
	}
	// A prefill and one step: an embedding is a prompt's pass, no decoding.
	sq, ok := s.submit(w, r, toks, 1)
	if !ok {
		return
	}
	for range sq.events {
	}
	if r.Context().Err() != nil {
		return
	}
	data := make([]any, len(inputs))
	for i, in := range inputs {
		vec := make([]float32, 8)
		for j, id := range Tokenize(in) {
			vec[j%8] += float32(id%1000) / 1000
		}
		var embedding any = vec
		if req.EncodingFormat == "base64" {
			// Little-endian float32s, base64-encoded, as OpenAI's API sends
			// them when asked (the JavaScript and Python SDKs ask by default).
			b := make([]byte, 0, 4*len(vec))
			for _, v := range vec {
				b = binary.LittleEndian.AppendUint32(b, math.Float32bits(v))
			}
			embedding = base64.StdEncoding.EncodeToString(b)
		}
		data[i] = map[string]any{"object": "embedding", "index": i, "embedding": embedding}
	}
	writeJSON(w, 200, map[string]any{"object": "list", "model": s.cfg.Model, "data": data,
		"usage": map[string]int{"prompt_tokens": len(toks), "total_tokens": len(toks)}})
}

// submit queues toks on the engine with an output limit, answering the
// request itself (and returning ok false) when the engine refuses.
func (s *Server) submit(w http.ResponseWriter, r *http.Request, toks []uint32, maxOut int) (*seq, bool) {
	sq, err := s.eng.submit(r.Context(), toks, maxOut, ownLength(r))
	switch {
	case errors.Is(err, errStopped):
		apiError(w, 503, "shutting_down", err.Error())
		return nil, false
	case err != nil:
		apiError(w, 400, "context_length_exceeded", err.Error())
		return nil, false
	}
	return sq, true
}

// sse writes server-sent events, each flushed: with an event name first
// when name is not "".
type sse struct {
	w  http.ResponseWriter
	fl http.Flusher
}

func startSSE(w http.ResponseWriter) sse {
	w.Header().Set("content-type", "text/event-stream")
	w.Header().Set("cache-control", "no-cache")
	w.WriteHeader(http.StatusOK)
	fl, _ := w.(http.Flusher)
	if fl != nil {
		fl.Flush()
	}
	return sse{w, fl}
}

func (e sse) send(name string, v any) {
	b, _ := json.Marshal(v)
	if name != "" {
		fmt.Fprintf(e.w, "event: %s\n", name)
	}
	fmt.Fprintf(e.w, "data: %s\n\n", b)
	if e.fl != nil {
		e.fl.Flush()
	}
}

// responses answers OpenAI's Responses API (POST /v1/responses), whole or
// as its stream of typed events.
func (s *Server) responses(w http.ResponseWriter, r *http.Request) {
	var req struct {
		Input           json.RawMessage `json:"input"`
		Instructions    string          `json:"instructions"`
		MaxOutputTokens int             `json:"max_output_tokens"`
		Stream          bool            `json:"stream"`
	}
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		apiError(w, 400, "invalid_json", err.Error())
		return
	}
	toks := append(Tokenize(req.Instructions), Tokenize(textOf(req.Input))...)
	if len(req.Input) == 0 || len(toks) == 0 {
		apiError(w, 400, "invalid_prompt", "empty input")
		return
	}
	sq, ok := s.submit(w, r, toks, req.MaxOutputTokens)
	if !ok {
		return
	}
	rs := response{id: fmt.Sprintf("resp_%p", sq), model: s.cfg.Model, created: time.Now().Unix(), input: len(toks), sq: sq}
	if !req.Stream {
		n := 0
		for n = range sq.events {
		}
		if r.Context().Err() == nil {
			writeJSON(w, 200, rs.object(rs.end(), n))
		}
		return
	}
	rs.stream(w, r)
}

// response is one Responses API answer.
type response struct {
	id, model string
	created   int64
	input     int // prompt tokens
	sq        *seq
}

func (rs response) item() string { return "msg_" + rs.id[5:] }

// end is the response's final status.
func (rs response) end() string {
	if rs.sq.finish == "length" {
		return "incomplete"
	}
	return "completed"
}

// object is the response object with status, after n output tokens.
func (rs response) object(status string, n int) map[string]any {
	o := map[string]any{"id": rs.id, "object": "response", "created_at": rs.created, "model": rs.model, "status": status,
		"output": []any{}, "incomplete_details": nil, "error": nil,
		"usage": map[string]any{"input_tokens": rs.input, "output_tokens": n, "total_tokens": rs.input + n}}
	if status != "in_progress" {
		o["output"] = []any{rs.message(status, strings.Repeat("tok ", n))}
	}
	if status == "incomplete" {
		o["incomplete_details"] = map[string]string{"reason": "max_output_tokens"}
	}
	return o
}

// message is the response's one output item.
func (rs response) message(status, text string) map[string]any {
	content := []any{}
	if status != "in_progress" {
		content = append(content, part(text))
	}
	return map[string]any{"type": "message", "id": rs.item(), "status": status, "role": "assistant", "content": content}
}

// stream sends the Responses API's event sequence, as the SDKs' stream
// helpers expect it: the response, its message item and text part opened,
// the text deltas, each closed, then the response's end.
func (rs response) stream(w http.ResponseWriter, r *http.Request) {
	ev := startSSE(w)
	seqNo := 0
	send := func(typ string, v map[string]any) {
		v["type"], v["sequence_number"] = typ, seqNo
		seqNo++
		ev.send(typ, v)
	}
	at := func(v map[string]any) map[string]any {
		v["item_id"], v["output_index"], v["content_index"] = rs.item(), 0, 0
		return v
	}
	send("response.created", map[string]any{"response": rs.object("in_progress", 0)})
	send("response.in_progress", map[string]any{"response": rs.object("in_progress", 0)})
	send("response.output_item.added", map[string]any{"output_index": 0, "item": rs.message("in_progress", "")})
	send("response.content_part.added", at(map[string]any{"part": part("")}))
	n := 0
	for n = range rs.sq.events {
		send("response.output_text.delta", at(map[string]any{"delta": "tok ", "logprobs": []any{}}))
	}
	if r.Context().Err() != nil {
		return
	}
	text := strings.Repeat("tok ", n)
	send("response.output_text.done", at(map[string]any{"text": text, "logprobs": []any{}}))
	send("response.content_part.done", at(map[string]any{"part": part(text)}))
	status := rs.end()
	send("response.output_item.done", map[string]any{"output_index": 0, "item": rs.message(status, text)})
	name := "response.completed"
	if status == "incomplete" {
		name = "response.incomplete"
	}
	send(name, map[string]any{"response": rs.object(status, n)})
}

// part is an output_text content part of a Responses API message.
func part(text string) map[string]any {
	return map[string]any{"type": "output_text", "text": text, "annotations": []any{}, "logprobs": []any{}}
}

// messages answers Anthropic's Messages API (POST /v1/messages), whole or
// as its stream of events; its errors are in Anthropic's shape.
func (s *Server) messages(w http.ResponseWriter, r *http.Request) {
	var req struct {
		System   json.RawMessage `json:"system"`
		Messages []struct {
			Role    string          `json:"role"`
			Content json.RawMessage `json:"content"`
		} `json:"messages"`
		MaxTokens int  `json:"max_tokens"`
		Stream    bool `json:"stream"`
	}
	if err := json.NewDecoder(r.Body).Decode(&req); err != nil {
		anthropicError(w, 400, "invalid_request_error", err.Error())
		return
	}
	if req.MaxTokens <= 0 || len(req.Messages) == 0 {
		anthropicError(w, 400, "invalid_request_error", "max_tokens and messages are required")
		return
	}
	var toks []uint32
	if len(req.System) > 0 {
		toks = Tokenize(textOf(req.System))
	}
	for _, m := range req.Messages {
		toks = append(toks, Tokenize("<|start|> "+m.Role+" <|content|> "+textOf(m.Content)+" <|end|>")...)
	}
	sq, err := s.eng.submit(r.Context(), toks, req.MaxTokens, ownLength(r))
	switch {
	case errors.Is(err, errStopped):
		anthropicError(w, 529, "overloaded_error", err.Error())
		return
	case err != nil:
		anthropicError(w, 400, "invalid_request_error", err.Error())
		return
	}
	id := fmt.Sprintf("msg_%p", sq)
	stop := func() string {
		if sq.finish == "length" {
			return "max_tokens"
		}
		return "end_turn"
	}
	if !req.Stream {
		n := 0
		for n = range sq.events {
		}
		if r.Context().Err() == nil {
			writeJSON(w, 200, map[string]any{"id": id, "type": "message", "role": "assistant", "model": s.cfg.Model,
				"content":     []any{map[string]any{"type": "text", "text": strings.Repeat("tok ", n)}},
				"stop_reason": stop(), "stop_sequence": nil,
				"usage": map[string]int{"input_tokens": len(toks), "output_tokens": n}})
		}
		return
	}
	ev := startSSE(w)
	ev.send("message_start", map[string]any{"type": "message_start", "message": map[string]any{"id": id, "type": "message",
		"role": "assistant", "model": s.cfg.Model, "content": []any{}, "stop_reason": nil, "stop_sequence": nil,
		"usage": map[string]int{"input_tokens": len(toks), "output_tokens": 0}}})
	ev.send("content_block_start", map[string]any{"type": "content_block_start", "index": 0,
		"content_block": map[string]string{"type": "text", "text": ""}})
	n := 0
	for n = range sq.events {
		ev.send("content_block_delta", map[string]any{"type": "content_block_delta", "index": 0,
			"delta": map[string]string{"type": "text_delta", "text": "tok "}})
	}
	if r.Context().Err() != nil {
		return
	}
	ev.send("content_block_stop", map[string]any{"type": "content_block_stop", "index": 0})
	ev.send("message_delta", map[string]any{"type": "message_delta", "delta": map[string]any{"stop_reason": stop(), "stop_sequence": nil},
		"usage": map[string]int{"output_tokens": n}})
	ev.send("message_stop", map[string]any{"type": "message_stop"})
}

// anthropicError answers in Anthropic's error shape.
func anthropicError(w http.ResponseWriter, status int, typ, msg string) {
	writeJSON(w, status, map[string]any{"type": "error", "error": map[string]string{"type": typ, "message": msg}})
}
