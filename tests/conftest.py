"""Shared fixtures: tiny random models of real architectures and a tiny real tokenizer.

Unit tests never download anything: the tokenizer is a byte-level BPE trained here on a few
sentences, with a ChatML chat template like SmolLM2's, and models are built from configs.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CORPUS = [
    "Bonjour, je souhaiterais savoir où en est ma candidature pour le poste de développeur.",
    "J'ai un problème avec le logiciel que j'ai acheté. Il se bloque à chaque fois.",
    "Nous serions intéressés par une commande en gros de vos produits. Vos tarifs ?",
    "Nous avons constaté des erreurs dans la dernière facture que vous nous avez envoyée.",
    "Gagnez des millions avec notre nouveau programme de marketing d'affiliation !",
    "RH Support Commercial Finance SPAM rediriger l'email suivant vers le bon service",
    "Below is an instruction that describes a task. Write a response. What is an egg?",
]


def _tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    core.train_from_iterator(CORPUS * 3, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, eos_token="<|im_end|>", pad_token="<|endoftext|>", bos_token="<|endoftext|>"
    )
    tokenizer.chat_template = CHATML
    return tokenizer


@pytest.fixture(scope="session")
def tokenizer():
    return _tokenizer()


def tiny_llama(vocab_size: int, seed: int = 0, layers: int = 2):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=512,
        tie_word_embeddings=True,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=0,
    )
    return LlamaForCausalLM(config).eval()


def tiny_gemma3(vocab_size: int, seed: int = 0, layers: int = 2, **overrides):
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(seed)
    config = Gemma3TextConfig(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=1,
        head_dim=16,
        max_position_embeddings=512,
        sliding_window=16,
        pad_token_id=0,
        eos_token_id=2,
        bos_token_id=0,
        **overrides,
    )
    return Gemma3ForCausalLM(config).eval()


@pytest.fixture
def llama(tokenizer):
    return tiny_llama(len(tokenizer))


@pytest.fixture(scope="session")
def model_dir(tmp_path_factory, tokenizer) -> Path:
    """A tiny Llama saved as a real HF model directory (what base_model can point at)."""
    path = tmp_path_factory.mktemp("tiny-llama")
    model = tiny_llama(len(tokenizer))
    model.config.eos_token_id = tokenizer.eos_token_id
    model.config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path


EMAILS = {
    "RH": [
        "Candidature spontanée pour un stage",
        "Je postule au poste de développeur",
        "Demande de congés en août",
        "Relance de ma candidature",
    ],
    "Support": [
        "Le logiciel se bloque au démarrage",
        "Mon imprimante ne marche plus",
        "Colis reçu abîmé",
        "Impossible de me connecter",
    ],
    "Finance": [
        "Veuillez trouver ci-joint votre facture",
        "Erreur sur la facture 42",
        "Relance de paiement",
        "Changement de RIB",
    ],
}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return path


def router_rows() -> list[dict]:
    """36 tiny email-router rows, 3 departments, the seed's [INST] prompt."""
    return [
        {"prompt": f'[INST] rediriger l\'email suivant : "{text} ({variant}{index})"[/INST]', "completion": label}
        for label, texts in EMAILS.items()
        for index, text in enumerate(texts)
        for variant in range(3)
    ]


@pytest.fixture
def email_rows() -> list[dict]:
    return router_rows()


def router_config(directory: Path, model_dir: Path, **sections) -> dict:
    """A tiny email router on the tiny model, its rows written to ``directory``; ``sections`` merge in."""
    write_jsonl(directory / "emails.jsonl", router_rows())
    config = {
        "base_model": str(model_dir),
        "adapter": {"r": 4, "alpha": 8, "dropout": 0.0},
        "output_features": [{"name": "completion", "type": "category"}],
        "data": {"dataset": str(directory / "emails.jsonl")},
        "trainer": {"max_steps": 6, "batch_size": 4, "learning_rate": 0.01, "eval_every": 3, "max_seq_len": 96},
    }
    for key, value in sections.items():
        config[key] = {**config[key], **value} if isinstance(value, dict) and key in config else value
    return config


def trained_router(directory: Path, model_dir: Path, *extra: str, **sections) -> Path:
    """``affinage train`` of :func:`router_config` into ``directory/run``; returns the run directory."""
    import yaml

    from affinage.cli import main

    (directory / "config.yaml").write_text(yaml.safe_dump(router_config(directory, model_dir, **sections)))
    assert main(["train", str(directory / "config.yaml"), "--output", str(directory / "run"), "--quiet", *extra]) == 0
    return directory / "run"


@pytest.fixture(scope="session")
def bos_tokenizer():
    """The tiny tokenizer, adding a BOS (<|endoftext|>) like Llama/Gemma tokenizers do."""
    tokenizer = _tokenizer()
    tokenizer.add_bos_token = True
    return tokenizer


def adapted_tiny(build, tokenizer, dropout: float = 0.0):
    """A tiny model with LoRA on all linear layers and non-zero B (so the adapter changes the output)."""
    import torch

    from affinage.lora import inject_lora, lora_modules

    model = build(len(tokenizer))
    inject_lora(model, "all-linear", r=4, alpha=8, dropout=dropout)
    for module in lora_modules(model).values():
        torch.nn.init.normal_(module.lora_B.weight, std=0.02)
    return model


def trainable_grads(model) -> dict:
    return {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}


def saved_bytes(fn, skip=()):
    """``fn()``'s result and the bytes autograd kept for backward.

    One count per storage; ``skip``'s storages are excluded.
    """
    import torch

    skipped = {t.untyped_storage().data_ptr() for t in skip}
    storages = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in skipped:
            storages[ptr] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return result, sum(storages.values())


@dataclass
class StepResult:
    loss: torch.Tensor
    grads: dict
    saved: int  # bytes autograd kept for backward
    value: object  # what the context yielded


def training_batch(build, tokenizer):
    """:func:`adapted_tiny` in training mode, and a batch of padded rows of different lengths."""
    from affinage.data.batching import collate
    from tests.test_train import _encoded

    model = adapted_tiny(build, tokenizer)
    model.train()
    return model, collate(_encoded(tokenizer, 6), tokenizer.pad_token_id)


def step_without_and_with(model, batch, context) -> tuple[StepResult, StepResult]:
    """One training step's loss, LoRA gradients and saved bytes, without and then within ``context(model)``."""
    from contextlib import nullcontext

    from affinage.training import causal_lm_loss

    results = []
    for inside in (False, True):
        model.zero_grad()
        with context(model) if inside else nullcontext() as value:
            (loss, count), saved = saved_bytes(lambda: causal_lm_loss(model, batch))
            (loss / count).backward()
        results.append(StepResult(loss.detach(), trainable_grads(model), saved, value))
    return results[0], results[1]


def assert_same_step(plain: StepResult, other: StepResult, rtol: float = 1e-5, atol: float = 1e-7) -> None:
    torch.testing.assert_close(other.loss, plain.loss, rtol=1e-6, atol=1e-6)
    assert other.grads.keys() == plain.grads.keys()
    for name, grad in plain.grads.items():
        torch.testing.assert_close(other.grads[name], grad, rtol=rtol, atol=atol)


# Seed 000's Ludwig config (the French tutorial), its indentation restored; {model}: the base model.
SEED_000_CONFIG = """
model_type: llm
base_model: {model}
quantization:
  bits: 4
adapter:
  type: lora
prompt:
  template: |
    ### Instruction :
    {{instruction}}
    ### Entrée :
    {{input}}
    ### Réponse :
input_features:
  - name: prompt
    type: text
output_features:
  - name: output
    type: text
trainer:
  type: finetune
"""
