"""The checks an export passes before it is declared written (see ``run_export``).

- ``check_gguf``: the GGUF in llama.cpp, prompted through its own chat template, against the
  run's greedy answers on the test split (and the prompt token ids, to name a tokenizer or
  template mismatch as such).
- ``check_ollama_template``: the Modelfile's TEMPLATE rendered by Go's text/template with the
  messages Ollama would pass, against the prompt the run was trained on.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from affinage.data.template import adds_special_tokens, render_prompt, template_name
from affinage.errors import AffinageError
from affinage.evaluate import match_label
from affinage.export.go_render import go_available, render_with_go
from affinage.export.llamacpp_check import (
    INSTALL_HINT,
    Compared,
    agreement_report,
    chat_messages,
    llama_cpp_answer,
    llama_cpp_available,
    llama_cpp_prompt_ids,
    open_gguf,
    same_top_tokens,
)

GGUF_FORMATS = ("gguf", "gguf-lora", "ollama")


def require_checkers(fmt: str) -> None:
    """Fail before anything loads when a check cannot run here."""
    if fmt in GGUF_FORMATS and not llama_cpp_available():
        raise AffinageError("verifying a GGUF export needs llama.cpp (llama-cpp-python)", fix=INSTALL_HINT)
    if fmt == "ollama" and not go_available():
        raise AffinageError(
            "verifying an Ollama TEMPLATE needs Go (it renders the template as Ollama does)",
            fix="apt-get install golang-go, or pass --no-check",
        )


def task_metric(run: Any, examples: Sequence[Any], answers: Sequence[str]) -> dict[str, float] | None:
    """The run's task metric on ``answers``: label accuracy, or the pattern checker's mean score."""
    gold = [e.completion.strip() for e in examples]
    if run.task.get("task") == "classification" and run.task.get("labels"):
        labels = run.task["labels"]
        hits = [match_label(answer, labels) == label for answer, label in zip(answers, gold)]
        return {"accuracy": round(sum(hits) / max(len(hits), 1), 4)}
    if run.config.eval.pattern:
        from affinage.evaluate.patterns import resolve_checker

        checker = resolve_checker(run.config.eval.pattern, str(run.path))
        return {"pattern_score": round(sum(checker(a) for a in answers) / max(len(answers), 1), 4)}
    return None


def check_gguf(shipment: Any, examples: Sequence[Any], answers: Sequence[str]) -> dict[str, Any]:
    """llama.cpp's answers, prompt tokens and top tokens against the run's, on ``examples``.

    The gate is the share of identical answers for a label task (the label is the answer), and
    for free generation the share of answer tokens llama.cpp would also pick given the same
    prefix: two free-running generations part at the first near-tie (which of seven hearts) and
    never meet again, while a broken file (wrong weights, tokenizer or template) fails both.
    """
    run = shipment.run
    chat = shipment.chat_exact and bool(shipment.chat_template)
    n_ctx = max(2048, 2 * run.config.trainer.max_seq_len)
    llm = open_gguf(shipment.model_gguf, lora_path=shipment.lora_gguf, n_ctx=n_ctx, logits_all=True)
    try:
        formatter = _chat_formatter(llm, shipment.chat_template) if chat else None
        compared = [_compare(llm, formatter, shipment, example, ours) for example, ours in zip(examples, answers)]
    finally:
        llm.close()
    report = agreement_report(answers, compared, examples)
    report["through"] = (
        "create_chat_completion (the GGUF's chat template)" if chat else "create_completion (affinage's prompt)"
    )
    report["gate"] = "agreement" if run.task.get("task") == "classification" else "token_agreement"
    sendable = [c.same_prompt for e, c in zip(examples, compared) if has_chat_form(e, run.config.prompt.template)]
    report["same_prompt_tokens_chat_form"] = round(sum(sendable) / max(len(sendable), 1), 4)
    report["task_metric"] = {
        "affinage": task_metric(run, examples, answers),
        "llama.cpp": task_metric(run, examples, [c.answer.text for c in compared]),
    }
    return report


def _compare(llm: Any, formatter: Any, shipment: Any, example: Any, ours: str) -> Compared:
    tokenizer, prompt = shipment.run.tokenizer, shipment.run.config.prompt
    add_bos = adds_special_tokens(tokenizer, prompt.template)
    text = render_prompt(tokenizer, example, prompt.template, prompt.system)
    ours_ids = tokenizer(text, add_special_tokens=add_bos)["input_ids"]
    if formatter is not None:
        their_ids = llama_cpp_prompt_ids(llm, formatter(messages=chat_messages(example)).prompt, add_bos=False)
    else:
        their_ids = llama_cpp_prompt_ids(llm, text, add_bos=add_bos)
    budget = shipment.options.check_tokens
    answer = llama_cpp_answer(llm, example, chat=formatter is not None, prompt_text=text, max_new_tokens=budget)
    answer_ids = tokenizer(ours, add_special_tokens=False)["input_ids"][:budget]
    if len(answer_ids) < budget:  # affinage stopped before the budget: at its EOS, which llama.cpp must pick too
        answer_ids.append(tokenizer.eos_token_id)
    same_top = same_top_tokens(llm, their_ids, answer_ids)
    return Compared(answer, list(ours_ids) == their_ids, same_top, len(answer_ids))


def _chat_formatter(llm: Any, template: str) -> Any:
    """llama-cpp-python's own formatter for the file's template, with the BOS/EOS texts it uses."""
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    def text(token_id: int) -> str:
        return llm.detokenize([token_id], special=True).decode("utf-8", "replace") if token_id >= 0 else ""

    return Jinja2ChatFormatter(template=template, eos_token=text(llm.token_eos()), bos_token=text(llm.token_bos()))


def modelfile_template(modelfile: str) -> str:
    found = re.search(r'^TEMPLATE """(.*?)"""', modelfile, flags=re.S | re.M)
    if found is None:
        raise AffinageError("the Modelfile has no TEMPLATE", fix="report this as a bug")
    return found.group(1)


def ollama_messages(example: Any, system: str | None) -> list[dict[str, str]]:
    """The messages Ollama passes to the TEMPLATE: the Modelfile's SYSTEM first when the request has none."""
    messages = chat_messages(example)
    if system and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    return messages


def check_ollama_template(shipment: Any, examples: Sequence[Any]) -> dict[str, Any]:
    run = shipment.run
    tokenizer, prompt = run.tokenizer, run.config.prompt
    if not shipment.chat_exact:
        return {"n": 0, "same": 0, "note": "the run's prompt has no chat form: clients send affinage's rendered prompt"}
    template = modelfile_template((shipment.directory / "Modelfile").read_text(encoding="utf-8"))
    expressible = [e for e in examples if has_chat_form(e, prompt.template)]
    skipped, examples = len(examples) - len(expressible), expressible
    rendered = render_with_go(template, [ollama_messages(e, prompt.system) for e in examples])
    expected = [render_prompt(tokenizer, e, prompt.template, prompt.system) for e in examples]
    if shipment.drop_bos and tokenizer.bos_token:  # Ollama's tokenizer adds the BOS the template leaves out
        expected = [text.removeprefix(tokenizer.bos_token) for text in expected]
    same = [a == b for a, b in zip(rendered, expected)]
    differences = [{"go": a, "training": b} for a, b, s in zip(rendered, expected, same) if not s]
    report = {"n": len(same), "same": sum(same), "differences": differences[:5]}
    if skipped:
        report["no_chat_form"] = skipped  # Alpaca rows with an input: one chat message cannot carry two fields
    return report


def has_chat_form(example: Any, template: str | None) -> bool:
    """Whether a chat client can send this row as training saw it.

    An Alpaca row with an ``input`` is rendered with Alpaca's "paired with an input" preamble in
    training; a chat client sends one user message, so no chat template can tell the two apart.
    """
    return template_name(template) != "alpaca" or not str(example.row.get("input") or "").strip()
