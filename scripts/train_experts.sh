#!/usr/bin/env bash
# Train the seven medical-suite LoRA experts one after another on the embedded SmolLM2-135M.
# Usage: scripts/train_experts.sh [suite_dir] [out_dir]   (settings via STEPS, BATCH, LR, THREADS, FORCE)
# Finished experts are skipped and interrupted ones resume from <out>/<name>.checkpoints.
# Sized for 2 CPU cores shared with other jobs: one torch thread (oversubscribed OpenMP threads
# slow every job ~10x): 5-9 s per batch-4 step of ~170-token rows, 30 steps ≈ 3-5 min per expert.
set -uo pipefail
cd "$(dirname "$0")/.."
SUITE=${1:-runs/suite}
OUT=${2:-assets/experts}
STEPS=${STEPS:-30}
BATCH=${BATCH:-4}
LR=${LR:-1.5e-3}
PY=${PY:-.venv/bin/python}
export OMP_NUM_THREADS=${THREADS:-1} MKL_NUM_THREADS=${THREADS:-1}

if [ ! -f "$SUITE/router_train.jsonl" ]; then
  "$PY" -c "from atmoe.medical import write_suite; write_suite('$SUITE', seed=0)"
fi

failed=0
for pair in summarize:task extract_meds:task triage:task drug_classes:knowledge \
            lab_interpretation:knowledge plain_language:style bullet_points:style; do
  name=${pair%%:*}; group=${pair##*:}
  if [ -f "$OUT/$name/adapter_model.safetensors" ] && [ -z "${FORCE:-}" ]; then
    echo "=== $(date -Is) $name already trained in $OUT/$name (set FORCE=1 to retrain)"; continue
  fi
  echo "=== $(date -Is) training $name ($group): steps=$STEPS batch=$BATCH lr=$LR"
  if ! "$PY" -m atmoe.train_expert --name "$name" --group "$group" --data "$SUITE/experts/$name.jsonl" \
        --out "$OUT/$name" --steps "$STEPS" --batch-size "$BATCH" --lr "$LR" --logging-steps 5 \
        --save-steps 20 --resume; then
    echo "=== $(date -Is) FAILED $name"; failed=$((failed + 1))
  fi
done
echo "=== $(date -Is) done, $failed failed"
exit "$failed"
