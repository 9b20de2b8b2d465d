"""An Ollama Modelfile whose TEMPLATE renders the prompt the run was trained on.

Ollama ignores the GGUF's Jinja chat template and renders prompts with the Modelfile's Go
TEMPLATE. Rather than translate Jinja syntax (hopeless in general), the Jinja template is
rendered on conversations whose contents are unique sentinels, and the text between contents
is read off as *transitions* keyed by (previous role, next role): START->system,
START->user (with any default system block the template inserts), system->user,
user->assistant, assistant->user and user->END (the generation prompt). A template whose
transitions depend on anything else (turn index, content rewriting) is refused, never
approximated. The Go template walks ``.Messages`` and writes the transitions literally.
"""

from __future__ import annotations

import functools
import json
from dataclasses import dataclass, field

from affinage.errors import AffinageError

START, END = "", "END"
ROLES = ("system", "user", "assistant")
UNTRANSLATABLE_FIX = (
    "train with a named template (prompt.template: chatml, llama2, llama3, mistral, phi3 or alpaca), "
    "or write the Modelfile's TEMPLATE by hand (Go text/template over .Messages)"
)
GENERATION_PARAMETERS = {
    "temperature": float,
    "top_p": float,
    "top_k": int,
    "repeat_penalty": float,
    "num_predict": int,
    "num_ctx": int,
}


def _untranslatable(reason: str) -> AffinageError:
    return AffinageError(
        f"the chat template can't be expressed as an Ollama template: {reason}", fix=UNTRANSLATABLE_FIX
    )


# --- rendering the Jinja template on sentinel conversations ----------------------------------


def _sentinel(role: str, index: int) -> str:
    return {"system": "AFFSYS", "user": "AFFUSR", "assistant": "AFFAST"}[role] + f"{index}Q"


def _probe(system: bool, turns: int, closed: bool = False) -> list[dict[str, str]]:
    """[system] user (assistant user)*: ``turns`` user turns; ``closed`` ends with an answer instead."""
    messages = [{"role": "system", "content": _sentinel("system", 0)}] if system else []
    for index in range(1, turns + 1):
        messages.append({"role": "user", "content": _sentinel("user", index)})
        if index < turns or closed:
            messages.append({"role": "assistant", "content": _sentinel("assistant", index)})
    return messages


def _compile(chat_template: str):
    """The Jinja template compiled the way transformers compiles chat templates."""
    import jinja2
    import jinja2.ext
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    def raise_exception(message: str):
        raise jinja2.exceptions.TemplateError(message)

    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.globals["raise_exception"] = raise_exception
    env.filters["tojson"] = lambda value, **kwargs: json.dumps(value, **kwargs)
    try:
        return env.from_string(chat_template)
    except jinja2.exceptions.TemplateSyntaxError as error:
        raise _untranslatable(f"it is not valid Jinja for this renderer ({error})") from None


@dataclass
class _Renderer:
    """Renders conversations with the compiled template; None when the template refuses one."""

    chat_template: str
    bos_token: str | None
    eos_token: str | None
    template: object = field(init=False)

    def __post_init__(self) -> None:
        self.template = _compile(self.chat_template)

    def __call__(self, messages: list[dict[str, str]], generation_prompt: bool = True) -> str | None:
        import jinja2

        try:
            return self.template.render(
                messages=messages,
                add_generation_prompt=generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
            )
        except jinja2.exceptions.TemplateError:
            return None  # raise_exception (e.g. "system role not supported") or a template bug


# --- reading transitions off a render --------------------------------------------------------


def _cut(text: str, messages: list[dict[str, str]], generation_prompt: bool) -> list[tuple[tuple[str, str], str]]:
    """((previous role, next role), text between them) for every gap in ``text``."""
    pieces, cursor, prev = [], 0, START
    for message in messages:
        sentinel = message["content"]
        if text.count(sentinel) != 1:
            how = "rewrites or drops" if sentinel not in text else "repeats"
            raise _untranslatable(f"it {how} the content of a {message['role']} message")
        position = text.find(sentinel)
        if position < cursor:
            raise _untranslatable("it reorders the messages")
        pieces.append(((prev, message["role"]), text[cursor:position]))
        cursor, prev = position + len(sentinel), message["role"]
    pieces.append(((prev, END if generation_prompt else "closed"), text[cursor:]))
    return pieces


@dataclass
class Transitions:
    """What the Jinja template writes between messages, learned from sentinel renders."""

    between: dict[tuple[str, str], str]
    system: str  # "keep": written like any message; "drop": ignored by the template; "refuse": raises
    turn_end: str  # what closes an assistant turn (after its content, in a finished conversation)

    def add(self, pieces: list[tuple[tuple[str, str], str]]) -> None:
        for key, text in pieces:
            if self.between.setdefault(key, text) != text:
                before, after = key[0] or "the start", "the generation prompt" if key[1] == END else key[1]
                raise _untranslatable(
                    f"the text between {before} and {after} changes with the position in the "
                    f"conversation ({self.between[key]!r}, then {text!r})"
                )


def _system_mode(render: _Renderer) -> str:
    """How the template treats a system message (probed on the shortest conversations)."""
    with_system, without = render(_probe(True, 1)), render(_probe(False, 1))
    if without is None:
        raise _untranslatable("it refuses a plain user message")
    if with_system is None:
        return "refuse"
    if _sentinel("system", 0) not in with_system:
        if with_system != without:
            raise _untranslatable("it rewrites the system message")
        return "drop"
    return "keep"


@functools.lru_cache(maxsize=32)
def transitions(chat_template: str, bos_token: str | None, eos_token: str | None) -> Transitions:
    """The template's transitions; :class:`AffinageError` when it is not transition-shaped."""
    render = _Renderer(chat_template, bos_token, eos_token)
    found = Transitions(between={}, system=_system_mode(render), turn_end="")
    for system in (True, False) if found.system == "keep" else (False,):
        for turns in (1, 2, 3):
            messages = _probe(system, turns)
            text = render(messages)
            if text is None:
                raise _untranslatable(f"it refuses a {turns}-turn conversation")
            found.add(_cut(text, messages, True))
    closed = _probe(False, 1, closed=True)
    text = render(closed, generation_prompt=False)
    if text is not None:
        found.turn_end = _cut(text, closed, False)[-1][1]
    return found


def trims_content(chat_template: str, *, bos_token: str | None = None, eos_token: str | None = None) -> bool:
    """Whether the template strips whitespace around message contents (llama3, Gemma 3 do).

    Go templates have no trim function: the Ollama template writes contents as they come, so a
    message with leading/trailing whitespace renders differently from the Jinja template.
    """
    render = _Renderer(chat_template, bos_token, eos_token)
    padded = [{"role": "user", "content": f" \n{_sentinel('user', 1)}\n "}]
    text = render(padded)
    return text is not None and padded[0]["content"] not in text


# --- writing the Go template -----------------------------------------------------------------


def _go_string(text: str) -> str:
    """A Go string literal for ``text`` (for the few characters that cannot stay literal)."""
    out = []
    for char in text:
        if char in '"\\':
            out.append("\\" + char)
        elif char == "\r":
            out.append("\\r")
        elif char.isprintable():
            out.append(char)
        else:
            out.append(f"\\u{ord(char):04x}" if ord(char) < 0x10000 else f"\\U{ord(char):08x}")
    return '"' + "".join(out) + '"'


def go_literal(text: str) -> str:
    """``text`` as Go template source that outputs it verbatim, and survives a Modelfile.

    ``{{`` (and a ``{`` before the next action) would open an action; a third ``"`` in a row
    would close the Modelfile's triple-quoted TEMPLATE; characters that are not printable (other
    than space, tab and newline) are dropped by Ollama's Modelfile parser. Those are written as
    Go string actions; everything else stays literal.
    """
    out, quotes = [], 0
    for index, char in enumerate(text):
        brace = char == "{" and (index + 1 == len(text) or text[index + 1] == "{")
        unprintable = char == "\r" or (char not in " \t\n" and not char.isprintable())
        if brace or unprintable or (char == '"' and quotes == 2):
            out.append("{{ " + _go_string(char) + " }}")
            quotes = 0
            continue
        quotes = quotes + 1 if char == '"' else 0
        out.append(char)
    return "".join(out)


def _branches(variable: str, cases: list[tuple[str, str]]) -> str:
    """``{{- if eq $prev "a" }}TEXT{{ else if ... }}{{ end }}`` for the non-empty texts.

    Only the layout newline before the chain is trimmed (``{{-``): the texts sit between
    ``}}`` and ``{{`` without trim markers, so their own whitespace is kept.
    """
    parts = [(value, text) for value, text in cases if text]
    if not parts:
        return ""
    chain = "".join(
        ("{{- if " if i == 0 else "{{ else if ") + f'eq {variable} "{value}" }}}}' + go_literal(text)
        for i, (value, text) in enumerate(parts)
    )
    return "\n" + chain + "{{ end }}"


def _role_block(between: dict[tuple[str, str], str], role: str, first: bool) -> str:
    """The branch of the message loop for ``role``: its transitions, its content, then $prev.

    A system message is written only as the first message (the only place the template was
    seen to put one); a later one (``/set system`` mid-chat) is skipped rather than mangled.
    """
    head = f'\n{{{{- {"if" if first else "else if"} eq .Role "{role}" }}}}'
    if role == "system":
        return (
            head
            + '\n{{- if eq $prev "" }}'
            + go_literal(between.get((START, role), ""))
            + "{{ .Content }}{{ $prev = .Role }}{{ end }}"
        )
    cases = [(prev, text) for (prev, nxt), text in between.items() if nxt == role]
    return head + _branches("$prev", cases) + "\n{{- .Content }}{{ $prev = .Role }}"


def _check_default_system(chat_template: str, bos_token: str | None, eos_token: str | None, system: str) -> None:
    """Ollama prepends the Modelfile's SYSTEM: the template must treat it like its own default."""
    render = _Renderer(chat_template, bos_token, eos_token)
    user = [{"role": "user", "content": _sentinel("user", 1)}]
    with_system = render([{"role": "system", "content": system}] + user)
    if with_system is not None and with_system != render(user):
        raise AffinageError(
            f"the chat template's default system message is not the run's system message {system!r}",
            fix="build the template with affinage.export.chat_template.merged_chat_template (report this as a bug)",
        )


def go_template(
    chat_template: str,
    *,
    bos_token: str | None,
    eos_token: str | None,
    default_system: str | None,
    drop_bos: bool = False,
) -> str:
    """The Ollama (Go text/template) TEMPLATE rendering what ``chat_template`` renders.

    ``default_system``: the run's system message, which the Modelfile's SYSTEM makes Ollama
    prepend; checked to be what the template inserts for a conversation without one.
    ``drop_bos``: remove the template's leading BOS, for a GGUF whose tokenizer adds one
    itself (Ollama then prepends a BOS to every prompt, even one that starts with it).
    """
    found = transitions(chat_template, bos_token, eos_token)
    if default_system is not None and found.system == "keep":
        _check_default_system(chat_template, bos_token, eos_token, default_system)
    between = dict(found.between)
    if drop_bos and bos_token:
        between = {key: text.removeprefix(bos_token) if key[0] == START else text for key, text in between.items()}
    roles = ROLES if found.system == "keep" else ROLES[1:]  # a dropped/refused system message is skipped
    body = "".join(_role_block(between, role, index == 0) for index, role in enumerate(roles))
    generation = _branches("$prev", [("user", between.get(("user", END), ""))])
    return '{{- $prev := "" }}\n{{- range .Messages }}' + body + "\n{{- end }}\n{{- end }}" + generation


def stop_tokens(chat_template: str, *, bos_token: str | None, eos_token: str | None) -> list[str]:
    """``PARAMETER stop`` strings: EOS, the end-of-turn marker and the user turn's start marker."""
    found = transitions(chat_template, bos_token, eos_token)
    header = found.between.get(("assistant", "user"), "").removeprefix(found.turn_end).strip()
    if header.startswith("<") and ">" in header:
        start_marker = header[: header.index(">") + 1]  # <|im_start|>, <start_of_turn>, <|start_header_id|>
    else:
        start_marker = next((line.strip() for line in reversed(header.splitlines()) if line.strip()), "")
    stops = [eos_token or "", found.turn_end.strip(), start_marker]
    return list(dict.fromkeys(stop for stop in stops if stop.strip()))


# --- the Modelfile ---------------------------------------------------------------------------


def _check_modelfile_text(text: str, what: str) -> None:
    """Ollama's Modelfile parser ends a triple-quoted value at ``\"\"\"`` and drops unprintable characters."""
    if '"""' in text:
        raise AffinageError(
            f'the {what} contains """, which would end its triple-quoted Modelfile value early',
            fix=f'remove the """ from the {what}, or write that Modelfile line by hand',
        )
    bad = sorted({char for char in text if char not in " \t\r\n" and not char.isprintable()})
    if bad:
        raise AffinageError(
            f"the {what} contains characters Ollama's Modelfile parser drops: "
            + ", ".join(f"U+{ord(char):04X}" for char in bad),
            fix=f"remove them from the {what}",
        )


def _triple_quoted(text: str, what: str) -> str:
    _check_modelfile_text(text, what)
    return f'"""{text}"""'


def _quoted(text: str, what: str) -> str:
    """A one-line value in double quotes; triple quotes when a newline or a leading ``""`` needs them."""
    _check_modelfile_text(text, what)
    return f'"""{text}"""' if "\n" in text or "\r" in text or text.startswith('""') else f'"{text}"'


def _file_arg(name: str) -> str:
    """``./NAME``: a GGUF beside the Modelfile (Ollama resolves relative paths from the Modelfile)."""
    bare = name.removeprefix("./")
    if not bare.endswith(".gguf") or any(char.isspace() or char in '"#/\\' for char in bare) or bare.startswith("~"):
        raise ValueError(f"expected a .gguf file name beside the Modelfile, got {name!r}")
    return "./" + bare


def _parameter_value(name: str, value: object) -> str:
    kind = GENERATION_PARAMETERS.get(name)
    if kind is None:
        raise ValueError(f"unknown Ollama parameter {name!r} (known: {', '.join(GENERATION_PARAMETERS)})")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"Ollama parameter {name} must be a number, got {value!r}")
    if kind is int:
        if value != int(value):
            raise ValueError(f"Ollama parameter {name} must be an integer, got {value!r}")
        return str(int(value))
    return repr(float(value))


def modelfile_text(
    *,
    gguf_name: str,
    template: str,
    stops: list[str],
    system: str | None,
    parameters: dict[str, object],
    adapter_name: str | None = None,
    base_name: str | None = None,
) -> str:
    """The Modelfile for ``ollama create NAME -f Modelfile`` (docs/modelfile.md in ollama/ollama).

    With ``adapter_name``, FROM is the base GGUF (``base_name``, else ``gguf_name``) and ADAPTER
    the LoRA GGUF. SYSTEM is written only when non-empty: Ollama prepends it as a system message.
    """
    lines = [f"FROM {_file_arg((base_name or gguf_name) if adapter_name else gguf_name)}"]
    if adapter_name:
        lines.append(f"ADAPTER {_file_arg(adapter_name)}")
    lines.append(f"TEMPLATE {_triple_quoted(template, 'Ollama template')}")
    lines += [f"PARAMETER stop {_quoted(stop, 'stop string')}" for stop in dict.fromkeys(stops) if stop]
    lines += [
        f"PARAMETER {name} {_parameter_value(name, value)}" for name, value in parameters.items() if value is not None
    ]
    if system:
        lines.append(f"SYSTEM {_triple_quoted(system, 'system message')}")
    return "\n".join(lines) + "\n"


def ollama_usage(name: str, adapter: bool) -> str:
    """A README section: the exact commands that install and run the export in Ollama."""
    text = (
        "## Run with Ollama\n\n"
        "From this directory:\n\n"
        "```sh\n"
        f"ollama create {name} -f Modelfile\n"
        f"ollama run {name}\n"
        "```\n\n"
        "The Modelfile's TEMPLATE renders the same prompt the model was trained on.\n"
    )
    if adapter:
        text += (
            "\nThis export is the base model plus a LoRA adapter (`FROM ./base.gguf` + `ADAPTER ./adapter.gguf`). "
            "Recent Ollama releases may refuse `ADAPTER` for some architectures; if `ollama create` fails, "
            "export the merged form instead (`--format ollama` without `--adapter`): it is the robust one.\n"
        )
    return text
