package picker

// Release causes as a caller names them (package route names its own after
// how a response ends); the picker knows only Swept.
const (
	ResponseHeaders   Cause = "response_headers"
	ResponseEnd       Cause = "response_end"
	StreamEnd         Cause = "stream_end"
	ImmediateResponse Cause = "immediate_response"
)
