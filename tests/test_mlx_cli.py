"""mlx-lm's command line on `affinage train` (seed 003): each flag and -c key maps onto the config or is refused."""

import json
from pathlib import Path

import pytest
import yaml

import affinage.models as models
from affinage.cli import build_parser, main
from affinage.config import config_from_dict, config_to_dict, load_config
from affinage.errors import ConfigError, ModelNotFoundError
from affinage.mlx import notes, train_config
from tests.conftest import router_rows, write_jsonl


@pytest.fixture
def project(tmp_path, monkeypatch) -> Path:
    """A folder laid out as seed 003's: data/{train,valid,test}.jsonl; the working directory."""
    rows = router_rows()  # 3 labels x 4 texts x 3 near-identical variants: a text's variants stay in one file
    (tmp_path / "data").mkdir()
    for name, texts in (("train", (0, 1)), ("valid", (2,)), ("test", (3,))):
        write_jsonl(tmp_path / "data" / f"{name}.jsonl", [row for i, row in enumerate(rows) if i // 3 % 4 in texts])
    monkeypatch.chdir(tmp_path)
    return tmp_path


def build(*argv: str):
    """train_config of ``affinage train ARGV`` (nothing printed)."""
    return train_config(build_parser().parse_args(["train", *argv]), echo=False)


def value(config, dotted: str):
    node = config_to_dict(config)
    for part in dotted.split("."):
        node = node[part]
    return node


def test_seed_003_command_gets_affinages_defaults(project):
    """Only data, model and batch: the schema's defaults (tuned for the CPU), not mlx-lm's 1000 iterations at 1e-5."""
    config, output = build(
        "--train", "--model", "mistralai/Mistral-7B-Instruct-v0.3", "--data", "data", "--batch-size", "2"
    )
    defaults = config_from_dict({"base_model": "x"})
    assert config.base_model == "mistralai/Mistral-7B-Instruct-v0.3" and config.data.train == str(project / "data")
    assert config.trainer.batch_size == 2
    assert config.adapter == defaults.adapter
    assert config.trainer.model_dump(exclude={"batch_size"}) == defaults.trainer.model_dump(exclude={"batch_size"})
    assert output == Path("runs") / f"{project.name.lower()}-mistral-7b-instruct-v0.3"


def test_a_recipe_flag_brings_mlx_lms_defaults(project):
    config, output = build(
        "--train",
        "--model",
        "mistralai/Mistral-7B-Instruct-v0.3",
        "--data",
        "data",
        "--batch-size",
        "2",
        "--iters",
        "1000",
    )
    assert config.base_model == "mistralai/Mistral-7B-Instruct-v0.3"
    assert config.data.train == str(project / "data") and config.data.dataset is None
    adapter, trainer = config.adapter, config.trainer
    assert (adapter.r, adapter.alpha, adapter.dropout, adapter.layers_to_transform) == (8, 160.0, 0.0, 16)
    assert adapter.target_modules == "all-linear" and not adapter.use_dora
    assert (trainer.batch_size, trainer.max_steps, trainer.learning_rate) == (2, 1000, 1e-5)
    assert (trainer.lr_scheduler, trainer.warmup_ratio, trainer.max_grad_norm, trainer.weight_decay) == (
        "constant",
        0.0,
        None,
        0.0,
    )
    assert (trainer.seed, trainer.max_seq_len, trainer.eval_every, trainer.save_every) == (0, 2048, 200, 100)
    assert output == Path("runs") / f"{project.name.lower()}-mistral-7b-instruct-v0.3"


@pytest.mark.parametrize(
    ("flags", "key", "expected"),
    [
        (["--model", "smollm2-135m-instruct"], "base_model", "smollm2-135m-instruct"),
        (["--batch-size", "3"], "trainer.batch_size", 3),
        (["--iters", "7"], "trainer.max_steps", 7),
        (["--learning-rate", "2e-4"], "trainer.learning_rate", 2e-4),
        (["--num-layers", "4"], "adapter.layers_to_transform", 4),
        (["--num-layers", "-1"], "adapter.layers_to_transform", None),
        (["--fine-tune-type", "dora"], "adapter.use_dora", True),
        (["--fine-tune-type", "lora"], "adapter.use_dora", False),
        (["--seed", "7"], "trainer.seed", 7),
        (["--max-seq-length", "256"], "trainer.max_seq_len", 256),
        (["--steps-per-eval", "25"], "trainer.eval_every", 25),
        (["--save-every", "10"], "trainer.save_every", 10),
        (["--grad-checkpoint"], "trainer.gradient_checkpointing", True),
        (["--grad-accumulation-steps", "4"], "trainer.gradient_accumulation", 4),
        (["--grad-accumulation-steps", "4", "--iters", "100"], "trainer.max_steps", 25),  # iterations are batches
        (["--optimizer", "adamw"], "trainer.weight_decay", 0.01),  # mlx.optimizers.AdamW's default decay
        (["--optimizer", "adam"], "trainer.weight_decay", 0.0),
        (["--test-batches", "3", "--batch-size", "2"], "eval.max_examples", 6),
        (["--test-batches", "-1"], "eval.max_examples", None),
        (["--report-to", "wandb"], "trainer.report_to", ["wandb"]),
        (["--trust-remote-code"], "trust_remote_code", True),
        (["--val-batches", "-1"], "trainer.eval_every", None),  # no recipe option: affinage's defaults
        (["--train", "--test", "--mask-prompt", "--steps-per-report", "5"], "trainer.max_steps", None),
        (["--clear-cache-threshold", "0"], "trainer.max_steps", None),
        (["--iters", "5", "--val-batches", "-1"], "trainer.eval_every", 200),  # a recipe option: mlx-lm's defaults
        (["--set", "trainer.packing=false"], "trainer.packing", False),  # affinage's --set still applies
    ],
)
def test_each_flag_maps_onto_a_config_key(project, flags, key, expected):
    config, _ = build("--data", "data", *flags)
    assert value(config, key) == expected


def test_one_data_file_is_split_and_a_model_folder_made_absolute(project, model_dir):
    config, output = build("--data", "data/train.jsonl", "--model", str(model_dir))
    assert config.data.dataset == str(project / "data" / "train.jsonl") and config.data.train is None
    assert config.base_model == str(model_dir)
    assert output == Path("runs") / f"train-{model_dir.name.lower()}"


def test_a_data_folder_in_configs_place_is_mlx_lms_data(project):
    config, _ = build("data", "--batch-size", "2")  # `affinage train data/`, as `affinage data check data/`
    assert config.data.train == str(project / "data") and config.trainer.batch_size == 2


def test_adapter_path_is_the_run_directory_and_must_agree_with_output(project):
    assert build("--data", "data", "--adapter-path", "adapters")[1] == Path("adapters")
    assert any("adapters/adapter/" in line for line in notes({"adapter_path": "adapters"}))
    assert build("--data", "data", "--adapter-path", "adapters", "--output", "adapters")[1] == Path("adapters")
    with pytest.raises(ConfigError, match="two run directories"):
        build("--data", "data", "--adapter-path", "adapters", "--output", "runs/x")


@pytest.mark.parametrize(
    ("flags", "flag"),
    [
        (["--fine-tune-type", "full"], "--fine-tune-type"),
        (["--resume-adapter-file", "adapters/adapters.safetensors"], "--resume-adapter-file"),
        (["--val-batches", "5"], "--val-batches"),
        (["--optimizer", "sgd"], "--optimizer"),
        (["--optimizer", "muon"], "--optimizer"),
        (["--clear-cache-threshold", "1GB"], "--clear-cache-threshold"),
        (["--report-to", "wandb,swanlab"], "--report-to"),
        (["--project-name", "mails"], "--project-name"),
    ],
)
def test_a_flag_affinage_cannot_honour_is_refused_before_the_model_loads(project, capsys, flags, flag):
    with pytest.raises(ConfigError) as error:
        build("--data", "data", *flags)
    assert f"mlx-lm's `{flag}` (" in str(error.value) and "is not supported by affinage" in str(error.value)
    assert error.value.fix
    assert main(["train", "--data", "data", *flags]) == 2  # printed, no traceback
    err = capsys.readouterr().err
    assert f"mlx-lm's `{flag}`" in err and "fix:" in err and "Traceback" not in err


def test_a_hub_dataset_name_is_refused(project):
    with pytest.raises(ConfigError, match="mlx-lm's `--data mlx-community/WikiSQL` .a Hugging Face dataset"):
        build("--data", "mlx-community/WikiSQL")


@pytest.mark.parametrize(
    ("argv", "match"),
    [
        (["config.yaml", "--batch-size", "2"], "a CONFIG file and mlx-lm's flags together"),
        ([], "nothing to train"),
        (["config.yaml"], "no run directory"),
        (["--data", "missing"], "data not found"),
        (["--model", "smollm2-135m-instruct"], "no data"),
        (["--data", "data", "--num-layers", "0"], "--num-layers 0"),
        (["--data", "data", "--batch-size", "0"], "batch_size must be a positive"),
    ],
)
def test_flag_errors_name_the_flag_and_the_fix(project, argv, match):
    with pytest.raises(ConfigError, match=match) as error:
        build(*argv)
    assert error.value.fix


def write_yaml(path: Path, raw: dict) -> Path:
    path.write_text(yaml.safe_dump(raw))
    return path


def test_mlx_yaml_config_is_translated_and_flags_win(project):
    path = write_yaml(
        project / "lora_config.yaml",
        {
            "model": "smollm2-135m-instruct",
            "train": True,
            "data": "data",
            "fine_tune_type": "lora",
            "optimizer": "adamw",
            "optimizer_config": {"adamw": {"weight_decay": 0.05, "bias_correction": True}},
            "num_layers": 8,
            "batch_size": 4,
            "iters": 100,
            "learning_rate": 1e-5,
            "steps_per_eval": 50,
            "adapter_path": "adapters",
            "max_seq_length": 512,
            "lora_parameters": {
                "keys": ["self_attn.q_proj", "self_attn.v_proj"],
                "rank": 4,
                "scale": 2.0,
                "dropout": 0.1,
            },
            "lr_schedule": {"name": "cosine_decay", "warmup": 10, "warmup_init": 0, "arguments": [2e-4, 90, 0]},
            "prompt_feature": "question",
            "completion_feature": "answer",
            "test_batches": None,  # null: mlx-lm's default
        },
    )
    config, output = build("--config", str(path), "--batch-size", "2")
    assert output == Path("adapters") and config.base_model == "smollm2-135m-instruct"
    assert (config.adapter.r, config.adapter.alpha, config.adapter.dropout) == (4, 8.0, 0.1)
    assert config.adapter.target_modules == ["self_attn.q_proj", "self_attn.v_proj"]
    assert config.adapter.layers_to_transform == 8
    trainer = config.trainer
    assert (trainer.batch_size, trainer.max_steps, trainer.eval_every, trainer.max_seq_len) == (2, 100, 50, 512)
    assert (trainer.learning_rate, trainer.lr_scheduler, trainer.warmup_ratio) == (2e-4, "cosine", 0.1)
    assert trainer.weight_decay == 0.05
    assert [f.name for f in config.input_features] == ["question"]
    assert [f.name for f in config.output_features] == ["answer"]


def test_mlx_yaml_reads_1e_5_as_a_number_like_mlx_lm(project):
    path = project / "c.yaml"
    path.write_text(
        "data: data\nlearning_rate: 1e-5\nlr_schedule:\n  name: cosine_decay\n  arguments: [2e-5, 1000, 0]\n"
    )
    trainer = build("-c", str(path))[0].trainer
    assert (trainer.learning_rate, trainer.lr_scheduler) == (2e-5, "cosine")
    path.write_text("data: data\nlearning_rate: 1e-5\n")
    assert build("-c", str(path))[0].trainer.learning_rate == 1e-5


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ({"data": "data", "lora_layer": 4}, "unknown mlx-lm key.*did you mean 'lora_layers'"),
        ({"base_model": "smollm2-135m-instruct", "trainer": {}}, "this is an affinage config"),
        ({"data": "data", "lr_schedule": {"name": "exponential_decay", "arguments": [1e-5, 0.9]}}, "lr_schedule"),
        ({"data": "data", "lora_parameters": {"alpha": 16}}, "lora_parameters.alpha"),
        ({"data": "data", "optimizer_config": {"adam": {"betas": [0.9, 0.98]}}}, "optimizer_config.adam.betas"),
        ({"data": "data", "hf_dataset": {"path": "billsum"}}, "hf_dataset"),
    ],
)
def test_mlx_yaml_errors(project, raw, match):
    with pytest.raises(ConfigError, match=match):
        build("-c", str(write_yaml(project / "c.yaml", raw)))


def test_the_printed_yaml_builds_the_same_config(project, capsys):
    argv = ["--train", "--model", "smollm2-135m-instruct", "--data", "data", "--batch-size", "2", "--iters", "50"]
    config, _ = train_config(build_parser().parse_args(["train", *argv]))
    printed = capsys.readouterr().out
    assert printed.startswith("# affinage config of this mlx-lm command")
    saved = load_config(write_yaml(project / "saved.yaml", yaml.safe_load(printed)))
    assert config_to_dict(saved) == config_to_dict(config)


def test_flags_and_the_equivalent_mlx_yaml_build_the_same_config(project):
    flags, _ = build("--train", "--model", "smollm2-135m-instruct", "--data", "data", "--batch-size", "2", "--test")
    path = write_yaml(
        project / "lora_config.yaml",
        {"model": "smollm2-135m-instruct", "train": True, "data": "data", "batch_size": 2, "test": True},
    )
    assert config_to_dict(build("-c", str(path))[0]) == config_to_dict(flags)


def test_hub_and_mlx_community_ids_of_an_embedded_model_resolve_to_it_unless_cached(monkeypatch):
    def not_cached(repo_id):
        raise ModelNotFoundError(repo_id)

    monkeypatch.setattr(models, "_hub_snapshot", not_cached)
    for name in ("mlx-community/SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", "SmolLM2-135M-Instruct"):
        assert models.embedded_name(name) == "smollm2-135m-instruct"
    assert models.base_model_hub_id("mlx-community/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert models.embedded_name("mlx-community/SmolLM2-135M-Instruct-4bit") is None  # other weights: no alias
    assert models.embedded_name("mistralai/Mistral-7B-Instruct-v0.3") is None
    monkeypatch.setattr(models, "_hub_snapshot", lambda repo_id: Path("/cache") / repo_id)
    assert models.embedded_name("HuggingFaceTB/SmolLM2-135M-Instruct") is None  # the exact weights win


def test_seed_003_command_trains_a_run(project, model_dir, capsys):
    argv = ["train", "--train", "--model", str(model_dir), "--data", "data", "--batch-size", "2"]
    fast = ["--iters", "4", "--steps-per-eval", "2", "--learning-rate", "1e-2", "--max-seq-length", "96", "--test"]
    assert main([*argv, *fast, "--quiet", "--no-base-eval"]) == 0
    run = project / "runs" / f"{project.name.lower()}-{model_dir.name.lower()}"
    assert (run / "adapter" / "adapter_config.json").is_file()
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert any("valid_loss" in record for record in records) and json.loads((run / "summary.json").read_text())
    capsys.readouterr()
    # the config it wrote is the reusable YAML: training from it finds the same, finished run
    assert main(["train", str(run / "config.yaml"), "--output", str(run), "--quiet"]) == 0
    assert "already holds this finished run" in capsys.readouterr().out
