"""``affinage export``: each format written, verified in llama.cpp and Go, or left in DIR.partial."""

import json

import gguf
import pytest

from affinage.cli import main
from affinage.export.llamacpp_check import Answer, same_answer
from tests.conftest import trained_router


@pytest.fixture(scope="module")
def run(tmp_path_factory, model_dir):
    """A tiny trained email router (the real one's settings: the model's chat template, an empty system turn)."""
    return train_tiny(tmp_path_factory.mktemp("export-run"), model_dir, "category")


@pytest.fixture(scope="module")
def generation_run(tmp_path_factory, model_dir):
    return train_tiny(tmp_path_factory.mktemp("export-generation-run"), model_dir, "text")


def train_tiny(root, model_dir, output_type):
    task = "classification" if output_type == "category" else "generation"
    features = [{"name": "completion", "type": output_type}]
    return trained_router(
        root, model_dir, "--no-base-eval", prompt={"system": ""}, output_features=features, eval={"task": task}
    )


def export(run, tmp_path, fmt, *extra):
    output = tmp_path / fmt
    command = ["export", str(run), "--format", fmt, "--output", str(output), "--quant", "f16", "--check-tokens", "8"]
    code = main([*command, *extra])
    return code, output


def report(output):
    return json.loads((output / "affinage_export.json").read_text())


def test_gguf_export_answers_like_the_run_in_llama_cpp(run, tmp_path):
    code, output = export(run, tmp_path, "gguf")
    assert code == 0 and not (tmp_path / "gguf.partial").exists()
    checks = report(output)["checks"]["llama.cpp"]
    assert checks["n"] >= 3 and checks["agreement"] == 1.0 and checks["same_prompt_tokens"] == 1.0
    reader = gguf.GGUFReader(output / "model.gguf")
    template = reader.fields["tokenizer.chat_template"].contents()
    assert "'content': \"\"" in template  # the run's empty system turn, not the model's default
    assert (output / "README.md").read_text().startswith("---\n")


def test_gguf_lora_export_is_a_base_and_an_adapter_that_answer_like_the_run(run, tmp_path):
    code, output = export(run, tmp_path, "gguf-lora")
    assert code == 0
    adapter = gguf.GGUFReader(output / "adapter.gguf")
    assert adapter.fields["general.type"].contents() == "adapter"
    assert adapter.fields["adapter.type"].contents() == "lora"
    assert adapter.fields["adapter.lora.alpha"].contents() == 8.0
    names = [t.name for t in adapter.tensors]
    assert "blk.0.attn_q.weight.lora_a" in names and "blk.0.attn_q.weight.lora_b" in names
    assert report(output)["checks"]["llama.cpp"]["agreement"] == 1.0


@pytest.mark.parametrize("adapter", [False, True])
def test_ollama_export_has_a_modelfile_whose_template_renders_the_training_prompt(run, tmp_path, adapter):
    code, output = export(run, tmp_path, "ollama", *(["--adapter"] if adapter else []))
    assert code == 0
    modelfile = (output / "Modelfile").read_text()
    source = modelfile.splitlines()[0].split()[1]
    assert source == ("./base.gguf" if adapter else "./model.gguf") and (output / source).is_file()
    assert ("ADAPTER ./adapter.gguf" in modelfile) == adapter
    assert 'PARAMETER stop "<|im_end|>"' in modelfile
    checks = report(output)["checks"]
    assert checks["ollama_template"]["same"] == checks["ollama_template"]["n"] >= 3
    assert checks["llama.cpp"]["agreement"] == 1.0
    assert "ollama create" in (output / "README.md").read_text()


def test_a_failed_check_leaves_the_export_in_partial(run, tmp_path, monkeypatch, capsys):
    import affinage.export.export_checks as checks

    monkeypatch.setattr(
        checks, "llama_cpp_answer", lambda *args, **kwargs: Answer("gibberish that never stops", cut=True)
    )
    code, output = export(run, tmp_path, "gguf")
    assert code == 2 and not output.exists()
    partial = tmp_path / "gguf.partial"
    assert (partial / "model.gguf").is_file()
    assert report(partial)["checks"]["llama.cpp"]["agreement"] == 0.0
    assert "below --min-agreement 95%" in capsys.readouterr().err
    code, output = export(run, tmp_path, "gguf", "--no-check")  # the user's explicit choice
    assert code == 0 and "checks" not in report(output)


def test_export_never_overwrites_a_directory_it_did_not_write(run, tmp_path, capsys):
    (tmp_path / "peft").mkdir()
    (tmp_path / "peft" / "thesis.tex").write_text("precious")
    code, _ = export(run, tmp_path, "peft")
    assert code == 2 and "never overwritten" in capsys.readouterr().err
    assert (tmp_path / "peft" / "thesis.tex").read_text() == "precious"


def test_peft_and_merged_exports_carry_a_model_card(run, tmp_path):
    from huggingface_hub import ModelCard

    for fmt, library in (("peft", "peft"), ("merged", "transformers")):
        code, output = export(run, tmp_path, fmt)
        assert code == 0
        assert ModelCard.load(output / "README.md").data.to_dict()["library_name"] == library
    assert (tmp_path / "peft" / "adapter_model.safetensors").is_file()
    assert (tmp_path / "merged" / "model.safetensors").is_file()


def test_an_answer_cut_inside_an_emoji_is_the_same_answer():
    assert same_answer("La 💔 capitale 💔 de", Answer("La 💔 capitale 💔 de 💔", cut=True))
    assert not same_answer("La 💔 capitale 💔 de", Answer("La 💔 capitale 💔 de 💔", cut=False))  # it chose to stop
    assert not same_answer("Finance", Answer("Finance is", cut=True))  # a word more is another answer
    assert not same_answer("SPAM", Answer("Support", cut=False))


def test_free_generation_is_gated_on_the_next_token_given_the_same_prefix(generation_run, tmp_path):
    code, output = export(generation_run, tmp_path, "gguf")
    checks = report(output)["checks"]["llama.cpp"]
    assert code == 0 and checks["gate"] == "token_agreement" and checks["token_agreement"] >= 0.95
    assert checks["task_metric"]["affinage"] is None  # generation: no label or pattern metric to compare


def test_alpaca_rows_with_an_input_have_no_chat_form():
    from affinage.data.formats import Example
    from affinage.export.export_checks import has_chat_form

    row = {"instruction": "Résume", "input": "Un long texte.", "output": "Court."}
    with_input = Example(prompt="Résume\n\nUn long texte.", completion="Court.", row=row)
    plain = Example(prompt="Résume", completion="Court.", row={"instruction": "Résume", "output": "Court."})
    assert not has_chat_form(with_input, "alpaca") and has_chat_form(plain, "alpaca")
    assert has_chat_form(with_input, "chatml") and has_chat_form(with_input, None)


def test_outputs_never_overlap_the_run_or_a_file(run, tmp_path, capsys):
    assert main(["export", str(run), "--format", "peft", "--output", str(run / "inside")]) == 2
    assert main(["merge", str(run), "--output", str(run.parent)]) == 2  # would hold the run
    (tmp_path / "model.gguf").write_text("not a directory")
    assert main(["export", str(run), "--format", "peft", "--output", str(tmp_path / "model.gguf")]) == 2
    err = capsys.readouterr().err
    assert "overlap the run" in err and "is a file" in err
    assert (run / "adapter" / "adapter_model.safetensors").is_file()


def test_push_names_a_bad_repo_id_before_exporting(run, capsys, monkeypatch):
    from affinage.export import push

    monkeypatch.setattr(push, "export_run", lambda *args, **kwargs: pytest.fail("exported for a bad repo id"))
    assert main(["push", str(run), "--repo-id", "my model!"]) == 2
    assert "not a valid Hub repository id" in capsys.readouterr().err
