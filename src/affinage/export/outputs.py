"""Where an export or a merge may write: never over a directory affinage did not write, never over the run."""

from __future__ import annotations

from pathlib import Path

from affinage.errors import AffinageError


def guard_output(output: Path, marker: str, run_dir: Path) -> None:
    """Refuse ``output`` when it is (or holds, or lies inside) the run, a file, or a directory without ``marker``.

    The directory is replaced once the new output is complete, so it must be one affinage wrote
    before (``marker`` is its report file) or empty.
    """
    output, run = Path(output).resolve(), Path(run_dir).resolve()
    if output == run or run in output.parents or output in run.parents:
        raise AffinageError(
            f"the output {output} would overlap the run {run}", fix="choose an --output outside the run"
        )
    if output.exists() and not output.is_dir():
        raise AffinageError(f"the output {output} is a file", fix="choose a directory for --output")
    if output.is_dir() and any(output.iterdir()) and not (output / marker).is_file():
        raise AffinageError(
            f"{output} exists and was not written by affinage: it is never overwritten",
            fix="choose another --output, or empty that directory",
        )
