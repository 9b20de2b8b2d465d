"""Model cards: what a shipped model is, how it measured before and after, and how to run it.

Every fact in the card comes from the run's own files (config.yaml, task.json, data/*.jsonl,
summary.json), so a card never claims a number the run did not measure. The YAML metadata is
what the Hub indexes: ``base_model`` (by Hub id, which is how the Hub links a fine-tune to its
base), ``library_name`` and ``eval_results`` (the model-index).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

from affinage.atomic import write_text_atomic
from affinage.errors import AffinageError
from affinage.export.card_facts import RunFacts, read_run_facts
from affinage.export.card_usage import fenced, usage

WHATS = ("adapter", "merged", "gguf", "ollama")
LIBRARY = {"adapter": "peft", "merged": "transformers", "gguf": "gguf", "ollama": "gguf"}
SPLITS = ("train", "valid", "test")
PLACEHOLDER_REPO = "USER/REPO"

# summary.json metric -> (model-index metric type, label in the card, format)
METRICS: dict[str, tuple[str, str, str]] = {
    "accuracy": ("accuracy", "accuracy", "{:.1%}"),
    "macro_f1": ("f1", "macro F1", "{:.3f}"),
    "answered_accuracy": ("accuracy", "accuracy when answered", "{:.1%}"),
    "coverage": ("coverage", "answered (abstain threshold)", "{:.1%}"),
    "chrf": ("chrf", "chrF", "{:.1f}"),
    "exact_match": ("exact_match", "exact match", "{:.1%}"),
    "pattern_score": ("pattern_score", "pattern score", "{:.1%}"),
    "loss": ("loss", "test loss", "{:.4f}"),
    "perplexity": ("perplexity", "test perplexity", "{:.2f}"),
}


def _measured(summary: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """(base, fine-tuned) test metrics as pipeline.py writes them; empty dicts where not measured."""
    summary = summary or {}
    return summary.get("base_test") or {}, summary.get("fine_tuned_test") or {}


def eval_results(facts: RunFacts, model_name: str) -> list[EvalResult]:
    """The model-index: every measured metric on the test split, base model (before) and fine-tuned (after)."""
    base, tuned = _measured(facts.summary)
    kind = facts.task.get("task", "generation")
    dataset = _dataset_name(facts)
    results = []
    for who, metrics in (("base model, before fine-tuning", base), ("fine-tuned", tuned)):
        for key, (metric_type, label, _) in METRICS.items():
            if isinstance(metrics.get(key), (int, float)):
                results.append(
                    EvalResult(
                        task_type="text-classification" if kind == "classification" else "text-generation",
                        dataset_type=dataset,
                        dataset_name=dataset,
                        dataset_split="test",
                        metric_type=metric_type,
                        metric_name=f"{label} ({who})",
                        metric_value=metrics[key],
                    )
                )
    return results


def _dataset_name(facts: RunFacts) -> str:
    data = facts.config.get("data") or {}
    source = data.get("dataset") or data.get("train")
    return Path(str(source)).stem if source else f"{facts.name}-data"


def card_data(facts: RunFacts, what: str, model_name: str) -> ModelCardData:
    tags = ["affinage", "lora", str(facts.task.get("task", "generation"))]
    tags += {"gguf": ["gguf"], "ollama": ["gguf", "ollama"]}.get(what, [])
    extra: dict[str, Any] = {}
    if facts.base_hub_id:
        extra["base_model_relation"] = "adapter" if what == "adapter" else "finetune"
    return ModelCardData(
        base_model=facts.base_hub_id,
        library_name=LIBRARY[what],
        pipeline_tag="text-generation",
        tags=tags,
        model_name=model_name,
        eval_results=eval_results(facts, model_name) or None,
        **extra,
    )


def model_card(run_dir: Path, what: str, *, repo_id: str | None = None, gguf_file: str | None = None) -> ModelCard:
    """The card for shipping ``run_dir`` as ``what`` (adapter, merged, gguf or ollama)."""
    if what not in WHATS:
        raise AffinageError(f"unknown export kind '{what}'", fix=f"use one of {', '.join(WHATS)}")
    model_name = repo_id.rsplit("/", 1)[-1] if repo_id else Path(run_dir).resolve().name
    facts = read_run_facts(Path(run_dir), model_name)
    data = card_data(facts, what, model_name)
    body = card_body(facts, what, repo_id or PLACEHOLDER_REPO, gguf_file or "model.gguf")
    return ModelCard(f"---\n{data.to_yaml()}\n---\n\n{body}")


def write_card(run_dir: Path, export_dir: Path, what: str, *, repo_id: str | None = None) -> Path:
    """Write ``export_dir/README.md`` (atomically): the file the Hub shows as the model's page."""
    export_dir = Path(export_dir)
    ggufs = sorted(p.name for p in export_dir.glob("*.gguf")) if export_dir.is_dir() else []
    gguf_file = "adapter.gguf" if "adapter.gguf" in ggufs else (ggufs[0] if ggufs else None)
    card = model_card(Path(run_dir), what, repo_id=repo_id, gguf_file=gguf_file)
    path = export_dir / "README.md"
    write_text_atomic(path, str(card))
    return path


# ---------------------------------------------------------------- the card's text

KIND_TEXT = {
    "adapter": "A LoRA adapter (PEFT format) for {base}",
    "merged": "{base} with a LoRA fine-tune merged into its weights (a plain transformers model)",
    "gguf": "A GGUF file of {base} with a LoRA fine-tune merged in, for llama.cpp and Ollama",
    "gguf-adapter": "{base} as a GGUF file (`base.gguf`) and a LoRA fine-tune as a llama.cpp adapter (`adapter.gguf`)",
    "ollama": "An Ollama model (GGUF file + Modelfile) of {base} with a LoRA fine-tune merged in",
    "ollama-adapter": "An Ollama model of {base} (`base.gguf`) with a LoRA fine-tune as an `ADAPTER` (`adapter.gguf`)",
}


def card_body(facts: RunFacts, what: str, repo: str, gguf_file: str) -> str:
    """The Markdown under the metadata: intro, results, data, training, how to use, the run config."""
    sections = [
        _intro(facts, what, gguf_file),
        _results(facts),
        _data(facts),
        _training(facts),
        usage(facts, what, repo, gguf_file),
        _config(facts),
    ]
    return "\n\n".join(section for section in sections if section) + "\n"


def _base_link(facts: RunFacts) -> str:
    hub = facts.base_hub_id
    return f"[{hub}](https://huggingface.co/{hub})" if hub else f"`{facts.base_model}` (a local model)"


def _task_text(task: dict[str, Any]) -> str:
    kind = task.get("task", "generation")
    if kind == "classification" and task.get("labels"):
        labels = ", ".join(f"`{label}`" for label in task["labels"])
        return f"classification into {len(task['labels'])} labels: {labels}"
    if kind == "pattern":
        return f"generation checked by the `{task.get('pattern')}` pattern"
    return str(kind)


def _intro(facts: RunFacts, what: str, gguf_file: str) -> str:
    kind = f"{what}-adapter" if gguf_file == "adapter.gguf" and what in ("gguf", "ollama") else what
    return (
        f"# {facts.name}\n\n{KIND_TEXT[kind].format(base=_base_link(facts))}, fine-tuned with affinage.\n\n"
        f"Task: {_task_text(facts.task)}."
    )


def _cell(metrics: dict[str, Any], key: str) -> str:
    value = metrics.get(key)
    return METRICS[key][2].format(value) if isinstance(value, (int, float)) else "-"


def _results(facts: RunFacts) -> str:
    base, tuned = _measured(facts.summary)
    if not tuned:
        return "## Results\n\nNo test-split evaluation was recorded for this run (no summary.json, or no test split)."
    rows = ["| metric | base model | fine-tuned |", "|---|---|---|"]
    rows += [
        f"| {label} | {_cell(base, key)} | {_cell(tuned, key)} |"
        for key, (_, label, _) in METRICS.items()
        if key in tuned or key in base
    ]
    note = (
        f"On the {tuned.get('n', '?')} examples of the run's test split; method: {tuned.get('method', 'not recorded')}."
    )
    if not base:
        note += " The base model was not evaluated (trained with `--no-base-eval`)."
    return "## Results\n\n" + "\n".join(rows) + "\n\n" + note


def _data(facts: RunFacts) -> str:
    lines = ["## Data", "", "| split | rows |", "|---|---|"] + [f"| {split} | {n} |" for split, n in facts.rows.items()]
    labels = facts.task.get("labels") or []
    if facts.label_counts:
        splits = [split for split in SPLITS if split in facts.label_counts]
        lines += ["", "| label | " + " | ".join(splits) + " |", "|---|" + "---|" * len(splits)]
        lines += [
            f"| {label} | " + " | ".join(str(facts.label_counts[split][label]) for split in splits) + " |"
            for label in labels
        ]
    elif labels:
        lines += ["", "Labels: " + ", ".join(f"`{label}`" for label in labels)]
    return "\n".join(lines)


def _training(facts: RunFacts) -> str:
    adapter, summary = facts.config.get("adapter") or {}, facts.summary or {}
    lora = ", ".join(f"{key} {adapter[key]}" for key in ("r", "alpha", "dropout", "target_modules") if key in adapter)
    lines = [f"- LoRA: {lora}"] if lora else []
    facts_text = {
        "steps": "optimizer steps",
        "train_examples": "training examples",
        "train_tokens": "training tokens",
        "best_step": "best step (kept adapter)",
        "best_valid_loss": "best validation loss",
        "final_train_loss": "final training loss",
        "train_seconds": "training seconds",
        "device": "device",
        "precision": "precision",
    }
    lines += [
        f"- {label}: {_number(summary[key])}" for key, label in facts_text.items() if summary.get(key) is not None
    ]
    return "## Training\n\n" + "\n".join(lines) if lines else ""


def _number(value: Any) -> Any:
    return f"{value:.4g}" if isinstance(value, float) else value


def _config(facts: RunFacts) -> str:
    intro = "## Run config\n\nThe run's `config.yaml` (paths are those of the training machine):\n\n"
    return intro + fenced(facts.config_text, "yaml")
