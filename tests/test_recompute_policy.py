"""Which forwards recompute their blocks: every one, none, or (auto) a row over the token budget whose
activations the machine's memory share cannot hold, measured on the model."""

import pytest
import torch

from affinage.lora import mark_only_lora_as_trainable
from affinage.runtime import machine_memory_bytes
from affinage.training.loop import training_forms
from affinage.training.recompute_policy import ACTIVATION_SHARE, KeptBytes, kept_bytes, recompute_above
from tests.conftest import adapted_tiny, tiny_gemma3, tiny_llama


def _unused(tokens: int) -> float:
    raise AssertionError("measured although no row is over the budget")


def test_true_and_false_and_auto_within_the_budget_need_no_measurement():
    assert recompute_above(True, 512, 4096, _unused) == 0
    assert recompute_above(False, 512, 4096, _unused) is None
    assert recompute_above("auto", None, 4096, _unused) is None  # no budget (GPU): the batch size is the knob
    assert recompute_above("auto", 512, 512, _unused) == 512  # nothing longer than the budget: as before


def test_auto_recomputes_only_past_the_memory_share():
    share = ACTIVATION_SHARE * machine_memory_bytes()
    assert recompute_above("auto", 512, 4096, lambda n: n * share / 2048) == 2048  # 2048 tokens fill the share
    assert recompute_above("auto", 512, 4096, lambda n: n * share / 8192) is None  # the longest row fits
    assert recompute_above("auto", 512, 4096, lambda n: n * share) == 512  # never below the budget


@pytest.mark.parametrize("build", [tiny_llama, tiny_gemma3])
def test_kept_bytes_predict_a_longer_forward(build, tokenizer):
    model = adapted_tiny(build, tokenizer, dropout=0.1)
    mark_only_lora_as_trainable(model)
    model.eval()
    state = torch.random.get_rng_state()
    predicted = KeptBytes(model, torch.device("cpu"))
    assert predicted(1) > 0
    assert torch.equal(torch.random.get_rng_state(), state) and not model.training  # left as they were
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    weights |= {b.untyped_storage().data_ptr() for b in model.buffers()}

    def kept(tokens: int) -> int:
        ids = torch.ones((1, tokens), dtype=torch.long)
        with training_forms(model, False):
            return kept_bytes(lambda: model.get_decoder()(input_ids=ids, use_cache=False), weights)[1]

    model.train()
    assert kept(512) == pytest.approx(predicted(512), rel=0.02)  # 8x the longest probe


def test_a_model_the_probe_cannot_run_recomputes_every_row_over_the_budget():
    class NoDecoder(torch.nn.Module):
        def get_decoder(self):
            raise AttributeError("no decoder")

    kept = KeptBytes(NoDecoder(), torch.device("cpu"))
    assert recompute_above("auto", 512, 4096, kept) == 512
