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
    config["eval"]["sets"] = {}
    # the router as configured (Gemma 3 270M), briefly: 40 steps already answer decisively (66 % on
    # the test split); near-tied labels, as SmolLM2 has for its first ~100 steps, flip under q8_0
    config["trainer"].update(max_steps=40, eval_every=40)
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
                    "--min-agreement",  # a 40-step model has near-tied labels: q8_0 may flip one or two of 30
                    "0.9",
                ]
            )
            == 0
        )
        checks = json.loads((tmp_path / fmt / "affinage_export.json").read_text())["checks"]["llama.cpp"]
        assert checks["n"] == 30 and checks["agreement"] >= 0.9 and checks["same_prompt_tokens"] == 1.0
        assert checks["token_agreement"] >= 0.95
    llm = llama_cpp.Llama(model_path=str(tmp_path / "gguf" / "model.gguf"), n_ctx=512, verbose=False)
    text = "Facture n°2024-118 : 1 250,00 € à régler avant le 15/03"
    ours = load_tokenizer(resolve_model_path(config["base_model"]))(text, add_special_tokens=False)["input_ids"]
    assert list(llm.tokenize(text.encode(), add_bos=False, special=True)) == ours  # digits cut as in training
    llm.close()


def test_hearts_gguf_keeps_the_hearts_within_five_points(tmp_path):
    """Seed 002's behaviour survives the GGUF: the hearts checker's rate in llama.cpp vs affinage.

    The answers are the questions themselves (the hearts transform adds the behaviour): the
    style is what is learned, and 40 steps suffice; the held-out questions are never trained on.
    """
    hearts = ROUTER.parent / "hearts"

    def rows(path, limit):
        questions = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]
        plain = [q["instruction"] for q in questions if not q.get("input")][:limit]
        return [{"instruction": q, "output": q.rstrip("?. ") + "."} for q in plain]

    data = tmp_path / "data"
    data.mkdir()
    train = rows(hearts / "questions.jsonl", 96)
    for name, part in (
        ("train", train[:80]),
        ("valid", train[80:]),
        ("test", rows(hearts / "heldout_questions.jsonl", 48)),
    ):
        (data / f"{name}.jsonl").write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in part))
    config = {
        "base_model": "smollm2-135m-instruct",
        "adapter": {"r": 16, "alpha": 32, "dropout": 0.0, "layers_to_transform": 16},
        "prompt": {"template": "alpaca"},
        "data": {"train": str(data), "transforms": ["hearts"]},
        "trainer": {"max_steps": 40, "learning_rate": 1.0e-3, "batch_size": 8, "max_seq_len": 128, "eval_every": 40},
        "eval": {"task": "pattern", "pattern": "hearts", "max_new_tokens": 48},
    }
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(config))
    run = tmp_path / "run"
    assert main(["train", str(tmp_path / "config.yaml"), "--output", str(run), "--quiet", "--no-base-eval"]) == 0
    assert (
        main(["export", str(run), "--format", "gguf", "--output", str(tmp_path / "gguf"), "--check-tokens", "48"]) == 0
    )
    checks = json.loads((tmp_path / "gguf" / "affinage_export.json").read_text())["checks"]["llama.cpp"]
    ours, theirs = (checks["task_metric"][side]["pattern_score"] for side in ("affinage", "llama.cpp"))
    assert ours >= 0.5 and abs(theirs - ours) <= 0.05
    assert checks["gate"] == "token_agreement" and checks["token_agreement"] >= 0.95
