import pytest
import torch

from affinage.config import TrainerConfig
from affinage.data.batching import collate
from affinage.data.formats import Example
from affinage.data.template import encode_example
from affinage.lora import inject_lora, lora_modules, mark_only_lora_as_trainable
from affinage.training import causal_lm_loss, train
from affinage.training.prefix_cache import FrozenPrefix, frozen_boundary
from tests.conftest import EMAILS, tiny_gemma3, tiny_llama


def _data(tokenizer):
    examples = [Example(prompt=text, completion=label) for label, texts in EMAILS.items() for text in texts]
    return [encode_example(tokenizer, e, 128) for e in examples]


def _adapted(build, tokenizer):
    model = build(len(tokenizer), layers=4)
    inject_lora(model, "all-linear", r=4, alpha=8, dropout=0.0, layers=2)  # blocks 2 and 3
    for module in lora_modules(model).values():
        torch.nn.init.normal_(module.lora_B.weight, std=0.02)
    mark_only_lora_as_trainable(model)
    return model


@pytest.mark.parametrize("build", [tiny_llama, tiny_gemma3])
def test_cached_frozen_blocks_give_the_same_loss_and_gradients(build, tokenizer):
    model = _adapted(build, tokenizer)
    assert frozen_boundary(model) == 2
    data = _data(tokenizer)
    prefix = FrozenPrefix(model, 2)
    cached_loss = prefix.wrap(
        causal_lm_loss, prefix.compute(data, tokenizer.pad_token_id, torch.device("cpu"), tokens=90)
    )
    indices = [0, 5, 9, 2]  # a batch unlike the ones the cache was computed in
    batch = collate([data[i] for i in indices], tokenizer.pad_token_id, indices)
    results = []
    for loss_fn in (causal_lm_loss, cached_loss):
        model.zero_grad()
        loss, n = loss_fn(model, batch)
        (loss / n).backward()
        results.append((loss.detach(), {k: p.grad.clone() for k, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(results[0][0], results[1][0], rtol=1e-5, atol=1e-5)
    assert results[0][1].keys() == results[1][1].keys() and results[0][1]
    for key in results[0][1]:
        torch.testing.assert_close(results[0][1][key], results[1][1][key], rtol=1e-4, atol=1e-6)
    assert all(type(layer).__name__.endswith("DecoderLayer") for layer in model.get_decoder().layers)  # restored


def test_no_cache_when_every_block_trains(tokenizer):
    model = tiny_llama(len(tokenizer))
    inject_lora(model, "all-linear", r=4, alpha=8, dropout=0.0)
    mark_only_lora_as_trainable(model)
    assert frozen_boundary(model) is None


def test_training_with_and_without_the_cache_ends_at_the_same_adapter(tokenizer, tmp_path):
    data = _data(tokenizer)
    finals = []
    for cache in (False, True):
        model = _adapted(tiny_llama, tokenizer)
        cfg = TrainerConfig(
            max_steps=5, batch_size=4, learning_rate=1e-2, warmup_ratio=0.0, eval_every=5, cache_frozen_blocks=cache
        )
        result = train(
            model,
            data,
            data[:3],
            cfg,
            pad_id=tokenizer.pad_token_id,
            run_dir=tmp_path / str(cache),
            base_model_name="tiny",
            progress=False,
        )
        finals.append(
            (result.best_valid_loss, {k: p.detach().clone() for k, p in model.named_parameters() if "lora_" in k})
        )
    assert finals[0][0] == pytest.approx(finals[1][0], rel=1e-4)
    for key in finals[0][1]:
        torch.testing.assert_close(finals[0][1][key], finals[1][1][key], rtol=1e-3, atol=1e-5)


def test_the_prefix_pass_groups_rows_by_length_within_a_token_budget():
    from affinage.training.prefix_cache import length_groups

    assert length_groups([5, 3, 9, 3, 4], tokens=10) == [[1, 3], [4, 0], [2]]  # 2 x 3, 2 x 5, then 9 alone
    assert length_groups([20, 2], tokens=10) == [[1], [0]]  # a row over the budget runs alone
    assert length_groups([], tokens=10) == []
