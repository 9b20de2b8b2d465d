"""Command line: ``affinage train | eval | predict | merge | export | push | compare | data | config``.

User errors (bad config, data, model name) print one clear message and exit 2; they never
show a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any

from affinage.cli_train import add_train_command
from affinage.errors import AffinageError


def _cmd_eval(args: argparse.Namespace) -> int:
    from affinage.report import metrics_text
    from affinage.run import evaluate_run
    from affinage.runtime import setup

    metrics = evaluate_run(args.run, args.data, device=setup(args.device))
    if args.json:
        print(json.dumps(metrics, ensure_ascii=False))
    else:
        print(metrics_text(metrics))
    return 0


def _cmd_predict(args: argparse.Namespace) -> int:
    from affinage.data.formats import read_rows
    from affinage.data.inference import inference_example, row_fields
    from affinage.run_dir import RunDir
    from affinage.runner import BasicModelRunner

    if args.file:
        path = Path(args.file)
        items = [(row, f"{path}:{number}") for number, row in read_rows(path)]
    elif args.text is not None:
        items = [(args.text, "argument")]
    else:
        raise AffinageError("nothing to predict", fix="pass a TEXT argument or --file FILE.jsonl")
    fields = {}
    if RunDir(args.run).is_run():
        input_field, templated = row_fields(RunDir(args.run).read_config())
        fields = {"input_field": input_field, "templated": templated}
    examples = [inference_example(item, where, **fields) for item, where in items]  # all rows checked before loading
    constraint = _constraint_flags(args)
    runner = BasicModelRunner(args.run, device=args.device)
    outputs = runner.predict_many(
        [item for item, _ in items], max_new_tokens=args.max_new_tokens, constraint=constraint
    )
    for example, output in zip(examples, outputs):
        prompt = (
            example.prompt
            if example.prompt is not None
            else (example.messages or [example.row])[-1].get("content", json.dumps(example.row, ensure_ascii=False))
        )
        if args.json:
            print(json.dumps({"prompt": prompt, "output": output}, ensure_ascii=False))
        else:
            print(output)
    return 0


def _constraint_flags(args: argparse.Namespace) -> Any:
    """`predict --regex R` / `--json-schema FILE`: a constraint replacing the run's generation.constraint."""
    if args.regex is None and args.json_schema is None:
        return None
    from pydantic import ValidationError

    from affinage.constraint_config import ConstraintConfig
    from affinage.errors import ConfigError
    from affinage.evaluate.constrain import Constraint

    try:
        config = ConstraintConfig(regex=args.regex, json_schema=args.json_schema).resolved(Path.cwd())
    except ValidationError as error:
        raise ConfigError(
            "; ".join(issue["msg"].removeprefix("Value error, ") for issue in error.errors()),
            where="--regex/--json-schema",
        ) from None
    except ValueError as error:
        raise ConfigError(str(error), where="--json-schema") from None
    return Constraint.from_config(config)


def _cmd_merge(args: argparse.Namespace) -> int:
    from affinage.export.merge import merge_run

    info = merge_run(args.run, args.output)
    note = " (the 4-bit base was replaced by its full-precision weights first)" if info["dequantized_base"] else ""
    print(
        f"merged {args.run} into {args.output} ({info['dtype']}){note}: "
        "loads with AutoModelForCausalLM.from_pretrained; "
        f"chat template: {info['chat_template']}"
    )
    if args.check:
        from affinage.data.formats import read_rows
        from affinage.export.merge_check import check_merged

        report = check_merged(
            args.run, args.output, [row for _, row in read_rows(Path(args.check))], max_new_tokens=args.max_new_tokens
        )
        print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0


def _export_options(args: argparse.Namespace) -> Any:
    from affinage.export.run_export import ExportOptions

    return ExportOptions(
        quant=args.quant,
        adapter=getattr(args, "adapter", False),
        check=not args.no_check,
        min_agreement=args.min_agreement,
        check_tokens=args.check_tokens,
        check_limit=args.check_limit,
    )


def _cmd_export(args: argparse.Namespace) -> int:
    from affinage.export.run_export import export_run

    report = export_run(args.run, args.format, args.output, _export_options(args))
    print(f"export written to {report['output']} ({', '.join(report['files'].values())}, README.md)")
    return 0


def _cmd_push(args: argparse.Namespace) -> int:
    from affinage.export.push import push_run

    result = push_run(
        args.run,
        args.repo_id,
        what=args.what,
        private=args.private,
        dry_run=args.dry_run,
        options=_export_options(args),
    )
    if args.dry_run:
        print(json.dumps({k: v for k, v in result.items() if k != "card"}, indent=2, ensure_ascii=False))
        print(result.get("card") or "")
    else:
        print(f"pushed {len(result['files'])} files to {result['url']} ({result.get('commit_url', '')})")
    return 0


def _add_device_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="cpu, cuda or cuda:N (default: CUDA when present, else the CPU)")


def _add_check_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--quant", default="q8_0", help="GGUF quantization: f16, q8_0 (default) or q4_0; K-quants need llama-quantize"
    )
    p.add_argument("--no-check", action="store_true", help="write without verifying in llama.cpp / Go")
    p.add_argument(
        "--min-agreement",
        type=float,
        default=0.95,
        help="share of test prompts where llama.cpp must answer exactly like affinage (default 0.95)",
    )
    p.add_argument("--check-tokens", type=int, default=32, help="new tokens generated and compared per test prompt")
    p.add_argument("--check-limit", type=int, default=None, help="verify on the first N test rows only")


def _cmd_compare(args: argparse.Namespace) -> int:
    from affinage.report.compare import gather, sets_table, write_report

    run_dir = Path(args.run)
    output = Path(args.output) if args.output else run_dir / "report.html"
    extra = dict(_named_file(item) for item in args.data)
    report = gather(run_dir, compute_missing_base=not args.no_base, device=args.device, extra_sets=extra)
    html_path, markdown_path = write_report(report, output)
    if report.sets:
        print(sets_table(report))
    print(f"report written to {html_path} (and {markdown_path})")
    return 0


def _named_file(item: str) -> tuple[str, str]:
    """``NAME=FILE`` (or a bare FILE, named after its stem) for ``compare --data``."""
    name, _, path = item.rpartition("=") if "=" in item else ("", "", item)
    return (name or Path(path).stem), str(Path(path).resolve())


def _cmd_data_split(args: argparse.Namespace) -> int:
    from affinage.config import SplitConfig
    from affinage.data.split_cli import split_file

    ratios = _ratios(args.ratios)
    threshold = args.near_duplicate_threshold
    if threshold is None:
        threshold = SplitConfig().near_duplicate_threshold
    report = split_file(Path(args.file), Path(args.out), args.by, ratios, args.seed, threshold)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0


def _ratios(text: str) -> tuple[float, float, float]:
    """--ratios 80/10/10: three non-negative numbers, not all zero."""
    try:
        ratios = tuple(float(part) for part in text.split("/"))
    except ValueError:
        ratios = ()
    if len(ratios) != 3 or any(r < 0 for r in ratios) or sum(ratios) <= 0:
        raise AffinageError(
            f"--ratios {text!r} must be three non-negative numbers", fix="write train/valid/test, e.g. 80/10/10"
        )
    return ratios  # type: ignore[return-value]


def _threshold(value: str) -> float:
    """--near-duplicate-threshold: a similarity in [0.5, 1], or none (exact duplicates only, as 1)."""
    if value.strip().lower() in ("none", "null"):
        return 1.0
    try:
        threshold = float(value)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{value!r} is not a number") from None
    if not 0.5 <= threshold <= 1:
        raise argparse.ArgumentTypeError(f"{value} is not between 0.5 and 1")
    return threshold


def _cmd_data_check(args: argparse.Namespace) -> int:
    from affinage.config import config_from_dict, load_config
    from affinage.data.check import report_text
    from affinage.pipeline import check_data

    target = Path(args.target)
    if target.is_dir():  # a folder with train/valid/test.jsonl, checked against the default model
        from affinage.config import apply_overrides

        config = config_from_dict(
            apply_overrides({"data": {"train": str(target.resolve())}}, args.set),
            source=str(target),
            overrides=args.set,
        )
    else:
        config = load_config(target, args.set)
    report = check_data(config)
    print(json.dumps(report.as_dict(), indent=2, ensure_ascii=False) if args.json else report_text(report))
    return 0 if report.ok else 1


def _cmd_config(args: argparse.Namespace) -> int:
    from affinage.config import describe_fields, load_config

    if args.config:
        config = load_config(args.config, args.set)
        print(json.dumps(config.model_dump(mode="json", exclude={"base_dir"}), indent=2, ensure_ascii=False))
    else:
        print("\n".join(describe_fields()))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="affinage", description="Fine-tune language models with LoRA from one YAML config."
    )
    sub = parser.add_subparsers(dest="command", required=True)

    add_train_command(sub, _add_device_flag)

    p = sub.add_parser("eval", help="evaluate a run on its test split or on --data")
    p.add_argument("run", help="run directory written by `affinage train`")
    p.add_argument("--data", help="JSONL file to evaluate on (default: the run's test split)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    _add_device_flag(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("predict", help="answer a text or every row of a JSONL file")
    p.add_argument("run", help="run directory, or a base model name for the bare model")
    p.add_argument("text", nargs="?", help="the prompt")
    p.add_argument("--file", help="JSONL rows with prompt, instruction (+input) or messages")
    p.add_argument("--json", action="store_true", help="one JSON object per input: {prompt, output}")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--regex", help="constrain every answer to fully match this regular expression")
    p.add_argument("--json-schema", metavar="FILE", help="constrain every answer to JSON valid against this schema")
    _add_device_flag(p)
    p.set_defaults(func=_cmd_predict)

    p = sub.add_parser("merge", help="fold the adapter into the base weights: a standard transformers model directory")
    p.add_argument("run", help="run directory written by `affinage train`")
    p.add_argument("--output", "-o", required=True, help="directory to write")
    p.add_argument(
        "--check",
        metavar="FILE",
        help="rows to compare greedy generations: adapter model vs merged directory (plain transformers)",
    )
    p.add_argument("--max-new-tokens", type=int, default=16, help="generation length for --check")
    p.set_defaults(func=_cmd_merge)

    p = sub.add_parser("export", help="ship a run: gguf, gguf-lora, ollama, peft or merged, verified before written")
    p.add_argument("run", help="run directory written by `affinage train`")
    p.add_argument("--format", "-f", required=True, choices=["gguf", "gguf-lora", "ollama", "peft", "merged"])
    p.add_argument("--output", "-o", required=True, help="directory to write (built in DIR.partial until checked)")
    p.add_argument(
        "--adapter", action="store_true", help="ollama: FROM base.gguf + ADAPTER adapter.gguf (seed 003's form)"
    )
    _add_check_flags(p)
    p.set_defaults(func=_cmd_export)

    p = sub.add_parser("push", help="upload a run to the Hugging Face Hub (HF_ENDPOINT honoured) with its model card")
    p.add_argument("run", help="run directory written by `affinage train`")
    p.add_argument("--repo-id", required=True, help="e.g. you/email-router")
    p.add_argument(
        "--what", default="adapter", choices=["adapter", "merged", "gguf"], help="what to upload (default adapter)"
    )
    p.add_argument("--private", action="store_true")
    p.add_argument("--dry-run", action="store_true", help="list the files and print the card; upload nothing")
    _add_check_flags(p)
    p.set_defaults(func=_cmd_push)

    sub.add_parser(
        "bench",
        help="training speed and memory vs HF PEFT + TRL; `affinage bench inference`: scoring and generation "
        "vs transformers; `affinage bench quality`: time to a held-out accuracy vs PEFT + TRL's recipe "
        "(see --help of each)",
        add_help=False,
    )

    p = sub.add_parser("compare", help="before/after report of a run: HTML (self-contained) and Markdown")
    p.add_argument("run", help="run directory written by `affinage train`")
    p.add_argument("--output", "-o", help="HTML file to write (default RUN/report.html; the .md twin goes beside it)")
    p.add_argument("--no-base", action="store_true", help="do not evaluate the base model when the run skipped it")
    p.add_argument(
        "--data",
        action="append",
        default=[],
        metavar="NAME=FILE",
        help="also evaluate this file, base vs fine-tuned (added to the config's eval.sets; repeatable)",
    )
    _add_device_flag(p)
    p.set_defaults(func=_cmd_compare)

    data = sub.add_parser("data", help="data tools").add_subparsers(dest="data_command", required=True)
    p = data.add_parser(
        "split", help="write train/valid/test.jsonl: shuffled, stratified by label, duplicates kept together"
    )
    p.add_argument("file", help="JSONL/JSON file")
    p.add_argument("--out", required=True, help="directory for train.jsonl, valid.jsonl, test.jsonl")
    p.add_argument("--by", help="field to stratify by (default: completion, output or label)")
    p.add_argument("--ratios", default="80/10/10", help="train/valid/test proportions")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument(
        "--near-duplicate-threshold",
        type=_threshold,
        default=None,
        metavar="T",
        help="rows at least this similar (0.5 to 1) stay in one split; 1 or none: exact duplicates only "
        "(default: data.split.near_duplicate_threshold's, see `affinage config`)",
    )
    p.set_defaults(func=_cmd_data_split)

    p = data.add_parser(
        "check", help="check the data before training: counts, leakage, lengths, loss mask, EOS, rendering"
    )
    p.add_argument("target", help="YAML config, or a folder with train/valid/test.jsonl")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="override a config key")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=_cmd_data_check)

    p = sub.add_parser("config", help="list every config key with its default, or print a resolved config")
    p.add_argument("config", nargs="?", help="YAML config to validate and print")
    p.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    p.set_defaults(func=_cmd_config)
    return parser


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:  # its own parser: the benchmark script's flags
        from affinage.bench import main as bench_main

        return bench_main(argv[1:])
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except AffinageError as error:
        print(f"affinage: error: {error}", file=sys.stderr)
        return getattr(error, "exit_code", 2)  # a stopped training run: 128 + signal, or 1


if __name__ == "__main__":
    sys.exit(main())
