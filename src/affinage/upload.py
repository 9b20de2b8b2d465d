"""``python -m affinage.upload hf_hub --repo_id ID --model_path DIR``: Ludwig's upload command, on affinage.

Seed 000 ends with ``python -m ludwig.upload hf_hub --repo_id ... --model_path results/api_experiment_run_2``;
the same line with ``affinage`` pushes that run's adapter and model card (``affinage push``, the
Hub's ``HF_ENDPOINT`` and ``HF_TOKEN`` honoured). Ludwig's flags and short forms are kept
(``ludwig/upload.py``); ``--what`` and ``--dry-run`` are affinage's.
"""

from __future__ import annotations

import argparse
import json
import sys

from affinage.errors import AffinageError


def _boolean(value: str) -> bool:
    if value.lower() in ("true", "1", "yes"):
        return True
    if value.lower() in ("false", "0", "no"):
        return False
    raise argparse.ArgumentTypeError(f"{value!r} is not True or False")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m affinage.upload",
        description="Push a trained run (its adapter and model card) to the Hugging Face Hub, as `ludwig upload`.",
    )
    parser.add_argument("service", choices=["hf_hub"], help="the model repository service (hf_hub)")
    parser.add_argument("-r", "--repo_id", required=True, help="username/repo_name, created if it does not exist")
    parser.add_argument(
        "-m", "--model_path", required=True, help="the run: train()'s folder (results/api_experiment_run) or save()'s"
    )
    parser.add_argument(
        "-p", "--private", nargs="?", const=True, default=False, type=_boolean, help="make the repo private"
    )
    parser.add_argument("-t", "--repo_type", default="model", choices=["model", "space", "dataset"])
    parser.add_argument("-c", "--commit_message", default=None, help="the commit's title")
    parser.add_argument("-d", "--commit_description", default=None, help="the commit's description")
    parser.add_argument(
        "-l",
        "--logging_level",
        default="info",
        choices=["critical", "error", "warning", "info", "debug", "notset"],
        help="info and below print what was pushed",
    )
    parser.add_argument(
        "-df", "--dataset_file", default=None, help="accepted as Ludwig accepts it: its hf_hub upload ignores it too"
    )
    parser.add_argument(
        "-dn", "--dataset_name", default=None, help="accepted as Ludwig accepts it: its hf_hub upload ignores it too"
    )
    parser.add_argument(
        "--what", default="adapter", choices=["adapter", "merged", "gguf"], help="what to upload (default adapter)"
    )
    parser.add_argument("--dry-run", action="store_true", help="list the files and print the card; upload nothing")
    return parser


def main(argv: list[str] | None = None) -> int:
    from affinage.ludwig_api import upload_run

    args = build_parser().parse_args(argv)
    try:
        result = upload_run(
            args.repo_id,
            args.model_path,
            repo_type=args.repo_type,
            private=args.private,
            commit_message=args.commit_message,
            commit_description=args.commit_description,
            what=args.what,
            dry_run=args.dry_run,
            names={"repo_type": "--repo_type", "model_path": "--model_path"},
        )
    except AffinageError as error:
        print(f"affinage.upload: error: {error}", file=sys.stderr)
        return getattr(error, "exit_code", 2)
    if args.dry_run:
        print(json.dumps({k: v for k, v in result.items() if k != "card"}, indent=2, ensure_ascii=False))
        print(result.get("card") or "")
    elif args.logging_level in ("info", "debug", "notset"):
        print(f"pushed {len(result['files'])} files to {result['url']} ({result.get('commit_url', '')})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
