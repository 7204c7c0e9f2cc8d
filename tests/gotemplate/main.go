// Renders an Ollama Modelfile TEMPLATE with Go's text/template, the engine Ollama itself uses.
// stdin: {"template": "...", "messages": [{"role": "...", "content": "...", "tool_calls": [...]}], "tools": [...]};
// stdout: the rendered prompt.
//
// The data mirrors what Ollama hands a template: .Messages (each with .Role, .Content and .ToolCalls, a call being
// .Function.Name and .Function.Arguments) and .Tools. As in Ollama, a tool and a call's arguments print as JSON
// (Go's encoding/json, whose maps come out with sorted keys); here a tool is any JSON object, where Ollama's is a
// struct (api.Tool) whose fields print in their declared order.
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type JSONObject map[string]any

func (o JSONObject) String() string {
	b, err := json.Marshal(map[string]any(o))
	if err != nil {
		panic(err)
	}
	return string(b)
}

type ToolCall struct {
	Function struct {
		Name      string     `json:"name"`
		Arguments JSONObject `json:"arguments"`
	} `json:"function"`
}

type Message struct {
	Role      string     `json:"role"`
	Content   string     `json:"content"`
	ToolCalls []ToolCall `json:"tool_calls"`
}

type Input struct {
	Template string       `json:"template"`
	Messages []Message    `json:"messages"`
	Tools    []JSONObject `json:"tools"`
}

func main() {
	var in Input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	t := template.Must(template.New("t").Parse(in.Template))
	data := map[string]any{"Messages": in.Messages, "Tools": in.Tools}
	if err := t.Execute(os.Stdout, data); err != nil {
		panic(err)
	}
}
