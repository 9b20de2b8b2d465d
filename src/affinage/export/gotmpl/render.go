// Renders chat templates the way Ollama does (template/template.go in ollama/ollama), so
// affinage can check an exported Modelfile's TEMPLATE without Ollama installed.
//
// stdin:  {"template": "...", "cases": [{"messages": [{"role": "...", "content": "..."}]}]}
// stdout: {"outputs": ["...", ...], "errors": [null | "...", ...]} or {"error": "..."}
package main

import (
	"bytes"
	"encoding/json"
	"fmt"
	"os"
	"strings"
	"text/template"
	"text/template/parse"
)

type Message struct {
	Role    string `json:"role"`
	Content string `json:"content"`
}

type Case struct {
	Messages []Message `json:"messages"`
}

type Request struct {
	Template string `json:"template"`
	Cases    []Case `json:"cases"`
}

type Response struct {
	Outputs []string  `json:"outputs"`
	Errors  []*string `json:"errors"`
	Error   string    `json:"error,omitempty"`
}

// Ollama's FuncMap: only "json".
var funcs = template.FuncMap{
	"json": func(v any) string {
		b, _ := json.Marshal(v)
		return string(b)
	},
}

// collate merges consecutive messages of the same role (except tool) and joins the system messages.
func collate(msgs []Message) (string, []*Message) {
	var system []string
	var collated []*Message
	for i := range msgs {
		if msgs[i].Role == "system" {
			system = append(system, msgs[i].Content)
		}
		if len(collated) > 0 && collated[len(collated)-1].Role == msgs[i].Role && msgs[i].Role != "tool" {
			collated[len(collated)-1].Content += "\n\n" + msgs[i].Content
		} else {
			collated = append(collated, &msgs[i])
		}
	}
	return strings.Join(system, "\n\n"), collated
}

// identifiers mirrors Ollama's Identifiers: the fields and variables a template mentions.
func identifiers(n parse.Node) []string {
	switch n := n.(type) {
	case *parse.ListNode:
		var names []string
		for _, c := range n.Nodes {
			names = append(names, identifiers(c)...)
		}
		return names
	case *parse.TemplateNode:
		return identifiers(n.Pipe)
	case *parse.ActionNode:
		return identifiers(n.Pipe)
	case *parse.BranchNode:
		names := identifiers(n.Pipe)
		for _, l := range []*parse.ListNode{n.List, n.ElseList} {
			if l != nil {
				names = append(names, identifiers(l)...)
			}
		}
		return names
	case *parse.IfNode:
		return identifiers(&n.BranchNode)
	case *parse.RangeNode:
		return identifiers(&n.BranchNode)
	case *parse.WithNode:
		return identifiers(&n.BranchNode)
	case *parse.PipeNode:
		if n == nil {
			return nil
		}
		var names []string
		for _, c := range n.Cmds {
			for _, a := range c.Args {
				names = append(names, identifiers(a)...)
			}
		}
		return names
	case *parse.FieldNode:
		return n.Ident
	case *parse.VariableNode:
		return n.Ident
	}
	return nil
}

func mentionsMessages(t *template.Template) bool {
	for _, tt := range t.Templates() {
		for _, n := range tt.Root.Nodes {
			for _, name := range identifiers(n) {
				if strings.ToLower(name) == "messages" {
					return true
				}
			}
		}
	}
	return false
}

func render(t *template.Template, c Case) (string, error) {
	system, messages := collate(c.Messages)
	var b bytes.Buffer
	err := t.Execute(&b, map[string]any{
		"System":     system,
		"Messages":   messages,
		"Tools":      nil,
		"Response":   "",
		"Think":      false,
		"IsThinkSet": false,
	})
	return b.String(), err
}

func run(req Request) Response {
	t, err := template.New("").Option("missingkey=zero").Funcs(funcs).Parse(req.Template)
	if err != nil {
		return Response{Error: fmt.Sprintf("template does not parse: %v", err)}
	}
	if !mentionsMessages(t) {
		return Response{Error: "template does not use .Messages: Ollama would render it in legacy prompt mode"}
	}
	resp := Response{Outputs: []string{}, Errors: []*string{}}
	for _, c := range req.Cases {
		out, err := render(t, c)
		var msg *string
		if err != nil {
			text := err.Error()
			msg = &text
		}
		resp.Outputs = append(resp.Outputs, out)
		resp.Errors = append(resp.Errors, msg)
	}
	return resp
}

func main() {
	var req Request
	if err := json.NewDecoder(os.Stdin).Decode(&req); err != nil {
		fmt.Fprintf(os.Stderr, "bad request: %v\n", err)
		os.Exit(2)
	}
	if err := json.NewEncoder(os.Stdout).Encode(run(req)); err != nil {
		fmt.Fprintf(os.Stderr, "cannot write the response: %v\n", err)
		os.Exit(1)
	}
}
