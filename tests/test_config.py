import pytest

from affinage.config import Config, config_from_dict, describe_fields, load_config
from affinage.errors import ConfigError

# Seed 000's Ludwig config with the trainer and preprocessing of Ludwig's README example (Alpaca).
LUDWIG_SEED_000 = """
model_type: llm
base_model: smollm2-135m-instruct
quantization:
  bits: 4
adapter:
  type: lora
prompt:
  template: |
    ### Instruction :
    {instruction}
    ### Entrée :
    {input}
    ### Réponse :
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
    warmup_fraction: 0.01
preprocessing:
  sample_ratio: 0.1
"""


def test_ludwig_seed_config_loads(tmp_path):
    path = tmp_path / "ludwig.yaml"
    path.write_text(LUDWIG_SEED_000, encoding="utf-8")
    config = load_config(path)
    assert config.quantization.bits == 4
    assert config.trainer.gradient_accumulation == 16
    assert config.trainer.warmup_ratio == 0.01
    assert "{instruction}" in config.prompt.template
    assert config.output_features[0].name == "output"


def test_defaults_live_in_the_schema():
    config = Config()
    assert config.base_model == "smollm2-135m-instruct"
    assert config.adapter.r == 16 and config.adapter.target_modules == "all-linear"


def test_unknown_key_names_the_key_and_the_allowed_ones(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("trainer:\n  learnig_rate: 0.1\n")
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert "trainer.learnig_rate" in message and "learning_rate" in message and str(path) in message


def test_bad_value_names_the_key():
    with pytest.raises(ConfigError, match="adapter.r"):
        config_from_dict({"adapter": {"r": 0}})


def test_overrides_are_typed(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  epochs: 3\n")
    config = load_config(
        path, ["trainer.max_steps=7", "trainer.batch_size=2", "adapter.target_modules=q_proj,v_proj", "adapter.r=4"]
    )
    assert config.trainer.max_steps == 7 and config.trainer.batch_size == 2
    assert config.adapter.target_modules == ["q_proj", "v_proj"] and config.adapter.r == 4


def test_invalid_yaml_names_the_line(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("trainer:\n  epochs: [1\n")
    with pytest.raises(ConfigError, match=r"c.yaml:\d"):
        load_config(path)


def test_every_key_is_documented():
    lines = describe_fields()
    assert any(line.startswith("trainer.learning_rate") for line in lines)
    assert all(": " in line for line in lines)


def test_docs_config_lists_every_key_as_the_schema_describes_it():
    from pathlib import Path

    from affinage.config import describe_fields

    text = (Path(__file__).parents[1] / "docs" / "config.md").read_text(encoding="utf-8")
    missing = [line for line in describe_fields() if line not in text]
    assert not missing, f"docs/config.md is stale (regenerate it from `affinage config`): {missing[:3]}"
