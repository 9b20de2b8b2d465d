import random
import string
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from affinage.data.dedup import normalise_text
from affinage.data.split import stratified_split


def test_normalise_groups_near_duplicates():
    assert normalise_text("Candidature  spontanée !") == normalise_text("candidature spontanee")


@settings(max_examples=60, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from(["RH", "Support", "SPAM"]), st.integers(0, 40)), min_size=3, max_size=120),
    st.integers(0, 1000),
)
def test_split_invariants(rows, seed):
    texts = [f"email {n}" for _, n in rows]  # equal n = duplicate text
    labels = [label for label, _ in rows]
    items = list(range(len(rows)))
    splits = stratified_split(items, labels, texts, (0.8, 0.1, 0.1), seed)
    flat = [i for split in splits for i in split]
    assert sorted(flat) == items  # a partition
    owner = {}
    for index, split in enumerate(splits):
        for i in split:
            key = normalise_text(texts[i])
            assert owner.setdefault(key, index) == index  # no duplicate group across splits
    assert splits == stratified_split(items, labels, texts, (0.8, 0.1, 0.1), seed)  # deterministic


def test_stratified_within_one_example_per_class():
    labels = ["A"] * 50 + ["B"] * 30 + ["C"] * 20
    texts = [f"t{i}" for i in range(100)]
    train, valid, test = stratified_split(list(range(100)), labels, texts, (0.8, 0.1, 0.1), 1)
    for split, ratio in ((train, 0.8), (valid, 0.1), (test, 0.1)):
        counts = Counter(labels[i] for i in split)
        for label, total in Counter(labels).items():
            assert abs(counts[label] - total * ratio) <= 1


def test_data_split_command_writes_rows_unchanged(tmp_path, capsys):
    import json

    from affinage.cli import main

    rows = [{"prompt": f"email {i}", "completion": "AB"[i % 2], "id": i} for i in range(40)]
    rows.append({"prompt": "EMAIL 3!", "completion": "B", "id": 99})  # near-duplicate of email 3
    source = tmp_path / "all.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["data", "split", str(source), "--out", str(tmp_path / "out"), "--seed", "3"]) == 0
    report = json.loads(capsys.readouterr().out)
    written = {
        name: [json.loads(line) for line in (tmp_path / "out" / f"{name}.jsonl").read_text().splitlines()]
        for name in ("train", "valid", "test")
    }
    assert sorted(r["id"] for split in written.values() for r in split) == sorted(r["id"] for r in rows)
    assert all(set(r) == {"prompt", "completion", "id"} for split in written.values() for r in split)
    home = [name for name, split in written.items() if any(r["id"] in (3, 99) for r in split)]
    assert len(home) == 1
    assert report["splits"]["test"]["per_label"] == {"A": 2, "B": 2}


def test_a_label_seen_once_cannot_be_split(tmp_path, capsys):
    import json

    from affinage.cli import main

    rows = [{"prompt": f"e{i}", "completion": "A"} for i in range(10)] + [{"prompt": "x", "completion": "Rare"}]
    source = tmp_path / "all.jsonl"
    source.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["data", "split", str(source), "--out", str(tmp_path / "out")]) == 2
    assert "all.jsonl:11" in capsys.readouterr().err


def test_free_text_answers_are_split_without_strata(tmp_path):
    """Distinct answers are no label set: stratifying by them would put everything in train."""
    import json

    from affinage.config import config_from_dict
    from affinage.data import load_splits

    rows = [{"prompt": f"question {i} about topic {i * 7}", "completion": f"answer {i}"} for i in range(100)]
    (tmp_path / "qa.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    splits = load_splits(config_from_dict({"data": {"dataset": "qa.jsonl"}}, base_dir=tmp_path))
    assert (len(splits.train), len(splits.valid), len(splits.test)) == (80, 10, 10)


def test_a_label_seen_once_in_a_config_dataset_names_its_row(tmp_path):
    import json

    from affinage.config import config_from_dict
    from affinage.data import load_splits
    from affinage.errors import DataError

    rows = [{"prompt": f"email {i}", "completion": ["RH", "Finance"][i % 2]} for i in range(20)] + [
        {"prompt": "rare", "completion": "Legal"}
    ]
    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(DataError, match="'Legal' appears only once") as error:
        load_splits(config_from_dict({"data": {"dataset": "d.jsonl"}}, base_dir=tmp_path))
    assert "d.jsonl:21" in str(error.value)


def _invoice_rows():
    rng = random.Random(0)
    words = ["".join(rng.choices(string.ascii_lowercase, k=rng.randint(2, 9))) for _ in range(400)]
    rows = [{"prompt": " ".join(rng.sample(words, 15)), "completion": "AB"[i % 2]} for i in range(40)]
    body = "merci de régler le solde de la commande {} avant la fin du mois prochain, cordialement"
    rows += [
        {"prompt": "facture n°2024-118 " + body.format("A7"), "completion": "A"},
        {"prompt": "FACTURE N2024-118 " + body.format("A7").upper(), "completion": "B"},  # exact once folded
        {"prompt": "Facture n° 2024-118, " + body.format("A7 bien"), "completion": "B"},  # a word added
    ]
    return rows


def test_data_split_reports_the_groups_it_kept_together(tmp_path, capsys):
    import json

    from affinage.cli import main

    source = tmp_path / "all.jsonl"
    source.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in _invoice_rows()))
    assert main(["data", "split", str(source), "--out", str(tmp_path / "out")]) == 0
    kept = json.loads(capsys.readouterr().out)["duplicates_kept_together"]
    assert kept["near_duplicate_threshold"] == 0.8 and (kept["groups"], kept["rows"]) == (1, 3)
    assert kept["examples"][0]["rows"] == "all.jsonl:41 ~ all.jsonl:42 ~ all.jsonl:43"
    assert kept["examples"][0]["kind"] == "near"
    homes = [
        name
        for name in ("train", "valid", "test")
        if "2024-118" in (tmp_path / "out" / f"{name}.jsonl").read_text(encoding="utf-8")
    ]
    assert len(homes) == 1

    assert (
        main(["data", "split", str(source), "--out", str(tmp_path / "exact"), "--near-duplicate-threshold", "1"]) == 0
    )
    kept = json.loads(capsys.readouterr().out)["duplicates_kept_together"]
    assert (kept["groups"], kept["rows"], kept["examples"][0]["kind"]) == (1, 2, "exact")


def test_a_config_split_keeps_near_copies_together_and_says_so(tmp_path):
    import json

    from affinage.config import config_from_dict
    from affinage.data import load_splits

    (tmp_path / "d.jsonl").write_text("".join(json.dumps(r) + "\n" for r in _invoice_rows()))
    splits = load_splits(config_from_dict({"data": {"dataset": "d.jsonl"}}, base_dir=tmp_path))
    homes = {name for name in ("train", "valid", "test") for e in getattr(splits, name) if "2024" in e.prompt}
    assert len(homes) == 1
    assert "1 duplicate group (3 rows), e.g. " in splits.notes[0] and "d.jsonl:43" in splits.notes[0]


def test_the_threshold_is_checked_by_the_config():
    from affinage.config import config_from_dict
    from affinage.errors import ConfigError

    assert config_from_dict({}).data.split.near_duplicate_threshold == 0.8
    assert (
        config_from_dict({"data": {"split": {"near_duplicate_threshold": None}}}).data.split.near_duplicate_threshold
        is None
    )
    with pytest.raises(ConfigError, match="near_duplicate_threshold"):
        config_from_dict({"data": {"split": {"near_duplicate_threshold": 0.2}}})
