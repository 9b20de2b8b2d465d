"""GGUF export of the real shipped model (SmolLM2-135M-Instruct): the vocabulary llama.cpp's own
converter wrote, and a short email-router fine-tune that llama.cpp answers like affinage."""

import json
from pathlib import Path

import gguf
import llama_cpp
import pytest
import yaml

from affinage.cli import main
from affinage.export.gguf_vocab import gguf_vocab
from affinage.models import _embedded_gguf, load_tokenizer, resolve_model_path

pytestmark = pytest.mark.integration
ROUTER = Path(__file__).resolve().parents[2] / "examples" / "email-router"


def test_smollm2_vocabulary_is_the_one_llama_cpp_wrote():
    directory = Path(resolve_model_path("smollm2-135m-instruct"))
    tokenizer = load_tokenizer(directory)
    ours = gguf_vocab(tokenizer, directory, 49152)
    source = gguf.GGUFReader(_embedded_gguf("smollm2-135m-instruct"))
    assert ours.tokens == list(source.fields["tokenizer.ggml.tokens"].contents())
    assert ours.merges == list(source.fields["tokenizer.ggml.merges"].contents())
    assert ours.types == [int(t) for t in source.fields["tokenizer.ggml.token_type"].contents()]
    assert ours.special_ids["eos"] == source.fields["tokenizer.ggml.eos_token_id"].contents()
    assert ours.add_bos == source.fields["tokenizer.ggml.add_bos_token"].contents()
    # transformers' GGUF loader gives SmolLM2 GPT-2's split (no digit-by-digit step): the export
    # names the split the run was trained with, so llama.cpp cuts numbers as training did.
    assert ours.pre == "gpt-2"


def test_email_router_gguf_and_adapter_answer_like_affinage_in_llama_cpp(tmp_path):
    config = yaml.safe_load((ROUTER / "config.yaml").read_text())
    config["data"]["dataset"] = str(ROUTER / "emails.jsonl")
    config["trainer"].update(max_steps=12, eval_every=12, batch_size=8)
    config["adapter"]["layers_to_transform"] = 4  # a short fine-tune that already changes the answers
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    assert main(["train", str(tmp_path / "config.yaml"), "--output", str(run), "--quiet", "--no-base-eval"]) == 0
    for fmt in ("gguf", "gguf-lora"):
        assert (
            main(
                [
                    "export",
                    str(run),
                    "--format",
                    fmt,
                    "--output",
                    str(tmp_path / fmt),
                    "--check-limit",
                    "30",
                    "--check-tokens",
                    "8",
                ]
            )
            == 0
        )
        checks = json.loads((tmp_path / fmt / "affinage_export.json").read_text())["checks"]["llama.cpp"]
        assert checks["n"] == 30 and checks["agreement"] >= 0.95 and checks["same_prompt_tokens"] == 1.0
    llm = llama_cpp.Llama(model_path=str(tmp_path / "gguf" / "model.gguf"), n_ctx=512, verbose=False)
    text = "Facture n°2024-118 : 1 250,00 € à régler avant le 15/03"
    ours = load_tokenizer(resolve_model_path("smollm2-135m-instruct"))(text, add_special_tokens=False)["input_ids"]
    assert list(llm.tokenize(text.encode(), add_bos=False, special=True)) == ours  # digits cut as in training
    llm.close()
