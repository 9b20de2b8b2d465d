"""Does the GGUF answer like the run? llama.cpp (through ``llama-cpp-python``) against affinage.

The GGUF side is used exactly as a user's client would use it: the file's own chat template
through ``create_chat_completion`` (a run without a chat form, such as a literal ``{field}``
template, gets its rendered prompt through ``create_completion``), greedy decoding. The
affinage side is the run's adapter model with the same greedy decoding. The two answers must
be identical for ``agreement`` to count them; the prompt token ids are compared too, so a
tokenizer or template mismatch is named as such rather than guessed from the answers.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from affinage.data.formats import Example
from affinage.errors import AffinageError

INSTALL_HINT = (
    'CMAKE_ARGS="-DGGML_NATIVE=OFF" pip install "affinage[export]" (builds llama-cpp-python, '
    "~10 min on 2 cores), or pass --no-check to write the export unverified"
)


def llama_cpp_available() -> bool:
    return importlib.util.find_spec("llama_cpp") is not None


def open_gguf(model_path: Path, *, lora_path: Path | None = None, n_ctx: int = 2048, logits_all: bool = False) -> Any:
    """A llama.cpp model (optionally with a GGUF LoRA adapter applied at load)."""
    if not llama_cpp_available():
        raise AffinageError("verifying a GGUF export needs llama.cpp (llama-cpp-python)", fix=INSTALL_HINT)
    from llama_cpp import Llama

    threads = int(os.environ.get("AFFINAGE_THREADS") or len(os.sched_getaffinity(0)))
    try:
        return Llama(
            model_path=str(model_path),
            lora_path=str(lora_path) if lora_path else None,
            n_ctx=n_ctx,
            logits_all=logits_all,
            n_threads=threads,
            n_threads_batch=threads,
            verbose=False,
            seed=0,
        )
    except (ValueError, RuntimeError) as error:  # llama.cpp refused the file: say so, never a traceback
        raise AffinageError(f"llama.cpp could not load {model_path}: {error}", fix="see the export report") from None


def chat_messages(example: Example) -> list[dict[str, str]]:
    """What a client sends: the conversation so far and the prompt as the last user turn.

    The run's default system message is not sent: the exported chat template carries it.
    """
    messages = [dict(m) for m in example.messages or []]
    if example.prompt is not None:
        messages.append({"role": "user", "content": example.prompt})
    return messages


@dataclass
class Answer:
    text: str
    cut: bool  # stopped by the token budget, not by an end-of-turn token


def same_answer(ours: str, theirs: Answer) -> bool:
    """The same greedy answer, allowing for where each side cuts a multi-byte character at the budget.

    Cut at the budget inside a character (an emoji is several tokens), affinage drops the partial
    character while llama-cpp-python generates on until the character is whole: the texts then
    differ by that one trailing character only.
    """
    if ours == theirs.text:
        return True
    tail = theirs.text[len(ours) :].strip()
    return theirs.cut and theirs.text.startswith(ours) and len(tail) == 1 and not tail.isascii()


def llama_cpp_answer(llm: Any, example: Example, *, chat: bool, prompt_text: str, max_new_tokens: int) -> Answer:
    greedy = {"temperature": 0.0, "top_k": 1, "top_p": 1.0, "min_p": 0.0, "repeat_penalty": 1.0, "seed": 0}
    if chat:
        out = llm.create_chat_completion(messages=chat_messages(example), max_tokens=max_new_tokens, **greedy)
        text = out["choices"][0]["message"]["content"] or ""
    else:
        out = llm.create_completion(prompt=prompt_text, max_tokens=max_new_tokens, **greedy)
        text = out["choices"][0]["text"]
    return Answer(text.rstrip("\ufffd").strip(), cut=out["choices"][0].get("finish_reason") == "length")


def llama_cpp_prompt_ids(llm: Any, text: str, add_bos: bool) -> list[int]:
    """llama.cpp's tokens for ``text`` with special tokens parsed, as its chat completion tokenizes a prompt."""
    return list(llm.tokenize(text.encode("utf-8"), add_bos=add_bos, special=True))


def same_top_tokens(llm: Any, prompt_ids: list[int], answer_ids: list[int]) -> int:
    """How many of ``answer_ids`` llama.cpp picks itself given the same prefix (teacher forcing).

    llama.cpp's own quantization report calls this "same top": the share of positions where the
    quantized model's most likely token is the reference's.
    """
    if not answer_ids:
        return 0
    llm.reset()
    llm.eval(prompt_ids + answer_ids)
    start = len(prompt_ids) - 1
    scores = np.asarray(llm.scores[start : start + len(answer_ids)])
    return int((scores.argmax(axis=-1) == np.asarray(answer_ids)).sum())


@dataclass
class Compared:
    """One test prompt on the llama.cpp side."""

    answer: Answer
    same_prompt: bool  # the chat template + tokenizer give affinage's prompt ids
    same_top: int  # answer tokens llama.cpp also picks given affinage's prefix
    answer_tokens: int


def agreement_report(ours: Sequence[str], compared: Sequence[Compared], examples: Sequence[Example]) -> dict[str, Any]:
    same = [same_answer(a, c.answer) for a, c in zip(ours, compared)]
    n = max(len(same), 1)
    differences = [
        {
            "prompt": (e.prompt or "")[:200],
            "affinage": a,
            "llama.cpp": c.answer.text,
            "same_prompt_tokens": c.same_prompt,
        }
        for e, a, c, s in zip(examples, ours, compared, same)
        if not s
    ]
    tokens = sum(c.answer_tokens for c in compared)
    return {
        "n": len(same),
        "agreement": round(sum(same) / n, 4),
        "token_agreement": round(sum(c.same_top for c in compared) / max(tokens, 1), 4),
        "same_prompt_tokens": round(sum(c.same_prompt for c in compared) / n, 4),
        "differences": differences[:10],
    }
