"""The one place where an example becomes tokens.

Training, evaluation, prediction and export all call :func:`render_prompt` and
:func:`encode_example`, so the text the model is trained on is exactly the text it is asked
at inference (a train/inference template mismatch is the field's most reported bug).

``prompt.template`` is one of:
- ``None``: the model's own chat template (``tokenizer.apply_chat_template``);
- a name from :data:`NAMED_TEMPLATES` (``alpaca``, ``chatml``, ``llama2``, ``llama3``,
  ``mistral``, ``phi3``): a well-known prompt format written here, for models without a chat
  template or trained in another format;
- a literal template with ``{field}`` placeholders filled from the data row.
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from affinage.data.formats import Example
from affinage.errors import ConfigError, DataError

ALPACA = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Response:\n"
)
ALPACA_WITH_INPUT = (
    "Below is an instruction that describes a task, paired with an input that provides further context. "
    "Write a response that appropriately completes the request.\n\n"
    "### Instruction:\n{instruction}\n\n### Input:\n{input}\n\n### Response:\n"
)

Messages = list[dict[str, str]]


# --- named chat templates: messages -> text, like apply_chat_template(tokenize=False) ---------


def _chatml(messages: Messages, generation_prompt: bool) -> str:
    text = "".join(f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in messages)
    return text + ("<|im_start|>assistant\n" if generation_prompt else "")


def _phi3(messages: Messages, generation_prompt: bool) -> str:
    text = "".join(f"<|{m['role']}|>\n{m['content']}<|end|>\n" for m in messages)
    return text + ("<|assistant|>\n" if generation_prompt else "")


def _llama3(messages: Messages, generation_prompt: bool) -> str:
    # Meta's template trims every message.
    text = "<|begin_of_text|>" + "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content'].strip()}<|eot_id|>" for m in messages
    )
    return text + ("<|start_header_id|>assistant<|end_header_id|>\n\n" if generation_prompt else "")


def _inst(messages: Messages, llama2: bool) -> str:
    """Llama 2 chat and Mistral instruct: ``<s>[INST] user [/INST] answer</s>...``.

    Llama 2 opens every exchange with ``<s>``, wraps the system message in ``<<SYS>>`` inside
    the first instruction and pads the answer with spaces (Meta's format); Mistral has no
    system role, so the system message is written before the first instruction's text.
    """
    system = None
    if messages and messages[0]["role"] == "system":
        system, messages = messages[0]["content"], messages[1:]
    text = ""
    for index, message in enumerate(messages):
        expected = "user" if index % 2 == 0 else "assistant"
        if message["role"] != expected:
            raise ValueError(
                f"{'llama2' if llama2 else 'mistral'} needs user and assistant turns to alternate, "
                "starting with the user"
            )
        content = message["content"].strip() if llama2 else message["content"]
        if expected == "user":
            if index == 0 and system is not None:
                content = f"<<SYS>>\n{system}\n<</SYS>>\n\n{content}" if llama2 else f"{system}\n\n{content}"
            text += ("<s>" if llama2 or index == 0 else "") + f"[INST] {content} [/INST]"
        else:
            text += f" {content} </s>" if llama2 else f" {content}</s>"
    return text


NAMED_TEMPLATES: dict[str, Callable[[Messages, bool], str] | None] = {
    "alpaca": None,  # not a chat format: see _alpaca
    "chatml": _chatml,
    "llama2": lambda messages, generation_prompt: _inst(messages, llama2=True),
    "llama3": _llama3,
    "mistral": lambda messages, generation_prompt: _inst(messages, llama2=False),
    "phi3": _phi3,
}
# Named templates that write the BOS themselves: the tokenizer must not add a second one.
WRITES_BOS = {"llama2", "llama3", "mistral"}


def template_name(template: str | None) -> str | None:
    """The named template ``template`` stands for; None for no template or a literal one.

    A string without ``{`` can only be a name: an unknown one is a :class:`ConfigError`.
    """
    if template is None:
        return None
    key = template.strip().lower()
    if key in NAMED_TEMPLATES:
        return key
    if "{" in template:
        return None
    raise ConfigError(
        f"unknown prompt template '{template}'",
        where="prompt.template",
        fix=f"use one of {', '.join(sorted(NAMED_TEMPLATES))}, a literal template with {{field}} placeholders, "
        "or leave it empty for the model's own chat template",
    )


def is_literal_template(template: str | None) -> bool:
    """A ``{field}`` template filled from each row (not a name, not the model's chat template)."""
    return template is not None and template_name(template) is None


def template_fields(template: str) -> list[str]:
    return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def _fill_template(template: str, example: Example) -> str:
    fields = template_fields(template)
    values = dict(example.row)
    if example.prompt is not None and len(fields) == 1 and fields[0] not in values:
        values[fields[0]] = example.prompt  # a bare text fills a one-placeholder template
    missing = [name for name in fields if name not in values]
    if missing:
        raise DataError(
            f"template placeholder {{{missing[0]}}} has no matching field "
            f"(fields: {', '.join(sorted(values)) or 'none'})",
            where=example.source or "prompt.template",
            fix="rename the placeholder or add the field to every row",
        )
    return template.format_map({name: "" if values[name] is None else values[name] for name in fields})


def _alpaca(example: Example) -> str:
    """The Stanford Alpaca prompt: the row's instruction/input, else the prompt (or the user message) as instruction."""
    row = example.row
    if row.get("instruction") not in (None, ""):
        instruction, extra = str(row["instruction"]), str(row.get("input") or "")
    elif example.prompt is not None:
        instruction, extra = example.prompt, ""
    else:
        history = example.messages or []
        if [m["role"] for m in history] != ["user"]:
            raise DataError(
                "the alpaca template holds one instruction: this conversation has "
                + ", ".join(m["role"] for m in history),
                where=example.source or "prompt.template",
                fix="use a chat template (prompt.template: chatml, llama3... or empty for the model's own) "
                "for conversations",
            )
        instruction, extra = history[0]["content"], ""
    if extra.strip():
        return ALPACA_WITH_INPUT.format_map({"instruction": instruction, "input": extra})
    return ALPACA.format_map({"instruction": instruction})


def uses_chat_template(tokenizer: Any, template: str | None) -> bool:
    return template is None and bool(getattr(tokenizer, "chat_template", None))


def _chat_renderer(tokenizer: Any, template: str | None) -> Callable[[Messages, bool], str] | None:
    """messages -> text for chat-style rendering (a named chat template or the model's), else None."""
    name = template_name(template)
    if name is not None:
        return NAMED_TEMPLATES[name]
    if uses_chat_template(tokenizer, template):
        return lambda messages, generation_prompt: tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=generation_prompt
        )
    return None


def _conversation(example: Example, system: str | None) -> Messages:
    """The messages before the answer: history, the prompt as the user turn, the configured system message."""
    messages = list(example.messages or [])
    if example.prompt is not None:
        messages.append({"role": "user", "content": example.prompt})
    if system is not None and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def _render(
    render: Callable[[Messages, bool], str], messages: Messages, generation_prompt: bool, example: Example
) -> str:
    try:
        return render(messages, generation_prompt)
    except ValueError as error:  # a named template's own check
        raise DataError(
            str(error), where=example.source or "prompt.template", fix="fix the conversation's roles"
        ) from None


def render_prompt(tokenizer: Any, example: Example, template: str | None = None, system: str | None = None) -> str:
    """The exact prompt text the model sees before its answer."""
    if example.kind == "text":
        return ""  # plain text: no template, the whole text is trained on
    name = template_name(template)
    if name == "alpaca":
        return _alpaca(example)
    if template is not None and name is None:
        return _fill_template(template, example)
    render = _chat_renderer(tokenizer, template)
    if render is None:
        if example.prompt is None and example.messages:
            raise DataError(
                "a chat row needs a chat template, and the model has none",
                where=example.source or "messages",
                fix="set prompt.template to a named template (chatml, llama3, mistral, ...)",
            )
        return example.prompt or ""
    return _render(render, _conversation(example, system), True, example)


def adds_special_tokens(tokenizer: Any, template: str | None) -> bool:
    """Whether the tokenizer's special tokens (BOS) are added to the rendered prompt."""
    # A chat template writes its own special tokens (BOS included), and so do llama2/llama3/mistral;
    # a raw prompt, a literal template, alpaca, chatml and phi3 get the tokenizer's.
    return not uses_chat_template(tokenizer, template) and template_name(template) not in WRITES_BOS


def tokenizer_adds(tokenizer: Any, token_id: int | None, *, first: bool = True) -> bool:
    """Whether a plain encode puts ``token_id`` at the start (or the end): a BOS (EOS) added by the tokenizer."""
    if token_id is None:
        return False
    ids = tokenizer("a", add_special_tokens=True)["input_ids"]
    return (
        bool(ids)
        and ids[0 if first else -1] == token_id
        and ids != tokenizer("a", add_special_tokens=False)["input_ids"]
    )


def encode_prompt(
    tokenizer: Any, example: Example, template: str | None = None, system: str | None = None
) -> list[int]:
    text = render_prompt(tokenizer, example, template, system)
    return tokenizer(text, add_special_tokens=adds_special_tokens(tokenizer, template))["input_ids"]


def encode_completion(tokenizer: Any, completion: str) -> list[int]:
    """Answer tokens followed by EOS, so the model learns to stop."""
    return tokenizer(completion, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # -100 on prompt tokens: the loss is on the completion only
    truncated: bool
    full_length: int = 0  # tokens before truncation (what max_seq_len would have to be)


def fit_prompt(prompt_ids: list[int], budget: int) -> list[int]:
    """Cut the middle of an over-long prompt: its start (instructions) and end (question) matter most."""
    if len(prompt_ids) <= budget:
        return prompt_ids
    head = budget // 2
    return prompt_ids[:head] + prompt_ids[len(prompt_ids) - (budget - head) :]


# --- multi-turn: the loss covers every assistant turn ----------------------------------------


def _assistant_spans(
    render: Callable[[Messages, bool], str], messages: Messages, text: str, example: Example
) -> list[tuple[int, int, int]]:
    """(answer start, answer end, turn end) character positions of the earlier assistant turns in ``text``.

    Each turn is found by rendering prefixes: the conversation up to the turn with the
    generation prompt ends where the answer starts; the conversation including the turn ends
    after its end-of-turn marker (cut where it departs from ``text``: some templates write an
    EOS after a finished conversation). When the first render is not a prefix of ``text``, the
    answer is looked for after the previous one. An answer that is not in ``text`` at all (a
    template that rewrites past turns) is a :class:`DataError`, never silently left untrained.
    """
    spans: list[tuple[int, int, int]] = []
    cursor = 0
    for index, message in enumerate(messages):
        if message["role"] != "assistant" or not message["content"].strip():
            continue
        start, end = cursor, len(text)
        try:
            before, after = render(messages[:index], True), render(messages[: index + 1], False)
        except Exception:  # a template that rejects a prefix: search instead
            before = after = ""
        if before and text.startswith(before) and len(before) >= cursor:
            common = next((i for i, (a, b) in enumerate(zip(after, text)) if a != b), min(len(after), len(text)))
            start, end = len(before), max(common, len(before))
        found, needle = -1, message["content"]
        for needle in (message["content"], message["content"].strip()):  # some templates trim messages
            found = text.find(needle, start, end)  # without prefix renders: after the previous answer
            if found >= 0:
                break
        if found < 0:
            raise DataError(
                f"assistant message {index} is not in the rendered chat template (the template rewrites past answers)",
                where=example.source or "prompt.template",
                fix="set prompt.template to a named template (chatml, llama3, ...), "
                "or keep only the last answer in messages",
            )
        answer_end = found + len(needle)
        spans.append((found, answer_end, end))
        cursor = answer_end
    return spans


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(token, "special", False):
            ids.add(int(token_id))
    return ids


def _label_turns(
    tokenizer: Any, text: str, add_special_tokens: bool, spans: list[tuple[int, int, int]], example: Example
) -> tuple[list[int], list[int]]:
    """Token ids of ``text`` and labels: each answer's tokens plus the end-of-turn token right after it."""
    try:
        encoded = tokenizer(text, add_special_tokens=add_special_tokens, return_offsets_mapping=True)
    except NotImplementedError:
        raise DataError(
            "training on every assistant turn needs a fast tokenizer (offset mapping)",
            where=example.source or "messages",
            fix="load the model's tokenizer.json (a fast tokenizer), or keep only the last answer in messages",
        ) from None
    ids, offsets = encoded["input_ids"], encoded["offset_mapping"]
    specials = _special_ids(tokenizer)
    labels = [-100] * len(ids)
    for start, end, turn_end in spans:
        closing = None
        for position, (token_start, token_end) in enumerate(offsets):
            if token_end > token_start and token_start < end and token_end > start:
                labels[position] = ids[position]  # overlaps the answer
            elif (
                closing is None
                and end <= token_start < turn_end
                and ids[position] in specials
                and not text[end:token_start].strip()
            ):
                closing = position  # the template's end-of-turn token (<|im_end|>, <|eot_id|>, </s>...)
        if closing is not None:
            labels[closing] = ids[closing]
    return ids, labels


def _encode_prompt_with_labels(
    tokenizer: Any, example: Example, template: str | None, system: str | None
) -> tuple[list[int], list[int]]:
    """The prompt's ids (exactly :func:`encode_prompt`'s) and labels: -100 except on earlier assistant turns."""
    text = render_prompt(tokenizer, example, template, system)
    add_special_tokens = adds_special_tokens(tokenizer, template)
    render = _chat_renderer(tokenizer, template)
    if render is not None and any(m["role"] == "assistant" for m in example.messages or []):
        spans = _assistant_spans(render, _conversation(example, system), text, example)
        if spans:
            return _label_turns(tokenizer, text, add_special_tokens, spans, example)
    ids = tokenizer(text, add_special_tokens=add_special_tokens)["input_ids"]
    return ids, [-100] * len(ids)


def _encode_text(tokenizer: Any, example: Example, max_len: int) -> Encoded:
    """Plain text (continued pre-training): BOS as the tokenizer adds it, EOS appended, loss on every token."""
    ids = tokenizer(example.completion, add_special_tokens=True)["input_ids"]
    if not ids or ids[-1] != tokenizer.eos_token_id:
        ids = ids + [tokenizer.eos_token_id]
    full_length = len(ids)
    truncated = full_length > max_len
    if truncated:
        ids = ids[:max_len]  # the start of the document; its end is dropped (and counted)
    return Encoded(input_ids=ids, labels=list(ids), truncated=truncated, full_length=full_length)


def encode_example(
    tokenizer: Any, example: Example, max_len: int, template: str | None = None, system: str | None = None
) -> Encoded:
    """Tokens and labels of one training example.

    The last answer is encoded as the completion (answer tokens + EOS) after
    :func:`encode_prompt`'s tokens, exactly like a single-turn example. In a conversation, the
    earlier assistant answers (and the end-of-turn token after each) are labelled too, so every
    answer is trained on; system, user and role-header tokens stay at -100. Plain-text examples
    are trained on every token.
    """
    if example.kind == "text":
        return _encode_text(tokenizer, example, max_len)
    prompt_ids, prompt_labels = _encode_prompt_with_labels(tokenizer, example, template, system)
    completion_ids = encode_completion(tokenizer, example.completion)
    full_length = len(prompt_ids) + len(completion_ids)
    truncated = full_length > max_len
    if truncated:
        completion_ids = (
            completion_ids[: max(1, max_len // 2)] if len(completion_ids) > max_len // 2 else completion_ids
        )
        kept = fit_prompt(list(range(len(prompt_ids))), max_len - len(completion_ids))
        prompt_ids, prompt_labels = [prompt_ids[i] for i in kept], [prompt_labels[i] for i in kept]
    return Encoded(
        input_ids=prompt_ids + completion_ids,
        labels=prompt_labels + completion_ids,
        truncated=truncated,
        full_length=full_length,
    )
