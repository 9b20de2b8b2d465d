"""Render an Ollama TEMPLATE with Go's text/template, exactly as Ollama does.

A Modelfile's TEMPLATE is Go, not Jinja: the only trustworthy check that it reproduces the
training prompt is to execute it with Go. ``gotmpl/render.go`` mirrors Ollama's
``template.Execute`` (message collation, ``missingkey=zero``, the ``json`` function); it is
compiled once per source version into affinage's cache.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import tempfile
from importlib import resources
from pathlib import Path

from affinage.cache import cache_dir
from affinage.errors import AffinageError

INSTALL_FIX = "install Go (`apt-get install golang-go`, or https://go.dev/dl), or skip the check with --no-check"


def go_available() -> bool:
    """Whether a ``go`` toolchain is on PATH."""
    return shutil.which("go") is not None


def _source() -> bytes:
    return resources.files("affinage.export").joinpath("gotmpl/render.go").read_bytes()


def _go_env(root: Path) -> dict[str, str]:
    """A build environment that writes only under ``root`` and never downloads a toolchain."""
    env = dict(os.environ)
    env.update(GOCACHE=str(root / "gocache"), GOPATH=str(root / "gopath"), GOTOOLCHAIN="local", GOFLAGS="")
    env.setdefault("HOME", str(root))  # go refuses to start without a home for its config
    return env


def renderer_binary() -> Path:
    """The compiled renderer, built on first use (keyed by the Go source's hash)."""
    go = shutil.which("go")
    if go is None:
        raise AffinageError(
            "checking the Ollama template needs Go (Ollama renders prompts with Go's text/template)", fix=INSTALL_FIX
        )
    source = _source()
    root = cache_dir() / "go"
    binary = root / f"render-{hashlib.sha256(source).hexdigest()[:16]}"
    if binary.is_file():
        return binary
    root.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=root, prefix=".build.") as tmp:
        (Path(tmp) / "render.go").write_bytes(source)
        built = Path(tmp) / "render"
        result = subprocess.run(
            [go, "build", "-o", str(built), "render.go"], cwd=tmp, env=_go_env(root), capture_output=True, text=True
        )
        if result.returncode != 0:
            raise AffinageError(
                f"building the Go template renderer failed:\n{result.stderr.strip()}",
                fix="check `go version` (Go 1.18 or later is needed), or skip the check with --no-check",
            )
        os.replace(built, binary)  # atomic: a concurrent build leaves one complete binary
    return binary


def render_with_go(template: str, conversations: list[list[dict]]) -> list[str]:
    """Each conversation rendered by ``template`` the way Ollama renders a chat request."""
    cases = [
        {"messages": [{"role": m["role"], "content": m["content"]} for m in messages]} for messages in conversations
    ]
    request = json.dumps({"template": template, "cases": cases})
    result = subprocess.run([str(renderer_binary())], input=request, capture_output=True, text=True, encoding="utf-8")
    if result.returncode != 0:
        raise AffinageError(f"the Go template renderer failed: {result.stderr.strip()}")
    response = json.loads(result.stdout)
    if response.get("error"):
        raise AffinageError(
            f"Ollama would reject this TEMPLATE: {response['error']}",
            fix="report this as an affinage bug, or write the TEMPLATE by hand",
        )
    for index, error in enumerate(response["errors"]):
        if error:
            raise AffinageError(f"Ollama's template execution fails on conversation {index}: {error}")
    return list(response["outputs"])
