"""The chat template a merged model ships with: the one the run was trained with.

A merged directory is used through ``tokenizer.apply_chat_template`` by tools that know nothing
of affinage, so its template must render exactly the prompt the run trained on:
- the model's own template, with the run's ``prompt.system`` as the default system message
  (SmolLM2's template would otherwise insert its own default and change every prompt);
- a named template (alpaca, chatml, llama2, llama3, mistral, phi3) written as its Jinja twin,
  which renders exactly what :mod:`affinage.data.template` renders (tests/data/test_template_parity.py).
A literal ``{field}`` template cannot be expressed: it keeps the base template; the merge report
says so.
"""

from __future__ import annotations

import json
from typing import Any

ALPACA_JINJA = (
    "{%- for message in messages %}"
    "{%- if message['role'] == 'user' %}"
    "{{ 'Below is an instruction that describes a task. "
    "Write a response that appropriately completes the request.\\n\\n"
    "### Instruction:\\n' + message['content'] + '\\n\\n### Response:\\n' }}"
    "{%- elif message['role'] == 'assistant' %}{{ message['content'] + eos_token }}"
    "{%- endif %}{%- endfor %}"
)

CHATML_JINJA = (
    "{%- for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{%- endif %}"
)

PHI3_JINJA = (
    "{%- for message in messages %}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|assistant|>\\n' }}{%- endif %}"
)

LLAMA3_JINJA = (
    "{{ '<|begin_of_text|>' }}{%- for message in messages %}"
    "{{ '<|start_header_id|>' + message['role'] + '<|end_header_id|>\\n\\n' "
    "+ message['content'] | trim + '<|eot_id|>' }}{%- endfor %}"
    "{%- if add_generation_prompt %}{{ '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}{%- endif %}"
)

# Llama 2 chat and Mistral instruct (``_inst`` in affinage.data.template): the system message
# is taken out of the loop and folded into the first instruction; turns must alternate
# user/assistant; the BOS ``<s>`` and ``</s>`` are written literally, as training writes them.
_INST_PRELUDE = (
    "{%- if messages and messages[0]['role'] == 'system' %}"
    "{%- set system = messages[0]['content'] %}{%- set loop_messages = messages[1:] %}"
    "{%- else %}{%- set system = none %}{%- set loop_messages = messages %}{%- endif %}"
)


def _alternation_check(name: str) -> str:
    """Refuse what ``_inst`` refuses (roles out of turn), rather than render a prompt training never saw."""
    return (
        "{%- set expected = 'user' if loop.index0 % 2 == 0 else 'assistant' %}"
        "{%- if message['role'] != expected %}{{ raise_exception('"
        + name
        + " needs user and assistant turns to alternate, starting with the user') }}{%- endif %}"
    )


# Meta's format: every exchange opens with <s>, <<SYS>> inside the first [INST], contents trimmed,
# answers padded with spaces.
LLAMA2_JINJA = (
    _INST_PRELUDE
    + "{%- for message in loop_messages %}"
    + _alternation_check("llama2")
    + "{%- if message['role'] == 'user' %}"
    "{%- if loop.first and system is not none %}"
    "{{ '<s>[INST] <<SYS>>\\n' + system + '\\n<</SYS>>\\n\\n' + message['content'] | trim + ' [/INST]' }}"
    "{%- else %}{{ '<s>[INST] ' + message['content'] | trim + ' [/INST]' }}{%- endif %}"
    "{%- else %}{{ ' ' + message['content'] | trim + ' </s>' }}{%- endif %}"
    "{%- endfor %}"
)

# Mistral's format: one <s> at the start, no system role (the system message opens the first
# instruction), contents as they are, answers followed directly by </s>.
MISTRAL_JINJA = (
    _INST_PRELUDE
    + "{%- for message in loop_messages %}"
    + _alternation_check("mistral")
    + "{%- if message['role'] == 'user' %}"
    "{%- if loop.first %}{{ '<s>' }}{%- endif %}"
    "{%- if loop.first and system is not none %}{{ '[INST] ' + system + '\\n\\n' + message['content'] + ' [/INST]' }}"
    "{%- else %}{{ '[INST] ' + message['content'] + ' [/INST]' }}{%- endif %}"
    "{%- else %}{{ ' ' + message['content'] + '</s>' }}{%- endif %}"
    "{%- endfor %}"
)

NAMED_JINJA = {
    "alpaca": ALPACA_JINJA,
    "chatml": CHATML_JINJA,
    "llama2": LLAMA2_JINJA,
    "llama3": LLAMA3_JINJA,
    "mistral": MISTRAL_JINJA,
    "phi3": PHI3_JINJA,
}


def with_default_system(template: str, system: str) -> str:
    """``template`` with ``system`` as the system message whenever the conversation has none."""
    default = (
        "{%- if not messages or messages[0]['role'] != 'system' %}"
        + "{%- set messages = [{'role': 'system', 'content': "
        + json.dumps(system)
        + "}] + messages %}{%- endif %}"
    )
    return default + template


def merged_chat_template(
    base_template: str | None, prompt_template: str | None, system: str | None, adds_bos: bool = False
) -> tuple[str | None, str]:
    """(the template to save, a note for the merge report).

    ``adds_bos``: training put the tokenizer's BOS before a named template's text (alpaca,
    chatml, phi3 on a tokenizer that adds one, e.g. Gemma's); a chat template's text is
    tokenized without special tokens, so the exported template writes ``bos_token`` itself.
    """
    from affinage.data.template import template_name

    name = template_name(prompt_template)
    if prompt_template is None:
        if base_template and system is not None:
            return with_default_system(
                base_template, system
            ), f"the model's chat template with the run's system message {system!r} as default"
        return base_template, "the model's own chat template"
    if name in NAMED_JINJA:
        template = NAMED_JINJA[name]
        if system is not None and name != "alpaca":
            template = with_default_system(template, system)
        if adds_bos:
            template = "{{ bos_token }}" + template
        return template, f"the '{name}' template the run was trained with"
    return base_template, (
        f"the base model's chat template: the run's template {prompt_template!r} has no chat-template form; "
        "render prompts with affinage (BasicModelRunner) to match training"
    )


def run_chat_template(tokenizer: Any, template: str | None, system: str | None) -> tuple[str | None, str, bool]:
    """The chat template an export of a run ships: (template, note, whether it renders the training prompt).

    When it does not (a literal ``{field}`` template), clients must send the
    prompt as affinage renders it (a plain completion), and the export says so.
    """
    from affinage.data.template import adds_special_tokens, template_name, tokenizer_adds, uses_chat_template

    name = template_name(template)
    base = getattr(tokenizer, "chat_template", None)
    bos = (
        name in NAMED_JINJA
        and adds_special_tokens(tokenizer, template)
        and tokenizer_adds(tokenizer, tokenizer.bos_token_id)
    )
    exported, note = merged_chat_template(base, template, system, adds_bos=bos)
    exact = name in NAMED_JINJA or uses_chat_template(tokenizer, template)
    return exported, note, exact
