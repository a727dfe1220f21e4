package route

import (
	"encoding/json"
	"net/url"
	"strings"

	"github.com/tokenlb/tokenlb/llmapi"
	"github.com/tokenlb/tokenlb/processor"
)

// modelsPath is the list of models, in OpenAI's API and in Anthropic's.
const modelsPath = "/v1/models"

// models answers GET /v1/models and GET /v1/models/{id} itself, from the
// models the routable hosts serve (picker.Picker.Models): routed to one
// host, the list would be that host's alone, and with hosts serving
// different models a client would see models come and go. ok is false when
// the request is not one of these, or no host's list is known (model
// discovery off): the request is then routed as any other.
func (rt *Router) models(r *processor.Request) (answer *processor.Rejection, ok bool) {
	if r.Method != "GET" {
		return nil, false
	}
	path, _, _ := strings.Cut(r.Path, "?")
	id, one := strings.CutPrefix(path, modelsPath+"/")
	if path != modelsPath && (!one || id == "") {
		return nil, false
	}
	if one {
		// SDKs percent-encode the id (a model named org/name).
		unescaped, err := url.PathUnescape(id)
		if err != nil {
			return nil, false
		}
		id = unescaped
	}
	served, known := rt.cfg.Picker.Models()
	if !known {
		return nil, false
	}
	if one {
		for _, m := range served {
			if m == id {
				return modelsAnswer(modelObject(m, r.Anthropic)), true
			}
		}
		rej := errUnknownModel(id)
		if r.Anthropic {
			rej.Body = rej.Error.Body(llmapi.Messages, rej.Status)
		}
		return rej, true
	}
	if r.Anthropic {
		// Anthropic's list: data, has_more, first_id, last_id.
		list := struct {
			Data    []any   `json:"data"`
			HasMore bool    `json:"has_more"`
			FirstID *string `json:"first_id"`
			LastID  *string `json:"last_id"`
		}{Data: []any{}}
		for _, m := range served {
			list.Data = append(list.Data, modelObject(m, true))
		}
		if len(served) > 0 {
			list.FirstID, list.LastID = &served[0], &served[len(served)-1]
		}
		return modelsAnswer(list), true
	}
	list := struct {
		Object string `json:"object"`
		Data   []any  `json:"data"`
	}{Object: "list", Data: []any{}}
	for _, m := range served {
		list.Data = append(list.Data, modelObject(m, false))
	}
	return modelsAnswer(list), true
}

// modelObject is one model in the list, in OpenAI's shape or Anthropic's.
// tokenlb knows a model's name only: no creation time or owner.
func modelObject(id string, anthropic bool) any {
	if anthropic {
		return struct {
			Type        string `json:"type"`
			ID          string `json:"id"`
			DisplayName string `json:"display_name"`
			CreatedAt   string `json:"created_at"`
		}{"model", id, id, "1970-01-01T00:00:00Z"}
	}
	return struct {
		ID      string `json:"id"`
		Object  string `json:"object"`
		Created int64  `json:"created"`
		OwnedBy string `json:"owned_by"`
	}{id, "model", 0, "tokenlb"}
}

// modelsAnswer is a 200 with v as its JSON body.
func modelsAnswer(v any) *processor.Rejection {
	b, _ := json.Marshal(v)
	return &processor.Rejection{Status: 200, Reason: "models", Body: b}
}
