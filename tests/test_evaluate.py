import pytest
import torch
import torch.nn.functional as F

from affinage.data.formats import Example
from affinage.data.template import encode_completion, encode_prompt
from affinage.evaluate import (
    Prompting,
    classification_metrics,
    evaluate_classification,
    evaluate_pattern,
    generate,
    generation_metrics,
    score_labels,
)
from tests.conftest import tiny_gemma3, tiny_llama

LABELS = ["RH", "Support", "Finance", "SPAM"]


def _brute_force(model, tokenizer, example, label):
    prompt = encode_prompt(tokenizer, example)
    answer = encode_completion(tokenizer, label)
    ids = torch.tensor([prompt + answer])
    with torch.no_grad():
        logp = F.log_softmax(model(ids).logits[0].float(), dim=-1)
    return sum(float(logp[len(prompt) - 1 + i, token]) for i, token in enumerate(answer))


def test_kv_cached_label_scores_equal_full_sequence_scores(tokenizer):
    for build in (tiny_llama, tiny_gemma3):
        model = build(len(tokenizer))
        examples = [
            Example(prompt="Relance de paiement facture 42", completion="Finance"),
            Example(prompt="Candidature", completion="RH"),
        ]
        scores = score_labels(model, tokenizer, examples, LABELS, Prompting())
        for row, example in enumerate(examples):
            for column, label in enumerate(LABELS):
                assert abs(scores[row, column].item() - _brute_force(model, tokenizer, example, label)) < 1e-3


def test_metrics_on_a_known_confusion():
    gold = ["A", "A", "B", "B", "C"]
    predicted = ["A", "B", "B", "B", "unsure"]
    metrics = classification_metrics(gold, predicted, ["A", "B", "C"])
    assert metrics["accuracy"] == 0.6
    assert metrics["per_class"]["A"] == {"precision": 1.0, "recall": 0.5, "f1": 0.6667, "support": 2}
    assert metrics["per_class"]["B"]["precision"] == 0.6667 and metrics["per_class"]["B"]["recall"] == 1.0
    assert metrics["confusion_matrix"]["columns"] == ["A", "B", "C", "unsure"]
    assert metrics["confusion_matrix"]["matrix"] == [[1, 1, 0, 0], [0, 2, 0, 0], [0, 0, 0, 1]]


def test_classification_reports_its_method(tokenizer):
    model = tiny_llama(len(tokenizer))
    examples = [Example(prompt="Colis abîmé", completion="Support")]
    scored = evaluate_classification(model, tokenizer, examples, LABELS, Prompting())
    assert "restricted to the label set" in scored["method"]
    assert abs(sum(scored["predictions"][0]["probabilities"][label] for label in LABELS) - 1) < 1e-3
    generated = evaluate_classification(
        model, tokenizer, examples, LABELS, Prompting(), method="generate", max_new_tokens=3
    )
    assert generated["method"] == "free generation"


def test_batched_generation_equals_one_by_one(tokenizer):
    model = tiny_llama(len(tokenizer))
    examples = [
        Example(prompt="Bonjour", completion=""),
        Example(prompt="Nous avons constaté des erreurs dans la facture", completion=""),
    ]
    batched = generate(model, tokenizer, examples, Prompting(), max_new_tokens=6)
    single = [generate(model, tokenizer, [e], Prompting(), max_new_tokens=6)[0] for e in examples]
    assert batched == single


def test_abstain_threshold_answers_unsure_below_it(tokenizer):
    model = tiny_llama(len(tokenizer))  # random weights: no label near certainty
    examples = [Example(prompt="Colis abîmé", completion="Support"), Example(prompt="Facture", completion="Finance")]
    metrics = evaluate_classification(model, tokenizer, examples, LABELS, Prompting(), abstain_threshold=0.999)
    assert [p["predicted"] for p in metrics["predictions"]] == ["unsure", "unsure"]
    assert metrics["coverage"] == 0.0 and metrics["accuracy"] == 0.0
    assert "unsure" in metrics["confusion_matrix"]["columns"]
    lenient = evaluate_classification(model, tokenizer, examples, LABELS, Prompting(), abstain_threshold=1e-6)
    assert lenient["coverage"] == 1.0 and "unsure" not in [p["predicted"] for p in lenient["predictions"]]


def test_generation_metrics_against_sacrebleu():
    from sacrebleu.metrics import CHRF

    outputs, gold = ["the cat sat on the mat", "bonjour"], ["the cat sat on a mat", "bonjour"]
    metrics = generation_metrics(outputs, gold)
    assert metrics["exact_match"] == 0.5
    assert metrics["chrf"] == round(CHRF().corpus_score(outputs, [gold]).score, 2)
    assert generation_metrics(gold, gold)["chrf"] == 100.0
    assert metrics["mean_output_words"] == 3.5 and metrics["length_ratio"] == 1.0


def test_pattern_evaluation_scores_each_output(tokenizer):
    model = tiny_llama(len(tokenizer))
    examples = [Example(prompt="Bonjour", completion=""), Example(prompt="Salut", completion="")]
    outputs = generate(model, tokenizer, examples, Prompting(), max_new_tokens=4)
    metrics = evaluate_pattern(
        model,
        tokenizer,
        examples,
        Prompting(),
        lambda text: float(text == outputs[0]),
        "same-as-first",
        max_new_tokens=4,
    )
    assert [p["score"] for p in metrics["predictions"]] == [1.0, float(outputs[1] == outputs[0])]
    assert metrics["pattern_score"] == sum(p["score"] for p in metrics["predictions"]) / 2


def test_loss_from_label_scores_equals_the_teacher_forced_loss(tokenizer):
    """Label scoring gives the completion loss for free; it must equal the training loss."""
    from affinage.data.template import encode_example
    from affinage.training import evaluate_loss, full_logits_loss

    model = tiny_llama(len(tokenizer))
    examples = [
        Example(prompt="Colis abîmé à la livraison", completion="Support"),
        Example(prompt="Relance facture", completion="Finance"),
        Example(prompt="Candidature spontanée", completion="RH"),
    ]
    metrics = evaluate_classification(model, tokenizer, examples, LABELS, Prompting())
    encoded = [encode_example(tokenizer, e, 128) for e in examples]
    expected = evaluate_loss(model, encoded, 8, tokenizer.pad_token_id, torch.device("cpu"), full_logits_loss)
    assert metrics["loss"] == pytest.approx(expected, abs=2e-4)


@pytest.mark.parametrize("build", [tiny_llama, tiny_gemma3])
def test_the_vocabulary_head_gets_a_contiguous_input_and_the_same_logits(build, tokenizer):
    from affinage.models import contiguous_head_input

    model = build(len(tokenizer)).eval()
    ids = torch.randint(0, len(tokenizer), (3, 7))
    with torch.no_grad():
        before = model(input_ids=ids, logits_to_keep=1).logits
        contiguous_head_input(model)
        seen = []
        model.get_output_embeddings().register_forward_hook(lambda _m, args, _out: seen.append(args[0]))
        after = model(input_ids=ids, logits_to_keep=1).logits
    assert seen and seen[0].is_contiguous()  # the strided last-position slice no longer reaches the head
    assert torch.equal(before, after)
