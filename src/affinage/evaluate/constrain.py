"""Constrained decoding: every generated answer matches a regex or is JSON valid against a schema.

A filter after the fact cannot make a model's answer parse; masking the logits can. outlines-core
(Rust, no dependency) compiles the regex (a JSON schema is first turned into one) into an
automaton over the tokenizer's tokens: each state lists the tokens that keep the text a prefix of
a match, and EOS is allowed only where the text is a whole match. On top of that mask this module
counts, for every state, the fewest tokens that still complete a match, and forbids a token after
which the tokens left (``max_new_tokens``) could not: an answer cut by the length limit is still
complete, so an unbounded string in a schema cannot leave a JSON object open.
"""

from __future__ import annotations

import json
import re
import weakref
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch
from transformers import LogitsProcessor

from affinage.constraint_config import ConstraintConfig
from affinage.errors import ConfigError

UNREACHABLE = 1 << 30  # distance of a state from which no match can be completed
MASK_CACHE_BYTES = 64 << 20  # allowed-token rows kept per compiled constraint (1 byte per token)


@dataclass(frozen=True)
class Constraint:
    """A constraint ready to compile: the regex every answer fully matches, and where it came from."""

    regex: str
    kind: str  # "regex" or "json_schema": names the config key in errors
    schema: dict[str, Any] | None = None

    @classmethod
    def from_regex(cls, pattern: str) -> Constraint:
        return cls(regex=pattern, kind="regex")

    @classmethod
    def from_json_schema(cls, schema: dict[str, Any]) -> Constraint:
        from outlines_core.json_schema import build_regex_from_schema

        try:
            pattern = build_regex_from_schema(json.dumps(schema))
        except Exception as error:  # outlines-core raises its own error types for unsupported schemas
            raise ConfigError(
                f"this JSON schema cannot be compiled for constrained decoding: {error}",
                where="generation.constraint.json_schema",
                fix="use the usual keywords (type, properties, required, enum, items, minimum...)",
            ) from None
        return cls(regex=pattern, kind="json_schema", schema=schema)

    @classmethod
    def from_config(cls, config: ConstraintConfig | None) -> Constraint | None:
        if config is None:
            return None
        if config.regex is not None:
            return cls.from_regex(config.regex)
        schema = config.json_schema
        return cls.from_json_schema(json.loads(schema) if isinstance(schema, str) else dict(schema or {}))


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte in the vocabulary."""
    visible = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    visible += list(range(ord("®"), ord("ÿ") + 1))
    mapping, extra = {b: chr(b) for b in visible}, 0
    for b in range(256):
        if b not in mapping:
            mapping[b] = chr(256 + extra)
            extra += 1
    return mapping


UNICODE_TO_BYTE = {char: byte for byte, char in _bytes_to_unicode().items()}
BYTE_TOKEN = re.compile(r"<0x([0-9A-Fa-f]{2})>")


def _decoders(tokenizer: Any) -> list[dict[str, Any]]:
    """The tokenizer's decoder steps (a Sequence flattened), from the fast tokenizer's JSON."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return []
    decoder = json.loads(backend.to_str()).get("decoder") or {}
    return decoder.get("decoders", [decoder]) if decoder.get("type") == "Sequence" else [decoder]


def token_bytes(tokenizer: Any) -> dict[bytes, list[int]]:
    """The bytes each ordinary token stands for, for byte-level BPE (GPT-2, SmolLM2, Llama 3) and
    sentencepiece-style vocabularies (Gemma, Llama 2: '▁' for a space, <0xNN> byte fallback).

    Special tokens are left out: EOS is the automaton's own, the others may never appear.
    """
    special = set(tokenizer.all_special_ids)
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    special |= {index for index, token in added.items() if getattr(token, "special", False)}
    steps = _decoders(tokenizer)
    kinds = {step.get("type") for step in steps}
    replacements = [
        (step["pattern"].get("String"), step["content"])
        for step in steps
        if step.get("type") == "Replace" and step.get("pattern", {}).get("String")
    ]
    replacements += [(step.get("replacement", "▁"), " ") for step in steps if step.get("type") == "Metaspace"]
    vocabulary: dict[bytes, list[int]] = {}
    for token, index in tokenizer.get_vocab().items():
        if index in special:
            continue
        if index in added:
            data = token.encode("utf-8")  # an added ordinary token is its literal text
        elif "ByteLevel" in kinds:
            if any(char not in UNICODE_TO_BYTE for char in token):
                continue
            data = bytes(UNICODE_TO_BYTE[char] for char in token)
        elif "ByteFallback" in kinds and BYTE_TOKEN.fullmatch(token):
            data = bytes([int(token[3:5], 16)])
        elif replacements:
            for pattern, content in replacements:
                token = token.replace(pattern, content)
            data = token.encode("utf-8")
        else:  # an unknown decoder: trust its own rendering, skip tokens that are part of a character
            text = tokenizer.convert_tokens_to_string([token])
            if "\ufffd" in text:
                continue
            data = text.encode("utf-8")
        if data:
            vocabulary.setdefault(data, []).append(index)
    return vocabulary


class CompiledConstraint:
    """A constraint's token automaton for one tokenizer, each state's distance to a match, cached masks."""

    def __init__(self, constraint: Constraint, tokenizer: Any):
        from outlines_core import Index, Vocabulary

        if tokenizer.eos_token_id is None:
            raise ConfigError("constrained decoding needs a tokenizer with an EOS token", where="generation.constraint")
        self.constraint, self.eos = constraint, tokenizer.eos_token_id
        try:
            self.index = Index(constraint.regex, Vocabulary(self.eos, token_bytes(tokenizer)))
        except Exception as error:  # outlines-core: unsupported syntax, or no token sequence can match
            raise ConfigError(
                f"the {constraint.kind} constraint cannot be compiled for this tokenizer: {error}",
                where=f"generation.constraint.{constraint.kind}",
                fix="use a regular expression without look-around or back-references that some text can match",
            ) from None
        self.initial, self.finals = self.index.get_initial_state(), frozenset(self.index.get_final_states())
        self.transitions: dict[int, dict[int, int]] = self.index.get_transitions()
        self.distance = self._distances()
        self._tokens: dict[int, tuple[torch.Tensor, torch.Tensor, int]] = {}
        self._rows: dict[int, torch.Tensor] = {}  # least recently used first

    def _distances(self) -> dict[int, int]:
        """Fewest tokens from each state to a whole match (0 in a final state): a BFS backwards from them."""
        predecessors: dict[int, set[int]] = {}
        for state, moves in self.transitions.items():
            for following in set(moves.values()) - {state}:
                predecessors.setdefault(following, set()).add(state)
        distance = {state: 0 for state in self.finals}
        queue = deque(distance)
        while queue:
            state = queue.popleft()
            for previous in predecessors.get(state, ()):
                if previous not in distance:
                    distance[previous] = distance[state] + 1
                    queue.append(previous)
        return distance

    def min_tokens(self) -> int:
        """Fewest new tokens that make a whole match (UNREACHABLE when none can)."""
        return self.distance.get(self.initial, UNREACHABLE)

    def next_state(self, state: int, token: int) -> int | None:
        """The state after ``token``; None when the automaton has no such move (the row has ended)."""
        return self.transitions.get(state, {}).get(token)

    def allowed(self, state: int, budget: int, width: int) -> torch.Tensor:
        """A (width,) boolean row: the tokens allowed in ``state`` when ``budget`` tokens may follow this one.

        Rows that the budget does not cut are cached (up to ``MASK_CACHE_BYTES``): a state is
        usually visited by many rows and steps, and building a row costs ~1 ms on a 49k vocabulary.
        """
        if state not in self._tokens:
            moves = self.transitions.get(state, {})
            ids = torch.tensor(list(moves), dtype=torch.long)
            after = torch.tensor([self.distance.get(n, UNREACHABLE) for n in moves.values()], dtype=torch.long)
            # never allowed: a move into a dead state, or a tokenizer id the model's head lacks
            keep = (after < UNREACHABLE) & (ids < width)
            ids, after = ids[keep], after[keep]
            self._tokens[state] = (ids, after, int(after.max()) if after.numel() else 0)
        ids, after, worst = self._tokens[state]
        if budget < worst:
            return torch.zeros(width, dtype=torch.bool).index_fill_(0, ids[after <= budget], True)
        row = self._rows.pop(state, None)
        if row is None or row.numel() != width:
            row = torch.zeros(width, dtype=torch.bool).index_fill_(0, ids, True)
            while self._rows and (len(self._rows) + 1) * width > MASK_CACHE_BYTES:
                self._rows.pop(next(iter(self._rows)))  # the least recently used
        self._rows[state] = row
        return row


_COMPILED: weakref.WeakKeyDictionary[Any, dict[str, CompiledConstraint]] = weakref.WeakKeyDictionary()


def compile_constraint(constraint: Constraint, tokenizer: Any) -> CompiledConstraint:
    """The compiled constraint, built once per tokenizer and regex (eval runs it for base and fine-tuned)."""
    per_tokenizer = _COMPILED.setdefault(tokenizer, {})
    if constraint.regex not in per_tokenizer:
        per_tokenizer[constraint.regex] = CompiledConstraint(constraint, tokenizer)
    return per_tokenizer[constraint.regex]


class ConstrainedLogits(LogitsProcessor):
    """A transformers logits processor for one ``generate`` batch: masks what the constraint forbids.

    It follows each row's automaton state from the tokens generate appends (left padding is the
    prompt's business: only tokens after ``prompt_width`` count). A row that has emitted EOS gets
    pad tokens from generate and is left alone.
    """

    def __init__(self, compiled: CompiledConstraint, prompt_width: int, max_new_tokens: int):
        self.compiled, self.width, self.max_new_tokens = compiled, prompt_width, max_new_tokens
        self.states: list[int | None] | None = None

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        step = input_ids.shape[1] - self.width
        if self.states is None or step == 0:
            self.states = [self.compiled.initial] * input_ids.shape[0]
        else:
            last = input_ids[:, -1].tolist()
            self.states = [
                None
                if state is None or (token == self.compiled.eos and state in self.compiled.finals)
                else self.compiled.next_state(state, token)
                for state, token in zip(self.states, last)
            ]
        budget = self.max_new_tokens - step - 1  # tokens that may still follow the one chosen now
        allowed = torch.ones(scores.shape, dtype=torch.bool)
        for row, state in enumerate(self.states):
            if state is not None:
                allowed[row] = self.compiled.allowed(state, budget, scores.shape[-1])
        return scores.masked_fill(~allowed.to(scores.device), float("-inf"))
