"""``affinage data check``: catch the silent data bugs before a single step is trained.

The field's most reported fine-tuning bugs fail silently: prompt tokens trained on, EOS
missing (the model never learns to stop), a training rendering that differs from the
inference one, the same example in train and test. Each check here is a finding with a
severity: errors stop ``affinage train``; warnings are printed and training goes on.
"""

from __future__ import annotations

import statistics
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from affinage.config import SplitConfig
from affinage.data.dedup import describe_group, duplicate_groups, repeated_groups
from affinage.data.formats import Example
from affinage.data.template import Encoded, encode_example, encode_prompt, render_prompt

MAX_SHOWN = 3  # examples named per finding


@dataclass
class CheckReport:
    errors: list[str] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    stats: dict[str, Any] = field(default_factory=dict)
    rendered: list[dict[str, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.errors

    def as_dict(self) -> dict[str, Any]:
        return {
            "ok": self.ok,
            "errors": self.errors,
            "warnings": self.warnings,
            "stats": self.stats,
            "rendered": self.rendered,
        }


def _named(examples: Sequence[Example]) -> str:
    shown = ", ".join(e.source or "?" for e in examples[:MAX_SHOWN])
    return shown + (f" and {len(examples) - MAX_SHOWN} more" if len(examples) > MAX_SHOWN else "")


_SAME = "same text up to case, accents, symbols and spacing, or near-copies"


def _groups_text(groups: Sequence[Sequence[int]], sources: Sequence[str]) -> str:
    shown = "; ".join(describe_group(members, sources) for members in groups[:MAX_SHOWN])
    return shown + (f"; and {len(groups) - MAX_SHOWN} more" if len(groups) > MAX_SHOWN else "")


def check_leakage(
    splits: dict[str, list[Example]],
    report: CheckReport,
    threshold: float | None = None,
    eval_sets: dict[str, list[Example]] | None = None,
) -> None:
    """Copies of one example within a split (warning) and across splits: leakage.

    Train and valid/test (or an ``eval.sets`` file) sharing a group is an error (the score would
    reward memory); valid and test sharing one is a warning (the checkpoint picked on valid is
    partly picked on test).
    """
    held_out = {f"eval set '{name}'": rows for name, rows in (eval_sets or {}).items()}
    own_splits = list(splits)
    splits = {**splits, **held_out}
    owners = [name for name, examples in splits.items() for _ in examples]
    examples = [example for name in splits for example in splits[name]]
    sources = [example.source or "?" for example in examples]
    groups = repeated_groups(duplicate_groups([e.identity_text() for e in examples], threshold))
    across = [members for members in groups if len({owners[i] for i in members}) > 1]
    report.stats["duplicates"] = {
        "near_duplicate_threshold": threshold,
        "groups": len(groups),
        "rows": sum(len(members) for members in groups),
        "across_splits": len(across),
        "examples": [describe_group(members, sources) for members in (across or groups)[:MAX_SHOWN]],
    }
    for name in own_splits:  # an evaluation file's own repeats are its author's business, not training's
        within = [[i for i in members if owners[i] == name] for members in groups]
        within = [members for members in within if len(members) > 1]
        if within:
            copies = sum(len(members) - 1 for members in within)
            report.warnings.append(
                f"{name}: {copies} duplicate examples ({_SAME}), e.g. {_groups_text(within, sources)}"
            )
    for other in [name for name in splits if name != "train"]:
        leaked = [members for members in across if {"train", other} <= {owners[i] for i in members}]
        if leaked:
            count = sum(owners[i] == other for members in leaked for i in members)
            report.errors.append(
                f"leakage: {count} {other} examples also appear in train ({_SAME}), e.g. "
                f"{_groups_text(leaked, sources)} (fix: remove them from one side, or let `affinage data split` "
                "group duplicates)"
            )
    shared = [members for members in across if {owners[i] for i in members} == {"valid", "test"}]
    if shared:
        report.warnings.append(
            f"valid and test share {len(shared)} duplicate groups ({_SAME}): the checkpoint picked on valid is "
            f"partly picked on test, e.g. {_groups_text(shared, sources)}"
        )


def check_counts(splits: dict[str, list[Example]], labels: list[str] | None, report: CheckReport) -> None:
    report.stats["counts"] = {name: len(examples) for name, examples in splits.items()}
    if not labels:
        return
    per_class = {
        name: dict(sorted(Counter(e.completion.strip() for e in examples).items())) for name, examples in splits.items()
    }
    report.stats["per_class"] = per_class
    for name in ("valid", "test"):
        missing = [label for label in labels if splits.get(name) and label not in per_class[name]]
        if missing:
            report.warnings.append(
                f"{name} split has no example of {', '.join(missing)}: its metrics cannot judge those classes"
            )
    train_counts = per_class.get("train", {})
    if train_counts and max(train_counts.values()) > 5 * max(1, min(train_counts.values())):
        report.warnings.append(
            f"train classes are unbalanced ({train_counts}): consider more examples of the rare ones"
        )


def _is_plain_text(example: Example) -> bool:
    """Continued pre-training rows: every token carries loss by design."""
    return getattr(example, "kind", None) == "text"


def check_encodings(
    tokenizer: Any,
    name: str,
    examples: Sequence[Example],
    encoded: Sequence[Encoded],
    prompting: Any,
    max_len: int,
    report: CheckReport,
) -> None:
    """Loss mask, EOS, truncation, and training vs inference rendering, token by token."""
    eos = tokenizer.eos_token_id
    empty, masked, no_eos, prompt_trained, mismatched = [], [], [], [], []
    lengths, labelled, total, longest = [], 0, 0, 0
    for example, enc in zip(examples, encoded):
        lengths.append(len(enc.input_ids))
        longest = max(longest, enc.full_length or len(enc.input_ids))
        n_labels = sum(1 for label in enc.labels if label != -100)
        labelled += n_labels
        total += len(enc.input_ids)
        if not example.completion.strip():
            empty.append(example)
        if n_labels == 0:
            masked.append(example)
            continue
        last = max(i for i, label in enumerate(enc.labels) if label != -100)
        if enc.labels[last] != eos and not (_is_plain_text(example) and enc.truncated):  # a cut document has no end
            no_eos.append(example)
        multi_turn = any(m["role"] == "assistant" for m in example.messages or [])
        if not multi_turn and not _is_plain_text(example) and not enc.truncated:
            # Single-turn: the labels start exactly where the inference prompt ends.
            prompt = encode_prompt(tokenizer, example, prompting.template, prompting.system)
            first = next(i for i, label in enumerate(enc.labels) if label != -100)
            if enc.input_ids[: len(prompt)] != prompt:
                mismatched.append(example)
            elif first < len(prompt):
                prompt_trained.append(example)
    truncated = sum(e.truncated for e in encoded)
    if lengths:
        ordered = sorted(lengths)
        report.stats.setdefault("tokens", {})[name] = {
            "examples": len(lengths),
            "min": ordered[0],
            "median": int(statistics.median(ordered)),
            "p95": ordered[min(len(ordered) - 1, int(0.95 * len(ordered)))],
            "max": ordered[-1],
            "truncated": truncated,
            "loss_token_share": round(labelled / max(total, 1), 4),
        }
    if truncated:
        report.warnings.append(
            f"{name}: {truncated} examples are longer than trainer.max_seq_len={max_len} and get truncated "
            f"(fix: raise max_seq_len to {longest} to keep them whole)"
        )
    for found, message in (
        (empty, "an empty completion"),
        (masked, "no token carrying loss (completion fully masked)"),
        (prompt_trained, "loss on prompt tokens"),
        (mismatched, "a training rendering that differs from the inference prompt"),
    ):
        if found:
            report.errors.append(f"{name}: {len(found)} examples with {message}, e.g. {_named(found)}")
    if no_eos:
        report.errors.append(
            f"{name}: {len(no_eos)} examples whose labels do not end with EOS (the model would not learn to stop), "
            f"e.g. {_named(no_eos)} (fix: raise trainer.max_seq_len so the answer fits)"
        )


def check_chat_template_agreement(tokenizer: Any, example: Example, prompting: Any, report: CheckReport) -> None:
    """Our training text vs the model's own template on the full conversation (what it was tuned on)."""
    if prompting.template is not None or not getattr(tokenizer, "chat_template", None) or example.prompt is None:
        return
    messages = ([{"role": "system", "content": prompting.system}] if prompting.system is not None else []) + [
        {"role": "user", "content": example.prompt},
        {"role": "assistant", "content": example.completion},
    ]
    reference = tokenizer.apply_chat_template(messages, tokenize=False)
    ours = render_prompt(tokenizer, example, None, prompting.system) + example.completion + (tokenizer.eos_token or "")
    if not reference.startswith(ours) and not ours.startswith(reference.rstrip()):
        report.warnings.append(
            "the chat template renders the full conversation differently from prompt + answer + EOS: "
            f"template {reference[-80:]!r} vs training {ours[-80:]!r}"
        )


def run_checks(
    tokenizer: Any,
    splits: dict[str, list[Example]],
    labels: list[str] | None,
    prompting: Any,
    max_len: int,
    encoded: dict[str, list[Encoded]] | None = None,
    near_duplicate_threshold: float | None = SplitConfig().near_duplicate_threshold,
    eval_sets: dict[str, list[Example]] | None = None,
) -> CheckReport:
    """Every check; ``encoded`` (the splits already encoded by the caller) saves encoding them twice.

    ``near_duplicate_threshold``: the config's ``data.split.near_duplicate_threshold``, so the
    check finds the groups the split kept together; ``eval_sets`` (the config's ``eval.sets``)
    are checked for copies of training rows too.
    """
    report = CheckReport()
    check_counts(splits, labels, report)
    check_leakage(splits, report, near_duplicate_threshold, eval_sets)
    encoded = dict(encoded or {})
    for name, examples in splits.items():
        if name not in encoded:
            encoded[name] = [
                encode_example(tokenizer, e, max_len, prompting.template, prompting.system) for e in examples
            ]
        check_encodings(tokenizer, name, examples, encoded[name], prompting, max_len, report)
    first = next((name for name, examples in splits.items() if examples), None)
    for example, enc in zip(splits.get(first, [])[:2], encoded.get(first, [])[:2]):
        answer_start = next((i for i, label in enumerate(enc.labels) if label != -100), len(enc.labels))
        report.rendered.append(
            {
                "source": example.source,
                "prompt": tokenizer.decode(enc.input_ids[:answer_start]),
                "trained_on": tokenizer.decode([t for t in enc.labels if t != -100]),
            }
        )
    if first is not None:
        check_chat_template_agreement(tokenizer, splits[first][0], prompting, report)
    return report


def report_text(report: CheckReport) -> str:
    lines = [f"counts: {report.stats.get('counts')}"]
    if "per_class" in report.stats:
        lines += [f"  {name}: {counts}" for name, counts in report.stats["per_class"].items()]
    duplicates = report.stats.get("duplicates")
    if duplicates and duplicates["groups"]:
        lines.append(
            f"duplicate groups: {duplicates['groups']} ({duplicates['rows']} rows), {duplicates['across_splits']} "
            f"across splits (threshold {duplicates['near_duplicate_threshold']}), e.g. "
            + "; ".join(duplicates["examples"])
        )
    for name, stats in report.stats.get("tokens", {}).items():
        lines.append(f"tokens {name}: {stats}")
    for shown in report.rendered:
        lines += [
            f"--- {shown['source']} as the model sees it (prompt, then [trained on])",
            shown["prompt"] + "[" + shown["trained_on"] + "]",
        ]
    lines += [f"warning: {w}" for w in report.warnings] + [f"error: {e}" for e in report.errors]
    lines.append(
        "data check: "
        + ("OK" if report.ok else f"{len(report.errors)} error(s)")
        + (f", {len(report.warnings)} warning(s)" if report.warnings else "")
    )
    return "\n".join(lines)
