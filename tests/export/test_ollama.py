"""The Ollama export's TEMPLATE renders, with Go as Ollama does, the prompt the run trained on.

Expected prompts come from transformers' own chat-template rendering (``apply_chat_template``),
never from affinage's translation; actual prompts from Go's text/template through the same
collation and data map as Ollama's ``template.Execute``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from affinage.errors import AffinageError
from affinage.export.chat_template import NAMED_JINJA, merged_chat_template, with_default_system
from affinage.export.go_render import render_with_go
from affinage.export.ollama import go_literal, go_template, modelfile_text, ollama_usage, stop_tokens, trims_content
from tests.conftest import CHATML

EMAILS = Path(__file__).resolve().parents[2] / "examples" / "email-router" / "emails.jsonl"

# Gemma 3's chat template as shipped (google/gemma-3-*-it): the system message is folded into
# the first user turn, contents are trimmed, the assistant is "model", roles must alternate.
GEMMA3 = """{{ bos_token }}
{%- if messages[0]['role'] == 'system' -%}
    {%- if messages[0]['content'] is string -%}
        {%- set first_user_prefix = messages[0]['content'] + '\n\n' -%}
    {%- else -%}
        {%- set first_user_prefix = messages[0]['content'][0]['text'] + '\n\n' -%}
    {%- endif -%}
    {%- set loop_messages = messages[1:] -%}
{%- else -%}
    {%- set first_user_prefix = "" -%}
    {%- set loop_messages = messages -%}
{%- endif -%}
{%- for message in loop_messages -%}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) -%}
        {{ raise_exception("Conversation roles must alternate user/assistant/user/assistant/...") }}
    {%- endif -%}
    {%- if (message['role'] == 'assistant') -%}
        {%- set role = "model" -%}
    {%- else -%}
        {%- set role = message['role'] -%}
    {%- endif -%}
    {{ '<start_of_turn>' + role + '\n' + (first_user_prefix if loop.first else "") }}
    {%- if message['content'] is string -%}
        {{ message['content'] | trim }}
    {%- elif message['content'] is iterable -%}
        {%- for item in message['content'] -%}
            {%- if item['type'] == 'image' -%}
                {{ '<start_of_image>' }}
            {%- elif item['type'] == 'text' -%}
                {{ item['text'] | trim }}
            {%- endif -%}
        {%- endfor -%}
    {%- else -%}
        {{ raise_exception("Invalid content type") }}
    {%- endif -%}
    {{ '<end_of_turn>\n' }}
{%- endfor -%}
{%- if add_generation_prompt -%}
    {{'<start_of_turn>model\n'}}
{%- endif -%}
"""

# Gemma 2's way: no system role at all.
NO_SYSTEM = (
    "{{ bos_token }}{% if messages[0]['role'] == 'system' %}"
    "{{ raise_exception('System role not supported') }}{% endif %}"
    "{% for message in messages %}{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] + '<end_of_turn>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)

# Literal text Go and Ollama's Modelfile parser would both misread if written as is.
AWKWARD = (
    "{% for m in messages %}{{ '{{' + m['role'] + '}} \"\"\"\u200b\u00a0\n' + m['content'] + '\n{' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '{{assistant}}\r\n{' }}{% endif %}"
)

ROUTER_SYSTEM = "Tu es le routeur d'emails : réponds « RH », « Support », « Finance » ou « SPAM »."
PROMPTS = [
    'Résume : « Le café coûte 3 € », d\'après "Le Monde".\nDeuxième ligne avec {{ accolades }} et {% bloc %}.',
    "Traduis en japonais : 日本語のテキスト 🙂 — et ça ?\n\n\tFin.",
    "[INST] rediriger l'email suivant vers le bon service de l'entreprise : \"Erreur sur la facture 42\n\nBonjour,"
    '\nle montant HT est faux.\nCordialement"[/INST]',
]


def _emails(count: int) -> list[dict]:
    return [json.loads(line) for line in EMAILS.read_text(encoding="utf-8").splitlines()[:count]]


def _conversations() -> list[list[dict[str, str]]]:
    """Single-turn prompts and user/assistant/user conversations, with and without a system message."""
    prompts = PROMPTS + [row["prompt"] for row in _emails(2)]
    multi = [
        {"role": "user", "content": PROMPTS[2]},
        {"role": "assistant", "content": "Finance"},
        {"role": "user", "content": 'Et celui-ci : "{{ .Prompt }}" ?'},
    ]
    plain = [[{"role": "user", "content": prompt}] for prompt in prompts] + [multi]
    system = {"role": "system", "content": ROUTER_SYSTEM}
    return plain + [[system] + conversation for conversation in plain]


def _ollama_messages(messages: list[dict[str, str]], system: str | None) -> list[dict[str, str]]:
    """What Ollama's server sends the template: the Modelfile's SYSTEM first when the request has none."""
    if system and not any(m["role"] == "system" for m in messages):
        return [{"role": "system", "content": system}] + messages
    return messages


def _cases() -> list[tuple[str, str, str | None]]:
    """(id, Jinja template, the run's default system) for every template family affinage exports."""
    cases = []
    for name in NAMED_JINJA:
        for system in (None, ROUTER_SYSTEM):
            template, _ = merged_chat_template(None, name, system)
            cases.append((f"{name}-{'system' if system else 'plain'}", template, system))
    cases.append(("tiny-chatml-empty-system", with_default_system(CHATML, ""), ""))
    cases.append(("gemma3-plain", GEMMA3, None))
    cases.append(("gemma3-system", with_default_system(GEMMA3, ROUTER_SYSTEM), ROUTER_SYSTEM))
    cases.append(("gemma3-empty-system", with_default_system(GEMMA3, ""), ""))
    return cases


def _jinja(tokenizer, template: str, messages: list[dict[str, str]]) -> str:
    return tokenizer.apply_chat_template(messages, chat_template=template, tokenize=False, add_generation_prompt=True)


@pytest.mark.parametrize("case_id, template, system", _cases(), ids=[case[0] for case in _cases()])
def test_go_renders_what_jinja_renders(tokenizer, case_id, template, system):
    go = go_template(template, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token, default_system=system)
    conversations = _conversations()
    expected = [_jinja(tokenizer, template, messages) for messages in conversations]
    actual = render_with_go(go, [_ollama_messages(messages, system) for messages in conversations])
    for want, got in zip(expected, actual):
        assert got == want


def test_a_template_refusing_system_messages_has_no_system_branch(tokenizer):
    go = go_template(NO_SYSTEM, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token, default_system=None)
    assert '"system"' not in go
    user_only = [messages for messages in _conversations() if messages[0]["role"] != "system"]
    assert render_with_go(go, user_only) == [_jinja(tokenizer, NO_SYSTEM, messages) for messages in user_only]


def test_literal_braces_quotes_and_invisible_characters_survive(tokenizer):
    go = go_template(AWKWARD, bos_token=None, eos_token=None, default_system=None)
    conversations = _conversations()
    expected = [_jinja(tokenizer, AWKWARD, messages) for messages in conversations]
    assert render_with_go(go, conversations) == expected
    text = modelfile_text(gguf_name="model.gguf", template=go, stops=[], system=None, parameters={})
    assert parse_modelfile(text)["template"] == [go]  # """, \u200b, \r would not survive the parser as is


def test_a_late_system_message_is_skipped_not_mangled():
    go = go_template(NAMED_JINJA["chatml"], bos_token=None, eos_token=None, default_system=None)
    turns = [
        {"role": "user", "content": "u1"},
        {"role": "assistant", "content": "a1"},
        {"role": "user", "content": "u2"},
    ]
    late = turns[:2] + [{"role": "system", "content": "late"}] + turns[2:]
    assert render_with_go(go, [late]) == render_with_go(go, [turns])


def test_go_literal_escapes_only_what_it_must():
    assert go_literal("<|im_start|>user\n") == "<|im_start|>user\n"
    assert go_literal("a{{b") == 'a{{ "{" }}{b'  # a lone { after an action is text
    assert go_literal("x{") == 'x{{ "{" }}'
    assert go_literal('""""') == '""{{ "\\"" }}"'
    assert go_literal("\u200b") == '{{ "\\u200b" }}'


def test_drop_bos_leaves_the_bos_to_the_tokenizer(tokenizer):
    go = go_template(GEMMA3, bos_token="<bos>", eos_token="<eos>", default_system=None, drop_bos=True)
    messages = [{"role": "user", "content": "Bonjour"}]
    assert render_with_go(go, [messages]) == ["<start_of_turn>user\nBonjour<end_of_turn>\n<start_of_turn>model\n"]


def test_trimming_templates_are_reported():
    assert trims_content(NAMED_JINJA["llama3"]) and trims_content(GEMMA3, bos_token="<bos>")
    assert trims_content(NAMED_JINJA["llama2"]) and not trims_content(NAMED_JINJA["mistral"])
    assert not trims_content(NAMED_JINJA["chatml"]) and not trims_content(CHATML)


@pytest.mark.parametrize(
    "template, eos, stops",
    [
        (NAMED_JINJA["chatml"], "<|im_end|>", ["<|im_end|>", "<|im_start|>"]),
        (NAMED_JINJA["phi3"], "<|endoftext|>", ["<|endoftext|>", "<|end|>", "<|user|>"]),
        (NAMED_JINJA["llama3"], "<|eot_id|>", ["<|eot_id|>", "<|start_header_id|>"]),
        (NAMED_JINJA["llama2"], "</s>", ["</s>", "<s>"]),
        (NAMED_JINJA["mistral"], "</s>", ["</s>", "[INST]"]),
        (NAMED_JINJA["alpaca"], "</s>", ["</s>", "### Instruction:"]),
        (GEMMA3, "<eos>", ["<eos>", "<end_of_turn>", "<start_of_turn>"]),
        (with_default_system(CHATML, ""), "<|im_end|>", ["<|im_end|>", "<|im_start|>"]),
    ],
)
def test_stop_tokens(template, eos, stops):
    assert stop_tokens(template, bos_token="<bos>", eos_token=eos) == stops


@pytest.mark.parametrize(
    "template, reason",
    [
        (
            "{% for m in messages %}{{ 'Turn ' + loop.index|string + ': ' + m['content'] + '\n' }}{% endfor %}",
            "changes",
        ),
        ("{% for m in messages %}{{ m['role'] + ': ' + m['content']|lower + '\n' }}{% endfor %}", "rewrites"),
        ("{% for m in messages %}{{ m['content'] + m['content'] }}{% endfor %}", "repeats the content"),
        (
            "{% for m in messages %}{% if m['role'] == 'user' %}{{ raise_exception('no') }}{% endif %}{% endfor %}",
            "refuses",
        ),
        ("{% for m in messages %}{{ m.content }", "not valid Jinja"),
    ],
)
def test_untranslatable_templates_are_refused_with_a_fix(template, reason):
    with pytest.raises(AffinageError) as error:
        go_template(template, bos_token=None, eos_token=None, default_system=None)
    assert "can't be expressed as an Ollama template" in str(error.value) and reason in str(error.value)
    assert "chatml" in error.value.fix and "TEMPLATE by hand" in error.value.fix


def test_a_default_system_the_template_does_not_insert_is_refused():
    with pytest.raises(AffinageError, match="default system message"):
        go_template(with_default_system(CHATML, "A"), bos_token=None, eos_token=None, default_system="B")


def test_missing_go_says_how_to_install_it(monkeypatch):
    import affinage.export.go_render as go_render

    monkeypatch.setattr(go_render.shutil, "which", lambda name: None)
    assert not go_render.go_available()
    with pytest.raises(AffinageError) as error:
        render_with_go("{{ range .Messages }}{{ end }}", [[]])
    assert "apt-get install golang-go" in error.value.fix


def test_a_template_without_messages_is_reported():
    with pytest.raises(AffinageError, match="legacy"):
        render_with_go("{{ .Prompt }}", [[{"role": "user", "content": "x"}]])


# --- the Modelfile, read back with a port of Ollama's parser (parser/parser.go) ---------------


def _unquote(value: str) -> tuple[str, bool]:
    if value[:3] == '"""':
        return (value[3:-3], True) if len(value) >= 6 and value[-3:] == '"""' else ("", False)
    if value[:1] == '"':
        return (value[1:-1], True) if len(value) >= 2 and value[-1] == '"' else ("", False)
    return value, True


def _next_state(char: str, state: str) -> tuple[str, str]:
    """(next state, the character to keep or "") as parseRuneForState."""
    space, newline = char in " \t", char in "\r\n"
    if state == "nil":
        return ("comment", "") if char == "#" else ("nil", "") if space or newline else ("name", char)
    if state == "name":
        if char.isascii() and char.isalpha():
            return "name", char
        if space:
            return "value", ""
        raise ValueError("command must be one of from, license, template, system, adapter, parameter, message")
    if state == "value":
        return ("nil", char) if space or newline else ("value", char)
    if state == "parameter":
        if (char.isascii() and char.isalnum()) or char == "_":
            return "parameter", char
        if space:
            return "value", ""
        raise ValueError("unexpected EOF")
    return ("nil", "") if newline else ("comment", "")  # comment


def parse_modelfile(text: str) -> dict[str, list[str]]:
    """Ollama's Modelfile grammar: command name -> its values, in order ("model" for FROM)."""
    commands: dict[str, list[str]] = {}
    state, buffer, name = "nil", "", ""
    for char in text:
        state_next, kept = _next_state(char, state)
        if state_next != state:
            if state == "name":
                lowered = buffer.lower()
                assert lowered in {"from", "license", "template", "system", "adapter", "parameter", "message"}
                name = {"from": "model"}.get(lowered, lowered)
                state_next = "parameter" if lowered == "parameter" else state_next
            elif state == "parameter":
                name = buffer
            elif state == "value":
                value, ok = _unquote(buffer.strip())
                if not ok or kept in (" ", "\t"):
                    buffer += kept
                    continue
                commands.setdefault(name, []).append(value)
            buffer, state = "", state_next
        if kept and kept.isprintable():
            buffer += kept
    if state == "value":
        value, ok = _unquote(buffer.strip())
        assert ok, "unterminated value"
        commands.setdefault(name, []).append(value)
    assert state in ("nil", "comment", "value") and "model" in commands, "no FROM line"
    return commands


def test_the_modelfile_parses_as_ollama_reads_it(tokenizer, tmp_path):
    template = with_default_system(GEMMA3, ROUTER_SYSTEM)
    go = go_template(template, bos_token="<bos>", eos_token="<eos>", default_system=ROUTER_SYSTEM)
    stops = stop_tokens(template, bos_token="<bos>", eos_token="<eos>") + ['say "stop"\nnow']
    text = modelfile_text(
        gguf_name="model.gguf",
        template=go,
        stops=stops,
        system=ROUTER_SYSTEM,
        parameters={"temperature": 0.2, "top_k": 40, "num_ctx": 4096, "top_p": None},
    )
    (tmp_path / "Modelfile").write_text(text, encoding="utf-8")
    parsed = parse_modelfile((tmp_path / "Modelfile").read_text(encoding="utf-8"))
    (source,) = parsed["model"]
    assert source.endswith(".gguf") and (tmp_path / source).resolve().parent == tmp_path.resolve()
    assert parsed["template"] == [go]
    assert parsed["stop"] == stops
    assert parsed["system"] == [ROUTER_SYSTEM]
    assert parsed["temperature"] == ["0.2"] and parsed["top_k"] == ["40"] and parsed["num_ctx"] == ["4096"]
    assert "top_p" not in parsed and "adapter" not in parsed


def test_adapter_modelfile_and_usage():
    text = modelfile_text(
        gguf_name="model.gguf",
        template="{{ range .Messages }}{{ .Content }}{{ end }}",
        stops=["<|im_end|>"],
        system="",
        parameters={},
        adapter_name="adapter.gguf",
        base_name="base.gguf",
    )
    parsed = parse_modelfile(text)
    assert parsed["model"] == ["./base.gguf"] and parsed["adapter"] == ["./adapter.gguf"] and "system" not in parsed
    usage = ollama_usage("email-router", adapter=True)
    assert "ollama create email-router -f Modelfile" in usage and "ollama run email-router" in usage
    assert "--format ollama" in usage and "ADAPTER" in usage
    assert "ADAPTER" not in ollama_usage("email-router", adapter=False)


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"template": 'say """hi"""'}, '"""'),
        ({"system": "a\u200bb"}, "U+200B"),
        ({"parameters": {"num_ctx": 4096.5}}, "integer"),
        ({"parameters": {"mirostat": 1}}, "unknown"),
        ({"gguf_name": "../model.gguf"}, "beside the Modelfile"),
    ],
)
def test_modelfile_refuses_what_ollama_would_misread(kwargs, message):
    arguments = {"gguf_name": "model.gguf", "template": "{{ .Prompt }}", "stops": [], "system": None, "parameters": {}}
    with pytest.raises((AffinageError, ValueError), match=message.replace("+", r"\+")):
        modelfile_text(**{**arguments, **kwargs})


# --- the email router: SmolLM2's own template with an empty system turn ----------------------


@pytest.mark.integration
def test_smollm2_email_router_prompts_match_training():
    from transformers import AutoTokenizer

    from affinage.data.formats import load_examples
    from affinage.data.template import render_prompt
    from affinage.models import resolve_model_path

    tokenizer = AutoTokenizer.from_pretrained(resolve_model_path("smollm2-135m-instruct"))
    template = with_default_system(tokenizer.chat_template, "")
    go = go_template(template, bos_token=tokenizer.bos_token, eos_token=tokenizer.eos_token, default_system="")
    examples = load_examples(EMAILS, input_field="prompt", output_field="completion")[:6]
    actual = render_with_go(go, [[{"role": "user", "content": example.prompt}] for example in examples])
    for example, prompt in zip(examples, actual):
        assert prompt == render_prompt(tokenizer, example, template=None, system="")
        assert prompt.startswith("<|im_start|>system\n<|im_end|>\n<|im_start|>user\n[INST]")
