#!/usr/bin/env bash
# The whole suite on one CUDA GPU (bf16, Qwen2.5-1.5B shapes, random init — no download). Measured on an H200: prefill
# 58 s, batch-1 decode 258 s, and the rest did not fit a 7-minute slot — with less time, pass --only prefill,decode.
# Extra arguments pass through and win, e.g. for a check on CPU:  bench/gpu.sh --device cpu --quick --model tiny
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-.venv/bin/python}"
[ -x "$PY" ] || PY=python3
exec "$PY" -m bench.run --device cuda --model qwen2.5-1.5b "$@"
