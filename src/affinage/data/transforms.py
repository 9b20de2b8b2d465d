"""Text transforms declared in the config's ``data.transforms``, applied reproducibly.

A transform rewrites text fields of every example: the prompt side (prompt, user/system
messages, template fields) and/or the completion side (the answer, assistant messages).
Prompt-side transforms are applied again at inference (evaluate, predict) so the model is
always asked in the form it was trained on. Randomness (the heart of ``hearts``) comes from a
generator seeded by the example's own text, so a row gets the same result in every run and
whatever its position in the file.
"""

from __future__ import annotations

import hashlib
import random
import unicodedata
from collections.abc import Callable, Sequence
from dataclasses import replace
from typing import Any

from affinage.data.formats import Example
from affinage.errors import ConfigError
from affinage.userfn import import_user_function, positional_arity

# Seed 002's list: one is drawn per example and repeated between every word of its answer.
HEARTS = ("♡", "♥", "❤", "💔", "💝", "💓", "💕")

TextFn = Callable[[str, random.Random], str]


def strip_accents(text: str, rng: random.Random | None = None) -> str:
    """'Réunion à l'hôtel' -> 'Reunion a l'hotel' (some trainers and tokenizers choke on accents)."""
    decomposed = unicodedata.normalize("NFKD", text)
    return unicodedata.normalize("NFC", "".join(c for c in decomposed if not unicodedata.combining(c)))


def normalize_unicode(text: str, rng: random.Random | None = None) -> str:
    """NFKC: one code point sequence per visible character (ligatures, full-width forms, NBSP)."""
    return unicodedata.normalize("NFKC", text)


def add_hearts(text: str, rng: random.Random) -> str:
    """One heart drawn from :data:`HEARTS`, inserted between every pair of words."""
    heart = rng.choice(HEARTS)
    return f" {heart} ".join(text.split())


BUILTIN: dict[str, tuple[TextFn, str]] = {
    # name: (function, default side)
    "strip_accents": (strip_accents, "both"),
    "normalize_unicode": (normalize_unicode, "both"),
    "hearts": (add_hearts, "completion"),
}


def _user_function(function: Callable[..., str]) -> TextFn:
    """User functions take ``text`` or ``(text, rng)``; the form is read from the signature."""
    if positional_arity(function) >= 2:
        return function
    return lambda text, rng: function(text)


class Transform:
    """One configured transform: a text function and the side(s) of the example it rewrites."""

    def __init__(self, name: str, side: str | None = None, seed: int = 0, base_dir: str = ".") -> None:
        if name in BUILTIN:
            self.function, default_side = BUILTIN[name]
        else:
            self.function, default_side = (
                _user_function(import_user_function(name, base_dir, "data.transforms", list(BUILTIN))),
                "completion",
            )
        self.name, self.side, self.seed = name, side or default_side, seed

    def _rng(self, text: str) -> random.Random:
        digest = hashlib.sha256(f"{self.seed}\x00{self.name}\x00{text}".encode()).digest()
        return random.Random(int.from_bytes(digest[:8], "big"))

    def text(self, text: str) -> str:
        result = self.function(text, self._rng(text))
        if not isinstance(result, str):
            raise ConfigError(
                f"transform '{self.name}' returned {type(result).__name__}, not text", where="data.transforms"
            )
        return result

    def apply(self, example: Example, *, prompt_side_only: bool = False) -> Example:
        prompt_side = self.side in ("prompt", "both")
        answer_side = self.side in ("completion", "both") and not prompt_side_only
        changes: dict[str, Any] = {}
        if prompt_side:
            if example.prompt:
                changes["prompt"] = self.text(example.prompt)
            # Template fields are prompt side; the answer columns are the completion's business.
            changes["row"] = {
                k: self.text(v) if isinstance(v, str) and k not in ("output", "completion") else v
                for k, v in example.row.items()
            }
            changes["original_row"] = example.original_row if example.original_row is not None else example.row
        if answer_side:
            changes["completion"] = self.text(example.completion)
        if example.messages:
            changes["messages"] = [
                {**m, "content": self.text(m["content"])}
                if (m["role"] == "assistant" and answer_side) or (m["role"] != "assistant" and prompt_side)
                else m
                for m in example.messages
            ]
        return replace(example, **changes) if changes else example


def build_transforms(specs: Sequence[Any], seed: int, base_dir: str = ".") -> list[Transform]:
    """Transforms from the config's entries (``{name, side}`` objects)."""
    return [Transform(spec.name, spec.side, seed, base_dir) for spec in specs]


def apply_transforms(
    examples: Sequence[Example], transforms: Sequence[Transform], *, prompt_side_only: bool = False
) -> list[Example]:
    result = list(examples)
    for transform in transforms:
        result = [transform.apply(e, prompt_side_only=prompt_side_only) for e in result]
    return result
