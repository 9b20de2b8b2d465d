"""The tokenizer as llama.cpp reads it: the ``tokenizer.*`` keys of a GGUF file.

The keys describe the tokenizer the run was *trained* with, so that llama.cpp cuts a prompt
into the same ids affinage did:
- byte-level BPE (SmolLM2, Llama 3, Qwen, GPT-2) becomes llama.cpp's ``gpt2`` model: tokens by
  id, their types, the merges and the pre-tokenizer's name (the regex that splits text before
  BPE; a wrong name silently changes how digits and spaces are cut);
- a SentencePiece model (Gemma) converted from a GGUF file keeps that file's own vocabulary
  (what llama.cpp's converter wrote from ``tokenizer.model``); from a Hugging Face directory it
  is read with ``gguf.vocab.LlamaHfVocab``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf

from affinage.data.template import tokenizer_adds
from affinage.errors import AffinageError

# The pre-tokenizer regexes llama.cpp knows by name, recognised by a distinctive piece of the
# Hugging Face tokenizer's split pattern (llama.cpp's converter tells them apart by hashing).
_SPLIT_PATTERNS = [
    ("\\p{N}{1,3}", "llama-bpe"),  # Llama 3: numbers in groups of up to three digits
    ("[^\\r\\n\\p{L}\\p{N}]?\\p{L}+|\\p{N}|", "qwen2"),  # Qwen 2: one digit at a time
]

TOKENIZER_KEYS = (
    "tokenizer.ggml.model",
    "tokenizer.ggml.pre",
    "tokenizer.ggml.tokens",
    "tokenizer.ggml.scores",
    "tokenizer.ggml.token_type",
    "tokenizer.ggml.merges",
    "tokenizer.ggml.bos_token_id",
    "tokenizer.ggml.eos_token_id",
    "tokenizer.ggml.unknown_token_id",
    "tokenizer.ggml.padding_token_id",
    "tokenizer.ggml.add_bos_token",
    "tokenizer.ggml.add_eos_token",
    "tokenizer.ggml.add_space_prefix",
)


@dataclass
class GGUFVocab:
    """Everything llama.cpp needs to tokenize like the run did."""

    model: str  # "gpt2" (byte-level BPE) or "llama" (SentencePiece)
    tokens: list[str]
    types: list[int]
    pre: str | None = None
    merges: list[str] | None = None
    scores: list[float] | None = None
    special_ids: dict[str, int] = field(default_factory=dict)  # bos, eos, unk, pad
    add_bos: bool = False
    add_eos: bool = False
    add_space_prefix: bool | None = None

    def write(self, writer: gguf.GGUFWriter) -> None:
        writer.add_tokenizer_model(self.model)
        if self.pre is not None:
            writer.add_tokenizer_pre(self.pre)
        writer.add_token_list(self.tokens)
        writer.add_token_types(self.types)
        if self.scores is not None:
            writer.add_token_scores(self.scores)
        if self.merges:
            writer.add_token_merges(self.merges)
        setters = {
            "bos": writer.add_bos_token_id,
            "eos": writer.add_eos_token_id,
            "unk": writer.add_unk_token_id,
            "pad": writer.add_pad_token_id,
        }
        for kind, token_id in self.special_ids.items():
            setters[kind](token_id)
        writer.add_add_bos_token(self.add_bos)
        writer.add_add_eos_token(self.add_eos)
        if self.add_space_prefix is not None:
            writer.add_add_space_prefix(self.add_space_prefix)


def gguf_vocab(tokenizer: Any, model_dir: Path, vocab_size: int) -> GGUFVocab:
    """The GGUF vocabulary of ``tokenizer`` (loaded from ``model_dir``), padded to ``vocab_size`` rows."""
    source = _source_gguf(model_dir)
    spec = (
        json.loads((model_dir / "tokenizer.json").read_text(encoding="utf-8"))
        if (model_dir / "tokenizer.json").is_file()
        else {}
    )
    if _is_byte_level(spec):
        vocab = _byte_level_bpe(tokenizer, spec, vocab_size)
    elif source is not None and _field(source, "tokenizer.ggml.model") == "llama":
        vocab = _from_gguf(source)
    elif spec:
        vocab = _sentencepiece_from_hf(model_dir, vocab_size)
    else:
        raise AffinageError(
            f"{model_dir}: no tokenizer.json, so the tokenizer cannot be written to GGUF",
            fix="use a model directory with a fast tokenizer (tokenizer.json)",
        )
    vocab.special_ids = _special_ids(tokenizer)
    vocab.add_bos = tokenizer_adds(tokenizer, tokenizer.bos_token_id, first=True)
    vocab.add_eos = tokenizer_adds(tokenizer, tokenizer.eos_token_id, first=False)
    return vocab


def _source_gguf(model_dir: Path) -> gguf.GGUFReader | None:
    """The GGUF file an embedded model was converted from (see ``models.convert_gguf``), if still there."""
    marker = model_dir / "affinage_source.json"
    if not marker.is_file():
        return None
    path = Path(json.loads(marker.read_text())["gguf"])
    return gguf.GGUFReader(path) if path.is_file() else None


def _field(reader: gguf.GGUFReader, key: str) -> Any:
    found = reader.fields.get(key)
    return None if found is None else found.contents()


def _is_byte_level(spec: dict[str, Any]) -> bool:
    if spec.get("model", {}).get("type") != "BPE":
        return False
    return "ByteLevel" in json.dumps(spec.get("pre_tokenizer")) or "ByteLevel" in json.dumps(spec.get("decoder"))


def pre_tokenizer_name(spec: dict[str, Any]) -> str:
    """llama.cpp's name for the tokenizer.json pre-tokenizer (the regex that splits text before BPE)."""
    pre = spec.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", [pre]) if pre.get("type") == "Sequence" else [pre]
    kinds = [step.get("type") for step in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True):
        return "gpt-2"
    if kinds == ["Digits", "ByteLevel"] and steps[0].get("individual_digits") and steps[1].get("use_regex", True):
        return "smollm"  # SmolLM: every digit alone, then GPT-2's regex
    text = json.dumps(pre)
    for piece, name in _SPLIT_PATTERNS:
        if json.dumps(piece)[1:-1] in text:
            return name
    raise AffinageError(
        f"the tokenizer's pre-tokenizer ({', '.join(str(k) for k in kinds)}) has no llama.cpp name affinage knows",
        fix="export the merged model (`--format merged`) and convert it with llama.cpp's convert_hf_to_gguf.py",
    )


def _byte_level_bpe(tokenizer: Any, spec: dict[str, Any], vocab_size: int) -> GGUFVocab:
    by_id = {token_id: token for token, token_id in tokenizer.get_vocab().items()}
    added = {int(token_id): token for token_id, token in (tokenizer.added_tokens_decoder or {}).items()}
    tokens, types = [], []
    for token_id in range(vocab_size):
        if token_id in added:
            tokens.append(added[token_id].content)
            types.append(gguf.TokenType.CONTROL if added[token_id].special else gguf.TokenType.USER_DEFINED)
        elif token_id in by_id:
            tokens.append(by_id[token_id])
            types.append(gguf.TokenType.NORMAL)
        else:  # embedding rows the tokenizer never produces
            tokens.append(f"[PAD{token_id}]")
            types.append(gguf.TokenType.UNUSED)
    merges = [merge if isinstance(merge, str) else " ".join(merge) for merge in spec["model"].get("merges", [])]
    return GGUFVocab(
        model="gpt2", pre=pre_tokenizer_name(spec), tokens=tokens, types=[int(t) for t in types], merges=merges
    )


def _from_gguf(reader: gguf.GGUFReader) -> GGUFVocab:
    """A SentencePiece vocabulary exactly as llama.cpp's own converter wrote it."""
    return GGUFVocab(
        model="llama",
        pre=_field(reader, "tokenizer.ggml.pre"),
        tokens=list(_field(reader, "tokenizer.ggml.tokens")),
        types=[int(t) for t in _field(reader, "tokenizer.ggml.token_type")],
        scores=[float(s) for s in _field(reader, "tokenizer.ggml.scores")],
        add_space_prefix=_field(reader, "tokenizer.ggml.add_space_prefix"),
    )


def _sentencepiece_from_hf(model_dir: Path, vocab_size: int) -> GGUFVocab:
    tokens, scores, types = [], [], []
    for text, score, kind in gguf.vocab.LlamaHfVocab(model_dir).all_tokens():
        tokens.append(text.decode("utf-8"))
        scores.append(score)
        types.append(int(kind))
    for token_id in range(len(tokens), vocab_size):
        tokens.append(f"[PAD{token_id}]")
        scores.append(-1000.0)
        types.append(int(gguf.TokenType.UNUSED))
    return GGUFVocab(model="llama", pre="default", tokens=tokens, types=types, scores=scores, add_space_prefix=False)


def _special_ids(tokenizer: Any) -> dict[str, int]:
    ids = {
        "bos": tokenizer.bos_token_id,
        "eos": tokenizer.eos_token_id,
        "unk": tokenizer.unk_token_id,
        "pad": tokenizer.pad_token_id,
    }
    return {kind: int(token_id) for kind, token_id in ids.items() if token_id is not None}
