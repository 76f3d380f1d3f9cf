#!/usr/bin/env bash
# Issue 21's GPU check, from the repo alone on a fresh CUDA machine: no downloads, about 5 minutes at most.
# Random-init Qwen2.5-1.5B shape, bf16, 7 rank-8 experts on all 7 projections in 3 groups.
#   1. eager (≤ EAGER_S s): launches per layer (ops and syncs, slope method); prefill B1×512 and B8×1024; decode B1 and
#      B8 per token — AT-MoE (default fused path; merge=True at B1) against the pristine base, PEFT one adapter, PEFT
#      add_weighted_adapter(cat) and X-LoRA; → bench/results/$NAME.json
#   2. torch.compile (≤ COMPILE_S s): base and AT-MoE compiled — the decode step with mode="reduce-overhead" (CUDA
#      graphs) first, decode B1; then the prefill in the default mode, B1×512 → bench/results/$NAME-compile.json
# Every section's results are written as soon as it ends, so a phase cut by its time limit keeps what it measured
# (its JSON says "partial": true). Extra arguments pass through to both phases and win, e.g. a CPU check of the script:
#   bench/gpu.sh --device cpu --model tiny --dtype float32 --prefill-shapes 1x16 --decode-batches 1 --new-tokens 3
set -uo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
EAGER_S="${EAGER_S:-150}"
COMPILE_S="${COMPILE_S:-135}"
NAME="${NAME:-qwen2.5-1.5b-cuda}"
export TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1
status=0
timeout --signal=TERM --kill-after=10 "$EAGER_S" "$PY" -m bench.run --device cuda --model qwen2.5-1.5b \
    --only flops,launches,prefill,decode --prefill-shapes 1x512,8x1024 --decode-batches 1,8 --decode-prompt 128 \
    --new-tokens 32 --xlora-new-tokens 8 --warmup 1 --repeats 3 --peers peft_one,peft_cat,xlora \
    --name "$NAME" "$@" || status=$?
timeout --signal=TERM --kill-after=10 "$COMPILE_S" "$PY" -m bench.run --device cuda --model qwen2.5-1.5b \
    --only decode,prefill --prefill-shapes 1x512 --decode-batches 1 --decode-prompt 128 --new-tokens 32 \
    --warmup 1 --repeats 3 --peers none --compile reduce-overhead --name "$NAME-compile" "$@" || status=$?
exit "$status"
