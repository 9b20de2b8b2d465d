"""Ludwig's LLM schema key for key (issue 16): each key maps onto affinage or is refused by name.

The tables name one Ludwig key per row (v0.10 and the 0.17 line); the configs at the end are
written from Ludwig's documentation and trained 2 steps on the tiny model, through the CLI.
"""

from __future__ import annotations

import json

import pytest
import yaml

from affinage.cli import main
from affinage.config import config_from_dict
from affinage.errors import ConfigError
from tests.conftest import SEED_000_CONFIG, router_rows, write_jsonl

FEATURES = {"input_features": [{"name": "prompt", "type": "text"}], "output_features": [{"name": "completion"}]}


def _get(config, dotted: str):
    value = config
    for part in dotted.split("."):
        value = getattr(value, part)
    return value


# (Ludwig config, affinage key, the value it translates to)
MAPPED = [
    # prompt
    ({"prompt": {"task": "Route the email.", **{}}, **FEATURES}, "prompt.template",
     "SAMPLE INPUT: {prompt}\n\nUSER: Complete the following task: Route the email.\n\nASSISTANT:\n"),
    ({"prompt": {"task": "Say {x}", "template": "{__task__}: {__sample__} ->"}, **FEATURES}, "prompt.template",
     "Say {{x}}: {prompt} ->"),
    ({"prompt": {"template": "Q: {question}", "retrieval": {"type": None}}}, "prompt.template", "Q: {question}"),
    # generation
    ({"generation": {"max_new_tokens": 12}}, "generation.max_new_tokens", 12),
    ({"generation": {"temperature": 0.7}}, "generation.temperature", 0.7),
    ({"generation": {"top_p": 0.9}}, "generation.top_p", 0.9),
    ({"generation": {"do_sample": False, "temperature": 0.7}}, "generation.temperature", 0.0),
    ({"generation": {"do_sample": True}}, "generation.temperature", 0.1),
    ({"generation": {"do_sample": False, "top_k": 5, "typical_p": 0.5}}, "generation.temperature", 0.0),
    ({"generation": {"do_sample": True, "temperature": 0.5, "top_k": 50}}, "generation.temperature", 0.5),
    ({"generation": {"min_new_tokens": None, "num_beams": 1, "repetition_penalty": 1.0}}, "generation.temperature", 0),
    ({"generation": {"no_repeat_ngram_size": 0, "penalty_alpha": None, "max_length": 32}}, "generation.top_p", 1.0),
    ({"generation": {"use_cache": True, "eos_token_id": None, "guidance_scale": None}}, "generation.top_p", 1.0),
    # adapter
    ({"adapter": {"type": "lora", "r": 4}}, "adapter.alpha", 8.0),  # Ludwig: alpha defaults to 2 * r
    ({"adapter": {"r": 4, "alpha": 16, "dropout": 0.1}}, "adapter.alpha", 16.0),
    ({"adapter": {"dropout": 0.1}}, "adapter.dropout", 0.1),
    ({"adapter": {"target_modules": ["q_proj", "v_proj"]}}, "adapter.target_modules", ["q_proj", "v_proj"]),
    ({"adapter": {"target_modules": None}}, "adapter.target_modules", "all-linear"),
    ({"adapter": {"use_rslora": True}}, "adapter.use_rslora", True),
    ({"adapter": {"use_dora": True}}, "adapter.use_dora", True),
    ({"adapter": {"bias_type": "none"}}, "adapter.type", "lora"),
    ({"adapter": {"init_lora_weights": "default"}}, "adapter.init", "default"),
    ({"adapter": {"init_lora_weights": "gaussian"}}, "adapter.init", "gaussian"),
    ({"adapter": {"init_lora_weights": "pissa"}}, "adapter.init", "pissa"),
    ({"adapter": {"init_lora_weights": True}}, "adapter.init", "default"),
    ({"adapter": {"rank_pattern": {"q_proj": 4}, "alpha_pattern": None}}, "adapter.rank_pattern", {"q_proj": 4}),
    ({"adapter": {"postprocessor": {"merge_adapter_into_base_model": False, "progressbar": True}}}, "adapter.r", 16),
    ({"adapter": {"pretrained_adapter_weights": None, "loraplus_lr_ratio": None}}, "adapter.r", 16),
    # quantization
    ({"quantization": {"bits": 8}}, "quantization.bits", 8),
    ({"quantization": {"bnb_4bit_compute_dtype": "bfloat16"}}, "quantization.compute_dtype", "bfloat16"),
    ({"quantization": {"bnb_4bit_use_double_quant": False}}, "quantization.double_quant", False),
    ({"quantization": {"bnb_4bit_quant_type": "fp4"}}, "quantization.quant_type", "fp4"),
    ({"quantization": {"llm_int8_threshold": 6.0, "llm_int8_has_fp16_weight": False}}, "quantization.bits", 4),
    ({"quantization": {"backend": "bitsandbytes", "mode": None, "qat": False}}, "quantization.bits", 4),
    # model_parameters
    ({"model_parameters": {"trust_remote_code": True}}, "trust_remote_code", True),
    ({"model_parameters": {"rope_scaling": None, "neftune_noise_alpha": 0}}, "trust_remote_code", False),
    # trainer
    ({"trainer": {"type": "finetune"}}, "trainer.type", "finetune"),
    ({"trainer": {"type": "none"}}, "trainer.type", "none"),
    ({"trainer": {"type": None}}, "trainer.type", "none"),
    ({"trainer": {"epochs": 2}}, "trainer.epochs", 2),
    ({"trainer": {"train_steps": 7}}, "trainer.max_steps", 7),
    ({"trainer": {"learning_rate": 1e-3}}, "trainer.learning_rate", 1e-3),
    ({"trainer": {"batch_size": 2}}, "trainer.batch_size", 2),
    ({"trainer": {"batch_size": "auto"}}, "trainer.batch_size", 8),
    ({"trainer": {"eval_batch_size": "auto", "max_batch_size": 64}}, "trainer.batch_size", 8),
    ({"trainer": {"gradient_accumulation_steps": 4}}, "trainer.gradient_accumulation", 4),
    ({"trainer": {"gradient_accumulation_steps": "auto"}}, "trainer.gradient_accumulation", 1),
    ({"trainer": {"batch_size": 2, "effective_batch_size": 8}}, "trainer.gradient_accumulation", 4),
    ({"trainer": {"effective_batch_size": "auto"}}, "trainer.gradient_accumulation", 1),
    ({"trainer": {"steps_per_checkpoint": 10}}, "trainer.eval_every", 10),
    ({"trainer": {"checkpoints_per_epoch": 0}}, "trainer.eval_every", None),
    ({"trainer": {"early_stop": 3}}, "trainer.early_stopping_patience", 3),
    ({"trainer": {"early_stop": -1}}, "trainer.early_stopping_patience", None),
    ({"trainer": {"enable_gradient_checkpointing": True}}, "trainer.gradient_checkpointing", True),
    ({"trainer": {"use_mixed_precision": False}}, "trainer.precision", "fp32"),
    ({"trainer": {"use_mixed_precision": True}}, "trainer.precision", "auto"),
    ({"trainer": {"compile": False, "evaluate_training_set": False}}, "trainer.epochs", 3),
    ({"trainer": {"validation_field": "completion", "validation_metric": "loss"}}, "trainer.best_metric", "valid_loss"),
    ({"trainer": {"validation_metric": "accuracy"}}, "trainer.best_metric", "task"),
    ({"trainer": {"optimizer": {"type": "adamw", "weight_decay": 0.01}}}, "trainer.weight_decay", 0.01),
    ({"trainer": {"optimizer": {"type": "adam", "betas": [0.9, 0.999], "eps": 1e-8}}}, "trainer.weight_decay", 0.0),
    ({"trainer": {"gradient_clipping": {"clipglobalnorm": 0.5, "clipnorm": None}}}, "trainer.max_grad_norm", 0.5),
    ({"trainer": {"learning_rate_scheduler": {"decay": "linear"}}}, "trainer.lr_scheduler", "linear"),
    ({"trainer": {"learning_rate_scheduler": {"warmup_fraction": 0.1}}}, "trainer.lr_scheduler", "constant"),
    ({"trainer": {"learning_rate_scheduler": {"warmup_fraction": 0.1, "decay": "cosine"}}}, "trainer.warmup_ratio",
     0.1),
    ({"trainer": {"learning_rate_scheduler": {"decay": "cosine", "reduce_on_plateau": 0, "t_0": None}}},
     "trainer.lr_scheduler", "cosine"),
    # preprocessing
    ({"preprocessing": {"split": {"type": "random", "probabilities": [0.6, 0.2, 0.2]}}}, "data.split.ratios",
     (0.6, 0.2, 0.2)),
    ({"preprocessing": {"split": {"type": "random"}}}, "data.split.ratios", (0.7, 0.1, 0.2)),
    ({"preprocessing": {"split": {"type": "stratify", "column": "completion"}}, **FEATURES}, "data.split.ratios",
     (0.7, 0.1, 0.2)),
    ({"preprocessing": {"global_max_sequence_length": 256}}, "trainer.max_seq_len", 256),
    ({"preprocessing": {"sample_ratio": 0.5}}, "preprocessing", {"sample_ratio": 0.5}),
    ({"preprocessing": {"sample_size": 10, "oversample_minority": None}}, "preprocessing", {"sample_size": 10}),
    # features
    ({"input_features": [{"name": "text", "column": "prompt", "encoder": {"type": "passthrough"}}]},
     "input_features.0.name", "prompt"),
    ({"output_features": [{"name": "label", "type": "category",
                           "preprocessing": {"vocab": ["RH", "Finance"], "fallback_label": "RH"}}]},
     "eval.labels", ["RH", "Finance"]),
    # top level
    ({"model_type": "llm", "ludwig_version": "0.10.4", "backend": {"type": "local"}}, "model_type", "llm"),
    ({"hyperopt": None, "defaults": {}, "is_multimodal": False}, "model_type", "llm"),
]  # fmt: skip


@pytest.mark.parametrize(("raw", "key", "expected"), MAPPED)
def test_a_ludwig_key_maps_onto_affinage(raw, key, expected):
    config = config_from_dict(raw)
    if key.startswith("input_features.0."):
        assert config.input_features[0].name == expected
    else:
        assert _get(config, key) == expected


# (Ludwig config, the key named in the message)
REFUSED = [
    ({"prompt": {"template": "{__sample__}", "retrieval": {"type": "semantic", "k": 3}}, **FEATURES},
     "prompt.retrieval.type: semantic"),
    *[({"generation": {key: value}}, f"generation.{key}: {value}") for key, value in [
        ("num_beams", 4), ("repetition_penalty", 1.2), ("min_new_tokens", 5), ("no_repeat_ngram_size", 3),
        ("penalty_alpha", 0.6), ("num_beam_groups", 2), ("diversity_penalty", 0.5), ("length_penalty", 2.0),
        ("max_time", 10), ("min_length", 3), ("prompt_lookup_num_tokens", 10), ("encoder_repetition_penalty", 1.1),
        ("bad_words_ids", [[1]]), ("force_words_ids", [[2]]), ("renormalize_logits", True),
        ("forced_bos_token_id", 1), ("forced_eos_token_id", 2), ("remove_invalid_values", True),
        ("exponential_decay_length_penalty", [5, 1.5]), ("suppress_tokens", [3]), ("begin_suppress_tokens", [3]),
        ("forced_decoder_ids", [[1, 2]]), ("guidance_scale", 1.5), ("pad_token_id", 0), ("bos_token_id", 1),
        ("eos_token_id", 2),
    ]],
    *[({"generation": {"do_sample": sample, key: value}}, f"generation.{key}: {value}") for sample in (True, None)
      for key, value in [
        ("top_k", 5), ("typical_p", 0.5), ("epsilon_cutoff", 0.001), ("eta_cutoff", 0.001),
    ]],
    ({"generation": {"max_new_tokens": None, "max_length": 64}}, "generation.max_length: 64"),
    *[({"adapter": {"init_lora_weights": kind}}, f"adapter.init_lora_weights: {kind}")
      for kind in ("olora", "eva", "corda", "loftq", "orthogonal")],
    ({"adapter": {"bias_type": "all"}}, "adapter.bias_type: all"),
    ({"adapter": {"bias_type": "lora_only"}}, "adapter.bias_type: lora_only"),
    *[({"adapter": {"type": kind}}, f"adapter.type: {kind}") for kind in ("adalora", "ia3", "vera", "loha", "oft")],
    ({"adapter": None}, "adapter: null"),
    ({"adapter": {"pretrained_adapter_weights": "org/adapter"}}, "adapter.pretrained_adapter_weights: org/adapter"),
    ({"adapter": {"postprocessor": {"merge_adapter_into_base_model": True}}},
     "adapter.postprocessor.merge_adapter_into_base_model: true"),
    ({"adapter": {"loraplus_lr_ratio": 16}}, "adapter.loraplus_lr_ratio: 16"),
    ({"adapter": {"layer_replication": [[0, 2]]}}, "adapter.layer_replication: [[0, 2]]"),
    ({"quantization": {"llm_int8_threshold": 4.0}}, "quantization.llm_int8_threshold: 4.0"),
    ({"quantization": {"llm_int8_has_fp16_weight": True}}, "quantization.llm_int8_has_fp16_weight: True"),
    ({"quantization": {"backend": "torchao"}}, "quantization.backend: torchao"),
    ({"model_parameters": {"rope_scaling": {"type": "linear", "factor": 2.0}}},
     "model_parameters.rope_scaling: {'type': 'linear', 'factor': 2.0}"),
    ({"model_parameters": {"neftune_noise_alpha": 5}}, "model_parameters.neftune_noise_alpha: 5"),
    ({"trainer": {"type": "dpo"}}, "trainer.type: dpo"),
    ({"trainer": {"learning_rate": "auto"}}, "trainer.learning_rate: auto"),
    ({"trainer": {"checkpoints_per_epoch": 4}}, "trainer.checkpoints_per_epoch: 4"),
    ({"trainer": {"evaluate_training_set": True}}, "trainer.evaluate_training_set: True"),
    ({"trainer": {"compile": True}}, "trainer.compile: True"),
    ({"trainer": {"validation_metric": "bleu"}}, "trainer.validation_metric: bleu"),
    ({"trainer": {"optimizer": {"type": "sgd"}}}, "trainer.optimizer.type: sgd"),
    ({"trainer": {"optimizer": {"type": "paged_adam_8bit"}}}, "trainer.optimizer.type: paged_adam_8bit"),
    ({"trainer": {"optimizer": {"type": "adamw", "betas": [0.8, 0.9]}}}, "trainer.optimizer.betas: [0.8, 0.9]"),
    ({"trainer": {"gradient_clipping": {"clipvalue": 1.0}}}, "trainer.gradient_clipping.clipvalue: 1.0"),
    ({"trainer": {"learning_rate_scheduler": {"decay": "exponential"}}},
     "trainer.learning_rate_scheduler.decay: exponential"),
    ({"trainer": {"learning_rate_scheduler": {"reduce_on_plateau": 2}}},
     "trainer.learning_rate_scheduler.reduce_on_plateau: 2"),
    ({"trainer": {"learning_rate_scheduler": {"t_0": 10}}}, "trainer.learning_rate_scheduler.t_0: 10"),
    *[({"preprocessing": {"split": {"type": kind, "column": "c"}}}, f"preprocessing.split.type: {kind}")
      for kind in ("fixed", "hash", "datetime")],
    ({"preprocessing": {"split": {"type": "stratify", "column": "other"}}, **FEATURES},
     "preprocessing.split.column: other"),
    ({"preprocessing": {"oversample_minority": 0.5}}, "preprocessing.oversample_minority: 0.5"),
    ({"preprocessing": {"undersample_majority": 0.5}}, "preprocessing.undersample_majority: 0.5"),
    ({"input_features": [{"name": "photo", "type": "image"}]}, "input_features[0].type: image"),
    ({"output_features": [{"name": "score", "type": "number"}]}, "output_features[0].type: number"),
    ({"backend": {"type": "ray"}}, "backend.type: ray"),
    ({"hyperopt": {"goal": "minimize"}}, "hyperopt"),
    ({"combiner": {"type": "concat"}}, "combiner"),
    ({"defaults": {"text": {"preprocessing": {"lowercase": True}}}}, "defaults"),
    ({"model_type": "ecd"}, "model_type: ecd"),
    ({"model_type": "gbm"}, "model_type: gbm"),
]  # fmt: skip


@pytest.mark.parametrize(("raw", "key"), REFUSED)
def test_a_ludwig_key_affinage_cannot_honour_is_refused_by_name(raw, key):
    with pytest.raises(ConfigError) as error:
        config_from_dict(raw)
    message = str(error.value)
    assert f"Ludwig's `{key}`" in message and "is not supported by affinage" in message
    assert "unknown" not in message.lower() and error.value.fix


def test_the_ray_backend_points_at_torchrun():
    with pytest.raises(ConfigError) as error:
        config_from_dict({"backend": {"type": "ray", "trainer": {"num_workers": 4}}})
    assert "torchrun --nproc-per-node N -m affinage train" in error.value.fix


@pytest.mark.parametrize(
    ("prompt", "fix"),
    [({"template": "{__task__}: {text}"}, "prompt.task"), ({"task": "t", "template": "{text}"}, "{__task__}")],
)
def test_task_and_template_must_agree_as_ludwig_requires(prompt, fix):
    with pytest.raises(ConfigError) as error:
        config_from_dict({"prompt": prompt})
    assert fix in error.value.fix


def test_effective_batch_size_divides_by_affinages_default_batch():
    from affinage.config import TrainerConfig
    from affinage.ludwig.trainer import AFFINAGE_BATCH_SIZE

    assert TrainerConfig().batch_size == AFFINAGE_BATCH_SIZE
    assert config_from_dict({"trainer": {"effective_batch_size": 32}}).trainer.gradient_accumulation == 4
    with pytest.raises(ConfigError, match="multiple"):
        config_from_dict({"trainer": {"batch_size": 3, "effective_batch_size": 8}})


def test_translation_leaves_the_callers_mapping_alone():
    raw = {"adapter": {"init_lora_weights": "pissa"}, "trainer": {"optimizer": {"type": "adamw"}}}
    config_from_dict(raw)
    assert raw == {"adapter": {"init_lora_weights": "pissa"}, "trainer": {"optimizer": {"type": "adamw"}}}


def test_a_task_prompt_renders_each_row_as_ludwig_does():
    from affinage.data.formats import Example
    from affinage.data.template import render_prompt

    config = config_from_dict({"prompt": {"task": "Classify the email."}, **FEATURES})
    example = Example(prompt=None, completion="RH", row={"prompt": "Je postule", "completion": "RH"})
    text = render_prompt(None, example, config.prompt.template, None)
    assert text == "SAMPLE INPUT: Je postule\n\nUSER: Complete the following task: Classify the email.\n\nASSISTANT:\n"


# --- Ludwig configs from its documentation, through the CLI ------------------------------------

# Ludwig v0.10's README: the Alpaca QLoRA fine-tune (its base model is swapped for the tiny model).
ALPACA_QLORA = """
model_type: llm
base_model: {model}
quantization:
  bits: 4
adapter:
  type: lora
prompt:
  template: |
    Below is an instruction that describes a task, paired with an input that may provide further context.
    Write a response that appropriately completes the request.

    ### Instruction:
    {{instruction}}

    ### Input:
    {{input}}

    ### Response:
input_features:
  - name: prompt
    type: text
output_features:
  - name: output
    type: text
trainer:
  type: finetune
  learning_rate: 0.0001
  batch_size: 1
  gradient_accumulation_steps: 16
  epochs: 3
  learning_rate_scheduler:
    decay: cosine
    warmup_fraction: 0.01
preprocessing:
  sample_ratio: 0.1
backend:
  type: local
"""


# Ludwig's zero-shot task prompt and a category output with its vocabulary (Ludwig's LLM docs), with most
# of the generation, adapter, trainer and preprocessing keys spelled as Ludwig spells them.
TASK_CATEGORY = """
model_type: llm
ludwig_version: 0.17.4
base_model: {model}
model_parameters:
  trust_remote_code: false
  neftune_noise_alpha: 0
prompt:
  task: "Route this email to RH, Support or Finance."
  retrieval:
    type: null
input_features:
  - name: prompt
    type: text
output_features:
  - name: completion
    type: category
    preprocessing:
      vocab: [RH, Support, Finance]
      fallback_label: Support
generation:
  do_sample: false
  temperature: 0.1
  top_k: 50
  num_beams: 1
  max_new_tokens: 4
adapter:
  type: lora
  r: 4
  dropout: 0.0
  bias_type: none
  init_lora_weights: gaussian
  target_modules: [q_proj, v_proj]
  use_rslora: true
  postprocessor:
    merge_adapter_into_base_model: false
    progressbar: false
trainer:
  type: finetune
  batch_size: 4
  eval_batch_size: auto
  effective_batch_size: 4
  train_steps: 2
  steps_per_checkpoint: 1
  learning_rate: 0.01
  early_stop: -1
  optimizer:
    type: adamw
    weight_decay: 0.0
  gradient_clipping:
    clipglobalnorm: 0.5
  learning_rate_scheduler:
    decay: linear
    warmup_fraction: 0.0
  enable_gradient_checkpointing: false
  use_mixed_precision: false
  compile: false
  evaluate_training_set: false
  validation_field: completion
  validation_metric: accuracy
preprocessing:
  global_max_sequence_length: 96
  split:
    type: stratify
    column: completion
    probabilities: [0.5, 0.25, 0.25]
  oversample_minority: null
backend:
  type: local
"""


def _alpaca_rows(n: int = 30) -> list[dict]:
    return [
        {"instruction": f"Écris le nombre {i} en lettres", "input": "" if i % 2 else f"n = {i}", "output": f"n{i}"}
        for i in range(n)
    ]


def _write(tmp_path, template: str, model_dir, rows: list[dict], **extra) -> tuple:
    write_jsonl(tmp_path / "rows.jsonl", rows)
    config = yaml.safe_load(template.format(model=model_dir))
    config["data"] = {"dataset": "rows.jsonl"}  # Ludwig gets the dataset from `ludwig train --dataset`
    config.update(extra)
    path = tmp_path / "ludwig.yaml"
    path.write_text(yaml.safe_dump(config, allow_unicode=True), encoding="utf-8")
    return path, config


SHORT = ["--no-base-eval", "--set", "eval.max_examples=2", "--set", "eval.max_new_tokens=2"]


def _train(path, run, *extra: str) -> dict:
    assert main(["train", str(path), "--output", str(run), "--quiet", *SHORT, *extra]) == 0
    return json.loads((run / "summary.json").read_text())


def test_ludwig_task_prompt_with_a_category_output_trains(tmp_path, model_dir, capsys):
    path, _ = _write(tmp_path, TASK_CATEGORY, model_dir, router_rows())
    assert main(["config", str(path)]) == 0
    resolved = json.loads(capsys.readouterr().out)
    assert resolved["prompt"]["template"].startswith("SAMPLE INPUT: {prompt}")
    assert resolved["eval"]["labels"] == ["RH", "Support", "Finance"] and resolved["data"]["split"]["ratios"] == [
        0.5,
        0.25,
        0.25,
    ]
    summary = _train(path, tmp_path / "run")
    assert summary["steps"] == 2 and "accuracy" in summary["fine_tuned_test"]


def test_ludwig_trainer_type_none_evaluates_the_base_model_as_a_run(tmp_path, model_dir, capsys):
    path, _ = _write(tmp_path, TASK_CATEGORY, model_dir, router_rows())
    run = tmp_path / "run"
    assert main(["train", str(path), "--output", str(run), "--quiet", "--set", "trainer.type=none"]) == 0
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 0 and summary["base_test"] == summary["fine_tuned_test"]
    assert "accuracy" in summary["base_test"]
    capsys.readouterr()
    assert main(["eval", str(run), "--json"]) == 0  # the run answers as the base model does
    assert json.loads(capsys.readouterr().out)["accuracy"] == summary["base_test"]["accuracy"]
    assert main(["predict", str(run), "Je postule au poste de développeur", "--max-new-tokens", "2"]) == 0


@pytest.mark.parametrize("template", [ALPACA_QLORA, SEED_000_CONFIG], ids=["alpaca-qlora-v0.10-readme", "seed-000"])
def test_ludwig_documented_configs_train_two_steps(tmp_path, model_dir, template, capsys):
    pytest.importorskip("bitsandbytes")  # both load the base in 4 bits, as on Ludwig
    path, _ = _write(tmp_path, template, model_dir, _alpaca_rows())
    assert main(["config", str(path)]) == 0
    capsys.readouterr()
    summary = _train(path, tmp_path / "run", "--set", "trainer.train_steps=2", "--set", "trainer.max_seq_len=96")
    assert summary["steps"] == 2


@pytest.mark.parametrize(
    ("key", "value"),
    [
        ("trainer.type", "dpo"),
        ("backend.type", "ray"),
        ("generation.num_beams", "4"),
        ("adapter.type", "adalora"),
        ("quantization.llm_int8_threshold", "3.0"),
        ("preprocessing.split.type", "fixed"),
        ("hyperopt.goal", "minimize"),
    ],
)
def test_cli_refuses_a_ludwig_key_it_cannot_honour(tmp_path, model_dir, key, value, capsys):
    path, _ = _write(tmp_path, TASK_CATEGORY, model_dir, router_rows())
    assert main(["config", str(path), "--set", f"{key}={value}"]) != 0
    err = capsys.readouterr().err
    assert "is not supported by affinage" in err and "unknown key" not in err


# Ludwig's own defaults for every key of a block (its schemas, v0.10 and 0.17), as `ludwig` writes them out
# in a run's model_hyperparameters.json: a config carrying all of them must load.
LUDWIG_DEFAULT_BLOCKS = {
    "generation": {
        "max_new_tokens": 32, "min_new_tokens": None, "max_length": 32, "min_length": 0, "early_stopping": False,
        "max_time": None, "do_sample": True, "num_beams": 1, "num_beam_groups": 1, "penalty_alpha": None,
        "use_cache": True, "prompt_lookup_num_tokens": None, "temperature": 0.1, "top_k": 50, "top_p": 1.0,
        "typical_p": 1.0, "epsilon_cutoff": 0.0, "eta_cutoff": 0.0, "diversity_penalty": 0.0,
        "repetition_penalty": 1.0, "encoder_repetition_penalty": 1.0, "length_penalty": 1.0,
        "no_repeat_ngram_size": 0, "bad_words_ids": None, "force_words_ids": None, "renormalize_logits": False,
        "forced_bos_token_id": None, "forced_eos_token_id": None, "remove_invalid_values": False,
        "exponential_decay_length_penalty": None, "suppress_tokens": None, "begin_suppress_tokens": None,
        "forced_decoder_ids": None, "sequence_bias": None, "guidance_scale": None, "pad_token_id": None,
        "bos_token_id": None, "eos_token_id": None,
    },
    "adapter": {
        "type": "lora", "r": 8, "alpha": None, "dropout": 0.05, "bias_type": "none", "target_modules": None,
        "use_rslora": False, "use_dora": False, "loraplus_lr_ratio": None, "init_lora_weights": "default",
        "eva_config": {"rho": 2.0, "tau": 0.99}, "loftq_config": {"loftq_bits": 4, "loftq_iter": 1},
        "rank_pattern": None, "alpha_pattern": None, "layer_replication": None, "pretrained_adapter_weights": None,
        "postprocessor": {"merge_adapter_into_base_model": False, "progressbar": False},
    },
    "quantization": {
        "backend": "bitsandbytes", "mode": None, "qat": False, "bits": 4, "llm_int8_threshold": 6.0,
        "llm_int8_has_fp16_weight": False, "bnb_4bit_compute_dtype": "float16", "bnb_4bit_use_double_quant": True,
        "bnb_4bit_quant_type": "nf4",
    },
    "model_parameters": {"rope_scaling": None, "neftune_noise_alpha": 0},
    "preprocessing": {
        "sample_ratio": 1.0, "sample_size": None, "oversample_minority": None, "undersample_majority": None,
        "split": {"type": "random", "probabilities": [0.7, 0.1, 0.2]}, "global_max_sequence_length": None,
    },
    "prompt": {"retrieval": {"type": None, "index_name": None, "model_name": None, "k": 0}, "task": None,
               "template": "{prompt}"},
    "trainer": {
        "type": "finetune", "validation_field": None, "validation_metric": None, "early_stop": 5,
        "skip_all_evaluation": False, "enable_profiling": False, "profiler": {"wait": 1}, "learning_rate": 0.001,
        "learning_rate_scheduler": {
            "decay": None, "decay_rate": 0.96, "decay_steps": 10000, "staircase": False, "reduce_on_plateau": 0,
            "reduce_on_plateau_patience": 10, "reduce_on_plateau_rate": 0.1, "warmup_evaluations": 0,
            "warmup_fraction": 0.0, "reduce_eval_metric": "loss", "reduce_eval_split": "training", "t_0": None,
            "t_mult": 1, "eta_min": 0,
        },
        "epochs": 100, "checkpoints_per_epoch": 0, "train_steps": None, "eval_steps": None, "steps_per_checkpoint": 0,
        "effective_batch_size": "auto", "batch_size": 1, "max_batch_size": 1099511627776,
        "gradient_accumulation_steps": "auto", "eval_batch_size": 2, "evaluate_training_set": False,
        "optimizer": {"type": "adam", "betas": [0.9, 0.999], "eps": 1e-08, "weight_decay": 0.0, "amsgrad": False},
        "regularization_type": "l2", "regularization_lambda": 0.0, "should_shuffle": True,
        "increase_batch_size_on_plateau": 0, "increase_batch_size_on_plateau_patience": 5,
        "increase_batch_size_on_plateau_rate": 2.0, "increase_batch_size_eval_metric": "loss",
        "increase_batch_size_eval_split": "training",
        "gradient_clipping": {"clipglobalnorm": 0.5, "clipnorm": None, "clipvalue": None},
        "learning_rate_scaling": "linear", "bucketing_field": None, "use_mixed_precision": False, "compile": False,
        "enable_gradient_checkpointing": False, "layers_to_freeze_regex": None, "base_learning_rate": 0.0,
    },
    "backend": {"type": "local"},
}  # fmt: skip


@pytest.mark.parametrize("section", sorted(LUDWIG_DEFAULT_BLOCKS))
def test_ludwigs_whole_default_block_loads(section):
    config = config_from_dict({section: LUDWIG_DEFAULT_BLOCKS[section], **FEATURES})
    if section == "trainer":  # Ludwig's values where it writes them; its defaults otherwise
        assert config.trainer.early_stopping_patience == 5 and config.trainer.max_grad_norm == 0.5
        assert config.trainer.lr_scheduler == "constant" and config.trainer.batch_size == 1
    if section == "generation":
        assert config.generation.max_new_tokens == 32 and config.generation.temperature == 0.1
    if section == "adapter":
        assert config.adapter.r == 8 and config.adapter.alpha == 16
