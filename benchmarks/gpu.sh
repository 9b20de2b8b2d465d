#!/usr/bin/env bash
# The CUDA check and benchmark (issue 17), as one call on a GPU machine with no network.
#
# Run from a folder that holds this checkout's src/, benchmarks/, tests/, examples/ and
# pyproject.toml, plus whl/ (wheels of what the machine lacks: trl, datasets, ..., see
# docs/performance.md) and tok/ (SmolLM2-135M's tokenizer files). Models are random weights of
# real shapes (benchmarks/random_model.py): the weights cannot travel, and speed and memory
# depend only on the shapes. Everything lands in $OUT/log.txt; each part has a time limit and
# the whole script a deadline (DEADLINE seconds), so it ends whatever happens. On an H200 each
# side's process took ~20 s to start (imports, CUDA, TRL's set-up): a cell of 5 sides is ~100 s
# and the whole script ~12 min; with DEADLINE=470 the last parts are skipped.
#
#   OUT=/tmp/out DEADLINE=450 bash benchmarks/gpu.sh
#   DEVICE=cpu QUICK=1 OUT=/tmp/dry bash benchmarks/gpu.sh      # a dry run of the script's logic on a CPU
set -u
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu-out}
DEADLINE=${DEADLINE:-450}
mkdir -p "$OUT"
LOG=$OUT/log.txt
DEVICE=${DEVICE:-cuda}
if [ -n "${QUICK:-}" ]; then # tiny model, tiny cells: the script's logic only
    Q=--quick SHORT=64x2 LONG=96x1 MID=80x1 BIG=/tmp/smollm2-135m EMAIL_BATCH=4
else
    Q= SHORT=512x32,2048x8,8192x2 LONG=16384x1 MID=4096x1 BIG=/tmp/llama-1b EMAIL_BATCH=32
fi
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false AFFINAGE_CACHE=/tmp/affinage-cache

step() { echo "=== $* (at ${SECONDS}s)" | tee -a "$LOG"; }
part() { # part LIMIT COMMAND...: runs within LIMIT seconds and the deadline, output to the log
    local limit=$1 left=$((DEADLINE - SECONDS))
    shift
    if [ "$left" -lt 20 ]; then
        echo "skipped, ${left}s left: $*" | tee -a "$LOG"
        return
    fi
    [ "$limit" -gt "$left" ] && limit=$left
    timeout -k 5 "$limit" "$@" 2>&1 | grep --line-buffered -v "gemm_4bit_forward" | tee -a "$LOG"
    echo "--- exit ${PIPESTATUS[0]} (at ${SECONDS}s)" | tee -a "$LOG"
}

step environment
part 20 nvidia-smi
if ls whl/*.whl >/dev/null 2>&1; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site whl/*.whl \
        2>&1 | tail -3 | tee -a "$LOG"
fi
export PYTHONPATH=$PWD/src:/tmp/site
part 30 python3 -c "
import sys, torch, transformers, peft, trl, datasets, accelerate
print('python', sys.version.split()[0], '| torch', torch.__version__, 'cuda', torch.version.cuda,
      '| transformers', transformers.__version__, '| peft', peft.__version__, '| trl', trl.__version__,
      '| datasets', datasets.__version__, '| accelerate', accelerate.__version__)
print(torch.cuda.get_device_name(0), torch.cuda.get_device_properties(0).total_memory // 2**20, 'MiB')
try:
    import liger_kernel, triton; print('liger-kernel importable, triton', triton.__version__)
except Exception as e: print('liger-kernel: not importable:', e)
"

step "tests that touch the CUDA paths"
part 90 python3 -m pytest -q -p no:cacheprovider -m "not integration" tests/test_runtime.py tests/test_cuda.py \
    tests/test_bench.py

step "random-weight models of real shapes"
part 30 python3 benchmarks/random_model.py --preset smollm2-135m --tokenizer tok --out /tmp/smollm2-135m --device "$DEVICE"
[ -z "$Q" ] && part 40 python3 benchmarks/random_model.py --preset llama-1b --tokenizer tok --out /tmp/llama-1b --device cuda

step "quick bench on CUDA (the tiny model): affinage and, where Liger is installed, trl-liger"
part 50 python3 -m affinage.bench --quick --model /tmp/smollm2-135m --steps 3 --seq-len 96 --side-timeout 40 \
    --device "$DEVICE" --sides affinage,trl-liger
SIDES=affinage,trl-speed,trl-liger,trl-memory,peft-loop
if ! grep -q "fastest peer (trl-liger)" "$LOG"; then # it ran, and its table names trl-liger
    SIDES=affinage,trl-speed,trl-memory,peft-loop
fi
echo "sides: $SIDES" | tee -a "$LOG"

step "SmolLM2-135M shape, bf16: 16k tokens per step at 512, 2048 and 8192 tokens per row"
part 330 python3 benchmarks/scaling.py --cells "$SHORT" --steps 6 --warmup-steps 2 \
    --model /tmp/smollm2-135m --device "$DEVICE" $Q --sides "$SIDES" --side-timeout 60

step "1B Llama shape, bf16: one row of 16384 tokens (does each side hold it, and at what peak)"
part 130 python3 benchmarks/scaling.py --cells "$LONG" --steps 3 --warmup-steps 1 \
    --model "$BIG" --device "$DEVICE" $Q --sides "$SIDES" --side-timeout 60

step "SmolLM2-135M shape, bf16: the email-router emails (short rows), batch 32"
part 130 python3 -m affinage.bench --model /tmp/smollm2-135m --batch-size "$EMAIL_BATCH" --steps 8 --warmup-steps 2 \
    --device "$DEVICE" $Q --sides "$SIDES" --side-timeout 45 --json

step "1B Llama shape: affinage with activation checkpointing at 16384 tokens, then every side at 4096"
part 45 python3 benchmarks/scaling.py --cells "$LONG" --steps 3 --warmup-steps 1 --model "$BIG" \
    --device "$DEVICE" $Q --sides affinage --affinage-checkpointing true --side-timeout 40
part 100 python3 benchmarks/scaling.py --cells "$MID" --steps 3 --warmup-steps 1 \
    --model "$BIG" --device "$DEVICE" $Q --sides "$SIDES" --side-timeout 40
step done
