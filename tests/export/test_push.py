"""Pushing to the Hub, end to end against a local stand-in for the Hub's HTTP API, and the model card."""

from __future__ import annotations

import base64
import json
import shutil
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import torch
import yaml
from huggingface_hub import ModelCard, constants

from affinage.cli import main
from affinage.config import TrainerConfig
from affinage.data.formats import Example
from affinage.data.template import encode_example
from affinage.errors import AffinageError
from affinage.export.card import model_card, write_card
from affinage.export.hub import push_folder
from affinage.lora import inject_lora
from affinage.models import EMBEDDED_MODELS, base_model_hub_id
from affinage.training import train
from tests.conftest import EMAILS, tiny_llama, trained_router

TOKEN = "hf_affinage_test_token"


class FakeHub:
    """Just enough of the Hub API for create_repo + upload_folder: records every request and the commits."""

    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.commits: list[dict[str, Any]] = []
        self.fail: dict[str, int] = {}  # path fragment -> HTTP status to answer
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def _handler(self) -> type[BaseHTTPRequestHandler]:
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                hub.answer(self, b"")

            def do_POST(self) -> None:
                hub.answer(self, read_body(self))

            def log_message(self, *args: Any) -> None:
                pass

        return Handler

    def answer(self, request: BaseHTTPRequestHandler, body: bytes) -> None:
        path = request.path.split("?")[0]
        self.requests.append(
            {
                "method": request.command,
                "path": path,
                "body": body,
                "headers": {key.lower(): value for key, value in request.headers.items()},
            }
        )
        failing = next((status for fragment, status in self.fail.items() if fragment in path), None)
        if failing:
            status, reply = failing, {"error": "refused by the test"}
        else:
            status, reply = self.route(request.command, path, body)
        data = json.dumps(reply).encode()
        request.send_response(status)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(data)))
        request.end_headers()
        request.wfile.write(data)

    def route(self, method: str, path: str, body: bytes) -> tuple[int, dict[str, Any]]:
        if method == "POST" and path == "/api/repos/create":
            payload = json.loads(body)
            return 200, {"url": f"{self.url}/{payload['organization']}/{payload['name']}"}
        if method == "POST" and path == "/api/validate-yaml":
            return 200, {"errors": [], "warnings": []}
        if method == "POST" and path.startswith("/api/models/") and "/preupload/" in path:
            files = json.loads(body)["files"]
            return 200, {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False} for f in files]}
        if method == "POST" and path.startswith("/api/models/") and "/commit/" in path:
            return 200, self.commit(path, body)
        return 404, {"error": f"no route {method} {path}"}

    def commit(self, path: str, body: bytes) -> dict[str, Any]:
        lines = [json.loads(line) for line in body.decode().splitlines() if line.strip()]
        header = next(line["value"] for line in lines if line["key"] == "header")
        files = {
            line["value"]["path"]: base64.b64decode(line["value"]["content"]) for line in lines if line["key"] == "file"
        }
        repo = path.removeprefix("/api/models/").split("/commit/")[0]
        self.commits.append({"repo": repo, "header": header, "files": files})
        oid = f"{len(self.commits):040x}"
        return {"commitUrl": f"{self.url}/{repo}/commit/{oid}", "commitOid": oid}


def read_body(request: BaseHTTPRequestHandler) -> bytes:
    if "chunked" in request.headers.get("Transfer-Encoding", ""):
        chunks = []
        while (size := int(request.rfile.readline().strip(), 16)) > 0:
            chunks.append(request.rfile.read(size))
            request.rfile.readline()
        request.rfile.readline()
        return b"".join(chunks)
    return request.rfile.read(int(request.headers.get("Content-Length") or 0))


@pytest.fixture
def hub(monkeypatch):
    fake = FakeHub()
    fake.thread.start()
    monkeypatch.setenv("HF_ENDPOINT", fake.url)  # read at call time by push_folder
    monkeypatch.setattr(constants, "ENDPOINT", fake.url)  # and what huggingface_hub read at import
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # conftest keeps the other tests offline
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    yield fake
    fake.server.shutdown()
    fake.server.server_close()


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, model_dir) -> Path:
    """A tiny trained run (with base vs fine-tuned metrics) shared by the tests of this file."""
    root = tmp_path_factory.mktemp("push")
    return trained_router(root, model_dir, trainer={"max_steps": 4, "eval_every": 2})


@pytest.fixture
def export_dir(run_dir, tmp_path) -> Path:
    folder = tmp_path / "export"
    shutil.copytree(run_dir / "adapter", folder)
    write_card(run_dir, folder, "adapter", repo_id="someone/tiny-router")
    return folder


def test_push_uploads_the_adapter_and_its_card(hub, run_dir, export_dir):
    result = push_folder(export_dir, "someone/tiny-router", commit_message="first push")

    assert result["repo_id"] == "someone/tiny-router" and result["commit_url"].startswith(hub.url)
    assert {f["path"] for f in result["files"]} == {"README.md", "adapter_config.json", "adapter_model.safetensors"}
    (commit,) = hub.commits
    assert commit["repo"] == "someone/tiny-router" and commit["header"]["summary"] == "first push"
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md"):
        assert commit["files"][name] == (export_dir / name).read_bytes()
    api_calls = [r for r in hub.requests if r["path"] != "/api/agent-harnesses"]  # huggingface_hub's own telemetry
    assert api_calls and all(r["headers"].get("authorization") == f"Bearer {TOKEN}" for r in api_calls)
    assert {r["path"] for r in hub.requests} >= {"/api/repos/create", "/api/models/someone/tiny-router/commit/main"}

    pushed = export_dir.parent / "pushed.md"
    pushed.write_bytes(commit["files"]["README.md"])
    metadata = ModelCard.load(pushed).data.to_dict()
    config = json.loads(commit["files"]["adapter_config.json"])
    assert config["base_model_name_or_path"] == str(yaml.safe_load((run_dir / "config.yaml").read_text())["base_model"])
    assert "base_model" not in metadata  # a local base: the Hub only accepts Hub ids there
    assert metadata["library_name"] == "peft" and {"affinage", "lora", "classification"} <= set(metadata["tags"])
    _check_eval_results(metadata, json.loads((run_dir / "summary.json").read_text()))


def _check_eval_results(metadata: dict, summary: dict) -> None:
    (entry,) = metadata["model-index"]
    metrics = {m["name"]: m["value"] for result in entry["results"] for m in result["metrics"]}
    assert metrics["accuracy (base model, before fine-tuning)"] == summary["base_test"]["accuracy"]
    assert metrics["accuracy (fine-tuned)"] == summary["fine_tuned_test"]["accuracy"]
    assert metrics["test loss (fine-tuned)"] == summary["fine_tuned_test"]["loss"]


def test_card_names_an_embedded_base_by_hub_id_and_reads_everything_from_the_run(run_dir, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    config = yaml.safe_load((run / "config.yaml").read_text())
    (run / "config.yaml").write_text(yaml.safe_dump({**config, "base_model": "smollm2-135m-instruct"}))
    (run / "summary.json").unlink()
    card = model_card(run, "gguf", repo_id="someone/tiny-router-gguf", gguf_file="tiny.gguf")
    path = tmp_path / "README.md"
    path.write_text(str(card))
    metadata = ModelCard.load(path).data.to_dict()
    assert metadata["base_model"] == "HuggingFaceTB/SmolLM2-135M-Instruct" and metadata["library_name"] == "gguf"
    assert "gguf" in metadata["tags"] and "model-index" not in metadata  # no summary.json: no results claimed
    text = card.text
    assert "llama-cli -m tiny.gguf" in text and "ollama create tiny-router-gguf -f Modelfile" in text
    rows = {
        split: len((run / "data" / f"{split}.jsonl").read_text().splitlines()) for split in ("train", "valid", "test")
    }
    assert all(f"| {split} | {n} |" in text for split, n in rows.items())
    assert "| RH |" in text and "```yaml\n" in text and "smollm2-135m-instruct" in text


def test_missing_token_is_a_clear_error_and_nothing_is_sent(hub, export_dir, monkeypatch, tmp_path):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token"))
    with pytest.raises(AffinageError, match="no Hugging Face token") as error:
        push_folder(export_dir, "someone/tiny-router")
    assert "hf auth login" in str(error.value) and "HF_TOKEN" in str(error.value)
    assert hub.requests == []


def test_dry_run_lists_the_files_and_the_card_without_any_request(hub, export_dir):
    result = push_folder(export_dir, "someone/tiny-router", dry_run=True)
    sizes = {f["path"]: f["size"] for f in result["files"]}
    assert sizes["adapter_model.safetensors"] == (export_dir / "adapter_model.safetensors").stat().st_size
    assert result["card"] == (export_dir / "README.md").read_text() and result["dry_run"] is True
    assert hub.requests == []


@pytest.mark.parametrize(
    "fragment, said", [("/api/repos/create", "nothing was uploaded"), ("/commit/", "files were not committed")]
)
def test_http_failures_say_what_failed_and_what_was_uploaded(hub, export_dir, fragment, said):
    hub.fail[fragment] = 403
    with pytest.raises(AffinageError, match="HTTP 403") as error:
        push_folder(export_dir, "someone/tiny-router")
    assert said in str(error.value) and hub.commits == []


def test_embedded_aliases_resolve_to_hub_ids_and_adapters_name_them(tokenizer, tmp_path):
    assert base_model_hub_id("smollm2-135m-instruct") == EMBEDDED_MODELS["smollm2-135m-instruct"]["hub_id"]
    assert base_model_hub_id("SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert base_model_hub_id("gemma3-270m") == "google/gemma-3-270m"
    assert base_model_hub_id("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B" and base_model_hub_id("./m") == "./m"
    model = tiny_llama(len(tokenizer))
    torch.manual_seed(0)
    inject_lora(model, "all-linear", r=2, alpha=4, dropout=0.0)
    data = [
        encode_example(tokenizer, Example(prompt=text, completion=label), 64)
        for label, texts in EMAILS.items()
        for text in texts
    ]
    train(
        model,
        data,
        [],
        TrainerConfig(max_steps=1, batch_size=4),
        pad_id=tokenizer.pad_token_id,
        run_dir=tmp_path,
        base_model_name="gemma3-270m",
        progress=False,
    )
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "google/gemma-3-270m"


def test_cli_push_uploads_a_checked_gguf_with_its_card(hub, run_dir, capsys):

    assert main(["push", str(run_dir), "--repo-id", "someone/router-gguf", "--what", "gguf", "--quant", "f16"]) == 0
    (commit,) = hub.commits
    assert {"model.gguf", "README.md", "affinage_export.json"} <= set(commit["files"])
    report = json.loads(commit["files"]["affinage_export.json"])
    assert report["checks"]["llama.cpp"]["agreement"] >= 0.95  # the Hub only gets a verified file
    card = commit["files"]["README.md"].decode()
    assert "hf download someone/router-gguf model.gguf" in card and "USER/REPO" not in card
    assert "pushed 3 files" in capsys.readouterr().out


def test_cli_push_dry_run_prints_the_card_and_sends_nothing(hub, run_dir, capsys, monkeypatch):

    monkeypatch.delenv("HF_TOKEN")  # a dry run needs no token
    monkeypatch.setattr("affinage.export.hub.get_token", lambda: None)
    assert main(["push", str(run_dir), "--repo-id", "someone/router", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert '"adapter_model.safetensors"' in out and "library_name: peft" in out
    assert hub.requests == []


def test_cli_push_without_a_token_fails_before_exporting(hub, run_dir, capsys, monkeypatch):
    from affinage.export import push

    monkeypatch.delenv("HF_TOKEN")
    monkeypatch.setattr("affinage.export.hub.get_token", lambda: None)  # no login cache either
    monkeypatch.setattr(push, "export_run", lambda *args, **kwargs: pytest.fail("exported without a token"))
    assert main(["push", str(run_dir), "--repo-id", "someone/router"]) == 2
    assert "no Hugging Face token" in capsys.readouterr().err and hub.requests == []
