import pytest
import torch

from affinage.config import TrainerConfig
from affinage.data.batching import collate
from affinage.data.formats import Example
from affinage.data.template import encode_example
from affinage.lora import inject_lora, lora_modules, mark_only_lora_as_trainable
from affinage.training import causal_lm_loss, train
from affinage.training.plan import BatchPlan, prefix_windows
from affinage.training.prefix_cache import FrozenPrefix, PrefixStates, frozen_boundary
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
    windows = [[9, 1, 4], [0, 2], [i for i in range(len(data)) if i not in (9, 1, 4, 0, 2)]]
    states = PrefixStates(prefix, data, windows, tokenizer.pad_token_id, torch.device("cpu"))
    cached_loss = prefix.wrap(causal_lm_loss, states)
    indices = [0, 5, 9, 2]  # a batch unlike the windows the states are computed in
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
    computed = [i for i, state in enumerate(states.states) if state is not None]
    assert computed == sorted([9, 1, 4, 0, 2, *windows[2]]) and states.seconds > 0  # the windows of 0, 5, 9, 2


def test_states_are_computed_a_window_at_a_time_when_a_batch_first_needs_them(tokenizer):
    model = _adapted(tiny_llama, tokenizer)
    data = _data(tokenizer)
    prefix = FrozenPrefix(model, 2)
    passes = []
    compute = prefix.compute
    prefix.compute = lambda rows, *args, **kwargs: passes.append(len(rows)) or compute(rows, *args, **kwargs)
    windows = [list(range(0, 4)), list(range(4, len(data)))]
    states = PrefixStates(prefix, data, windows, tokenizer.pad_token_id, torch.device("cpu"))
    first = states.rows([2, 0])
    assert passes == [4] and states.states[5] is None  # only the first window
    assert states.rows([0, 2])[0] is first[1] and passes == [4]  # kept, not recomputed
    states.rows([1, 7])
    assert passes == [4, len(data) - 4]
    whole = prefix.compute(data, tokenizer.pad_token_id, torch.device("cpu"))
    for index in range(len(data)):  # the windows' states are the whole pass's (padding changes nothing)
        torch.testing.assert_close(states.states[index], whole[index], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="exactly once"):
        PrefixStates(prefix, data, [[0, 1], [1, 2]], tokenizer.pad_token_id, torch.device("cpu"))


def test_windows_follow_the_first_epoch_batches_and_hold_every_row_once():
    from affinage.data.batching import bucketed_batches

    lengths = [10 + (i * 7) % 50 for i in range(40)]
    windows = prefix_windows(lengths, batch_size=4, seed=3, tokens=100)
    order = [i for batch in bucketed_batches(lengths, 4, 3) for i in batch]
    assert [i for window in windows for i in window] == order
    assert all(sum(lengths[i] for i in window[:-1]) < 100 <= sum(lengths[i] for i in window) for window in windows[:-1])
    shared = prefix_windows(lengths, batch_size=4, seed=3, share=(1, 2), tokens=100)
    mine = [i for batch in bucketed_batches(lengths, 4, 3) for i in batch[1::2]]
    flat = [i for window in shared for i in window]
    assert flat[: len(mine)] == mine and sorted(flat) == list(range(40))  # its own rows first, then the others'


def test_the_pass_inside_the_training_forms_leaves_them_switched_and_trained_blocks_in_train_mode(tokenizer):
    from affinage.training.loop import training_forms

    model = _adapted(tiny_gemma3, tokenizer)
    data = _data(tokenizer)
    prefix = FrozenPrefix(model, 2)
    model.train()
    layers = model.get_decoder().layers
    with training_forms(model):
        switched = {name: dict(m.__dict__).get("forward") for name, m in model.named_modules()}
        prefix.compute(data[:3], tokenizer.pad_token_id, torch.device("cpu"))
        assert {name: dict(m.__dict__).get("forward") for name, m in model.named_modules()} == switched
        assert any(forward is not None for forward in switched.values())
    assert all(m.training for m in model.modules())  # flags back as they were
    assert all("forward" not in m.__dict__ for m in layers.modules())  # and the forms undone once, by the loop


def test_the_plan_computes_states_as_batches_need_them_or_up_front(tokenizer, monkeypatch):
    import functools

    from affinage.training import plan

    monkeypatch.setattr(plan, "prefix_windows", functools.partial(prefix_windows, tokens=60))  # several windows
    data = _data(tokenizer)
    cfg = TrainerConfig(max_steps=2, batch_size=2, cache_frozen_blocks=True, packing=False)
    model = _adapted(tiny_llama, tokenizer)
    lazy = BatchPlan.build(model, data, data[:3], cfg, pad_id=tokenizer.pad_token_id)
    train_states, valid_states = lazy.prefix_states
    assert (
        lazy.prefix_cached
        and lazy.setup_seconds == 0
        and all(s is None for s in train_states.states + valid_states.states)
    )
    _, batch = next(lazy.batches())
    lazy.train_loss_fn(model, batch)
    computed = {i for i, state in enumerate(train_states.states) if state is not None}
    assert len(train_states.windows) > 1 and set(batch["indices"].tolist()) <= set(train_states.windows[0])
    assert computed == set(train_states.windows[0]) and all(s is None for s in valid_states.states)
    up_front = BatchPlan.build(
        _adapted(tiny_llama, tokenizer), data, data[:3], cfg, pad_id=tokenizer.pad_token_id, prefix_up_front=True
    )
    train_states, valid_states = up_front.prefix_states
    assert up_front.setup_seconds > 0 and all(s is not None for s in train_states.states + valid_states.states)


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
