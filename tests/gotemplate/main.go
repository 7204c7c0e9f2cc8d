// Renders an Ollama Modelfile TEMPLATE with Go's text/template, the engine Ollama itself uses.
// stdin: {"template": "...", "messages": [{"role": "...", "content": "..."}]}; stdout: the rendered prompt.
package main

import (
	"encoding/json"
	"os"
	"text/template"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Input struct {
	Template string    `json:"template"`
	Messages []Message `json:"messages"`
}

func main() {
	var in Input
	if err := json.NewDecoder(os.Stdin).Decode(&in); err != nil {
		panic(err)
	}
	t := template.Must(template.New("t").Parse(in.Template))
	data := map[string]any{"Messages": in.Messages}
	if err := t.Execute(os.Stdout, data); err != nil {
		panic(err)
	}
}
