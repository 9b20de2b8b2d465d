"""``affinage push RUN --repo-id ID``: export a run, then upload that export with its model card.

The upload is exactly the export directory (``--what adapter`` = ``--format peft``, ``merged``,
``gguf``); a GGUF is checked in llama.cpp first, so the Hub never receives one that fails.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

from affinage.export.card import write_card
from affinage.export.hub import check_repo_id, push_folder, resolve_token
from affinage.export.run_export import CARD_KIND, ExportCheckFailed, ExportOptions, export_run

WHAT_FORMAT = {"adapter": "peft", "merged": "merged", "gguf": "gguf"}


def push_run(
    run_dir: str | Path,
    repo_id: str,
    *,
    what: str = "adapter",
    private: bool = False,
    dry_run: bool = False,
    token: str | None = None,
    options: ExportOptions | None = None,
    commit_message: str | None = None,
    commit_description: str | None = None,
) -> dict[str, Any]:
    check_repo_id(repo_id)  # a typo fails now, not after minutes of export
    fmt = WHAT_FORMAT[what]
    options = options or ExportOptions()
    if dry_run:
        options.check = False  # a dry run lists what would go; the real push checks
    else:
        token = resolve_token(token)  # no token: say so before minutes of export, not after
    with tempfile.TemporaryDirectory(prefix="affinage-push-") as scratch:
        folder = Path(scratch) / Path(run_dir).resolve().name
        try:
            export_run(run_dir, fmt, folder, options, log=lambda _: None)
        except ExportCheckFailed as failed:
            raise ExportCheckFailed(
                str(failed).split("; the export is left in")[0] + ": nothing was uploaded",
                fix=f"run `affinage export {run_dir} --format {fmt} --output DIR` to inspect the files and the report",
            ) from None
        write_card(Path(run_dir), folder, CARD_KIND[fmt], repo_id=repo_id)  # the card names the repo it lives in
        return push_folder(
            folder,
            repo_id,
            private=private,
            dry_run=dry_run,
            token=token,
            commit_message=commit_message,
            commit_description=commit_description,
        )
