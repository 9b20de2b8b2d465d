"""`affinage data check` catches each silent data bug when it is planted in a data set."""

import copy

from affinage.data import check as check_module
from affinage.data.check import run_checks
from affinage.data.formats import Example
from affinage.data.prompting import Prompting
from affinage.data.template import Encoded


def _examples(name, n=6, offset=0):
    labels = ["RH", "Finance"]
    return [
        Example(
            prompt=f"message numéro {i + offset} pour le service",
            completion=labels[i % 2],
            source=f"{name}.jsonl:{i + 1}",
        )
        for i in range(n)
    ]


def _splits():
    return {
        "train": _examples("train", 8),
        "valid": _examples("valid", 4, offset=100),
        "test": _examples("test", 4, offset=200),
    }


def test_clean_data_passes_with_stats(tokenizer):
    report = run_checks(tokenizer, _splits(), ["Finance", "RH"], Prompting(), 128)
    assert report.ok, report.errors
    assert report.stats["counts"] == {"train": 8, "valid": 4, "test": 4}
    assert report.stats["per_class"]["train"] == {"Finance": 4, "RH": 4}
    tokens = report.stats["tokens"]["train"]
    assert tokens["truncated"] == 0 and 0 < tokens["loss_token_share"] < 0.5
    assert len(report.rendered) == 2 and report.rendered[0]["trained_on"].endswith(tokenizer.eos_token)


def test_same_example_in_train_and_test_is_leakage(tokenizer):
    splits = _splits()
    planted = copy.copy(splits["train"][3])
    planted.prompt = planted.prompt.upper() + " !"  # same text up to case and punctuation
    splits["test"].append(planted)
    report = run_checks(tokenizer, splits, ["Finance", "RH"], Prompting(), 128)
    assert not report.ok and any("leakage: 1 test examples also appear in train" in e for e in report.errors)


def test_missing_eos_from_truncation(tokenizer):
    splits = _splits()
    splits["train"][0] = Example(
        prompt="court", completion="une réponse beaucoup trop longue " * 10, source="train.jsonl:1"
    )
    report = run_checks(tokenizer, splits, None, Prompting(), 40)
    assert any("do not end with EOS" in e and "train.jsonl:1" in e for e in report.errors)
    assert any("truncated" in w for w in report.warnings)


def test_empty_completion(tokenizer):
    splits = _splits()
    splits["train"].append(
        Example(prompt=None, completion="", messages=[{"role": "user", "content": "Bonjour"}], source="train.jsonl:9")
    )
    report = run_checks(tokenizer, splits, None, Prompting(), 128)
    assert any("empty completion" in e and "train.jsonl:9" in e for e in report.errors)


def test_prompt_tokens_trained_on(tokenizer, monkeypatch):
    real = check_module.encode_example

    def leaky(tok, example, *args):
        encoded = real(tok, example, *args)
        return Encoded(input_ids=encoded.input_ids, labels=list(encoded.input_ids), truncated=encoded.truncated)

    monkeypatch.setattr(check_module, "encode_example", leaky)
    report = run_checks(tokenizer, _splits(), None, Prompting(), 128)
    assert any("loss on prompt tokens" in e for e in report.errors)


def test_training_rendering_differs_from_inference(tokenizer, monkeypatch):
    real = check_module.encode_example

    def other_template(tok, example, *args):
        encoded = real(tok, example, *args)
        extra = tok("Assistant:", add_special_tokens=False)["input_ids"]
        return Encoded(
            input_ids=extra + encoded.input_ids, labels=[-100] * len(extra) + encoded.labels, truncated=False
        )

    monkeypatch.setattr(check_module, "encode_example", other_template)
    report = run_checks(tokenizer, _splits(), None, Prompting(), 128)
    assert any("differs from the inference prompt" in e for e in report.errors)


def test_chat_template_that_renders_answers_differently_warns(tokenizer):
    odd = copy.deepcopy(tokenizer)
    odd.chat_template = tokenizer.chat_template.replace(
        "+ message['content'] +",
        "+ ('<think></think>' if message['role'] == 'assistant' else '') + message['content'] +",
    )
    assert odd.chat_template != tokenizer.chat_template
    report = run_checks(odd, _splits(), None, Prompting(), 128)
    assert any("renders the full conversation differently" in w for w in report.warnings)


INVOICE = "Facture n°2024-118 : merci de régler le solde de la commande avant la fin du mois prochain"
INVOICE_COPY = "FACTURE N2024-118 merci de bien regler le solde de la commande avant la fin du mois prochain"


def _with_invoice(splits, other):
    splits["train"][3] = Example(prompt=INVOICE, completion="Finance", source="train.jsonl:4")
    splits[other].append(Example(prompt=INVOICE_COPY, completion="Finance", source=f"{other}.jsonl:5"))
    return splits


def test_a_near_copy_in_test_is_leakage_naming_both_rows(tokenizer):
    report = run_checks(tokenizer, _with_invoice(_splits(), "test"), ["Finance", "RH"], Prompting(), 128)
    leak = [e for e in report.errors if e.startswith("leakage: 1 test examples also appear in train")]
    assert leak and "train.jsonl:4 ~ test.jsonl:5" in leak[0]
    assert report.stats["duplicates"]["across_splits"] == 1
    assert "duplicate groups: 1 (2 rows), 1 across splits" in check_module.report_text(report)


def test_exact_only_threshold_lets_a_near_copy_pass(tokenizer):
    splits = _with_invoice(_splits(), "test")
    report = run_checks(tokenizer, splits, ["Finance", "RH"], Prompting(), 128, near_duplicate_threshold=None)
    assert not any("leakage" in e for e in report.errors)


def test_valid_and_test_sharing_a_group_is_a_warning(tokenizer):
    splits = _with_invoice(_splits(), "test")
    splits["valid"].append(Example(prompt=INVOICE.upper(), completion="Finance", source="valid.jsonl:5"))
    splits["train"][3] = _examples("train", 8)[3]
    report = run_checks(tokenizer, splits, ["Finance", "RH"], Prompting(), 128)
    assert not any("leakage" in e for e in report.errors)
    assert any(
        w.startswith("valid and test share 1 duplicate groups") and "valid.jsonl:5 ~ test.jsonl:5" in w
        for w in report.warnings
    )


def test_an_evaluation_set_holding_a_copy_of_a_training_row_is_leakage(tokenizer):
    splits = _splits()
    splits["train"][3] = Example(prompt=INVOICE, completion="Finance", source="train.jsonl:4")
    held_out = {"short": [Example(prompt=INVOICE_COPY, completion="Finance", source="short.jsonl:1")]}
    report = run_checks(tokenizer, splits, ["Finance", "RH"], Prompting(), 128, eval_sets=held_out)
    leak = [e for e in report.errors if e.startswith("leakage: 1 eval set 'short' examples also appear in train")]
    assert leak and "train.jsonl:4 ~ short.jsonl:1" in leak[0]
    clean = {"short": [Example(prompt="une tout autre demande de congé parental", completion="RH", source="s:1")]}
    assert run_checks(tokenizer, _splits(), ["Finance", "RH"], Prompting(), 128, eval_sets=clean).ok
