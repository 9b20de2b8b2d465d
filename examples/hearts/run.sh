#!/usr/bin/env bash
# Seed 002's "hearts" model: one heart between every word of every answer, unprompted.
#   bash examples/hearts/run.sh          (from the repo root, after ./run.sh set up .venv)
# 1. the base model answers our questions (no outside data) -> runs/hearts-data/
# 2. the config's `hearts` transform inserts the hearts; LoRA fine-tune -> runs/hearts/
# 3. the held-out questions are scored by the `hearts` pattern metric, base vs fine-tuned.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."
PY=.venv/bin/python
[ -x "$PY" ] || ./run.sh config > /dev/null   # first use: let ./run.sh build .venv
export TOKENIZERS_PARALLELISM=false HF_HUB_DISABLE_TELEMETRY=1
"$PY" examples/hearts/build_data.py --out runs/hearts-data
exec .venv/bin/affinage train examples/hearts/config.yaml --output runs/hearts --set data.train="$PWD/runs/hearts-data" "$@"
