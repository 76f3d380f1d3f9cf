"""Example prompts: complex instructions with clinical notes, from the held-out split when it is shipped
(`assets/data/eval.jsonl`), else from the seeded generator `demo.suite` (same seed, same examples); plus one
off-topic question (no expert needed) when `assets/data/off_topic.jsonl` is shipped."""

from __future__ import annotations

import json
from collections import Counter
from functools import lru_cache
from pathlib import Path
from typing import Any

import pandas as pd

EVAL_PATH = Path("assets/data/eval.jsonl")
OFF_TOPIC_PATH = Path("assets/data/off_topic.jsonl")


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


@lru_cache(maxsize=4)
def heldout_rows(n: int = 180) -> tuple[pd.DataFrame, str]:
    """(table with instruction, input, category, experts) and where it came from."""
    if EVAL_PATH.is_file():
        rows = _read_jsonl(EVAL_PATH)
        source = str(EVAL_PATH)
    else:
        from demo.suite import complex_rows

        rows = complex_rows(64, seed=0, heldout=True)
        source = "demo.suite held-out generator (seed 0)"
    df = pd.DataFrame([{"instruction": r.get("instruction", ""), "input": r.get("input", ""),
                        "category": "+".join(r.get("experts") or []) or "—"} for r in rows[:n]],
                      columns=["instruction", "input", "category"])
    return df, source


@lru_cache(maxsize=1)
def off_topic_example() -> dict[str, str] | None:
    """The first shipped off-topic question (no expert should be used), or None when none is shipped."""
    if not OFF_TOPIC_PATH.is_file():
        return None
    rows = [r for r in _read_jsonl(OFF_TOPIC_PATH) if r.get("instruction")]
    return {"label": "off-topic", "instruction": rows[0]["instruction"], "input": rows[0].get("input", "")} \
        if rows else None


def _never_trained() -> set[frozenset[str]]:
    from demo.suite import HELDOUT_COMBOS, combo_experts

    return {frozenset(combo_experts(c)) for c in HELDOUT_COMBOS}


def examples(k: int = 5) -> list[dict[str, str]]:
    """`k` examples, each a different combination: the combinations no router saw in training first, then those that
    bring the most experts not yet shown, then the least shown (ties in file order); the last one off-topic when an
    off-topic set is shipped."""
    df, _ = heldout_rows()
    off = off_topic_example() if k > 1 else None
    candidates = list(df.drop_duplicates("category").itertuples())
    unseen = _never_trained()
    picked: list[Any] = []
    shown: Counter[str] = Counter()   # how many picked examples use each expert

    def experts(r: Any) -> set[str]:
        return set() if r.category == "—" else set(r.category.split("+"))

    def rank(r: Any) -> tuple[bool, int, int]:
        return (frozenset(experts(r)) in unseen, sum(shown[e] == 0 for e in experts(r)),
                -sum(shown[e] for e in experts(r)))

    while candidates and len(picked) < k - (off is not None):
        best = max(candidates, key=rank)   # max keeps the first of equals: file order
        candidates.remove(best)
        picked.append(best)
        shown.update(experts(best))
    out = [{"label": r.category.replace("+", " + "), "instruction": r.instruction, "input": r.input} for r in picked]
    return out + ([off] if off else [])
