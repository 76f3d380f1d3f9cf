#!/usr/bin/env bash
# The whole suite on one CUDA GPU (bf16, Qwen2.5-1.5B shapes, random init — no download). Sized for < 8 minutes on
# an H100 (the brief's budget); not yet timed on one — no GPU has been lent to this project so far.
# Extra arguments pass through and win, e.g. for a check on CPU:  bench/gpu.sh --device cpu --quick --model tiny
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
exec "$PY" -m bench.run --device cuda --model qwen2.5-1.5b "$@"
