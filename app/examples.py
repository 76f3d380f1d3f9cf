"""Example prompts: complex instructions with clinical notes, from the held-out set when it is shipped, else from
the seeded generator in `atmoe.medical` (same seed, same examples)."""

from __future__ import annotations

import json
from functools import lru_cache
from pathlib import Path

import pandas as pd

EVAL_PATH = Path("assets/data/eval.jsonl")


@lru_cache(maxsize=4)
def heldout_rows(n: int = 180) -> tuple[pd.DataFrame, str]:
    """(table with instruction, input, category, experts) and where it came from."""
    if EVAL_PATH.is_file():
        rows = [json.loads(line) for line in EVAL_PATH.read_text(encoding="utf-8").splitlines() if line.strip()]
        source = str(EVAL_PATH)
    else:
        from atmoe.medical import complex_rows

        rows = complex_rows(n, seed=0, heldout=True)
        source = "atmoe.medical held-out generator (seed 0)"
    df = pd.DataFrame([{"instruction": r.get("instruction", ""), "input": r.get("input", ""),
                        "category": "+".join(r.get("experts") or []) or "—"} for r in rows[:n]])
    return df, source


def examples(k: int = 5) -> list[dict[str, str]]:
    """`k` examples covering different task/knowledge/style combinations."""
    df, _ = heldout_rows()
    picked = df.drop_duplicates("category").head(k)
    return [{"label": r.category.replace("+", " + "), "instruction": r.instruction, "input": r.input}
            for r in picked.itertuples()]
