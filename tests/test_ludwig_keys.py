"""Ludwig's LLM config keys: a few mappings and their edge cases (the key-by-key table, refusals included, is
tests/test_ludwig_schema.py)."""

import pytest

from affinage.config import config_from_dict
from affinage.errors import ConfigError


def test_ludwig_spellings_map_onto_affinage_keys():
    config = config_from_dict(
        {
            "adapter": {"type": "lora", "init_lora_weights": "pissa", "bias_type": "none"},
            "preprocessing": {"global_max_sequence_length": 256},
            "trainer": {"enable_gradient_checkpointing": True},
            "generation": {"do_sample": False, "temperature": 0.7, "top_k": 50, "num_beams": 1},
        }
    )
    assert config.adapter.init == "pissa"
    assert config.trainer.max_seq_len == 256 and config.trainer.gradient_checkpointing is True
    assert config.generation.temperature == 0.0  # do_sample false is greedy, whatever the temperature


def test_sampling_without_a_temperature_takes_ludwigs_default():
    # Ludwig's generation schema (v0.10 and 0.17) defaults temperature to 0.1, not HF's 1.0.
    assert config_from_dict({"generation": {"do_sample": True}}).generation.temperature == 0.1
    assert config_from_dict({"generation": {"do_sample": True, "temperature": 0.3}}).generation.temperature == 0.3


def test_a_renamed_key_that_disagrees_with_its_affinage_twin_is_an_error():
    raw = {"preprocessing": {"global_max_sequence_length": 256}, "trainer": {"max_seq_len": 128}}
    with pytest.raises(ConfigError, match="disagree"):
        config_from_dict(raw)
    same = {"preprocessing": {"global_max_sequence_length": 128}, "trainer": {"max_seq_len": 128}}
    assert config_from_dict(same).trainer.max_seq_len == 128
