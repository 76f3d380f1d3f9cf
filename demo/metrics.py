"""Scoring the demo's answers by content: line F1 against the reference, plus exact match.

Every reference line is one fact in its final form (which measurement, its value, the knowledge suffix, the style).
A predicted line earns credit only if it equals a reference line after normalising case and spaces, so style is
credited only on lines whose content is right, and form alone (a dash, a word "normal") earns nothing:

    F1 = 2·|P ∩ R| / (|P| + |R|)   over the sets of normalised non-empty lines;  exact = (P == R as lists)

Degenerate answers (a constant, the empty string, the note, the instruction) score 0, and another row's reference
scores near 0 (a line matches only if the same measurement has the same value): `tests/test_demo_metrics.py`.
"""

from __future__ import annotations

from typing import Any


def normalise_lines(text: str) -> list[str]:
    return [" ".join(part.lower().split()) for part in text.splitlines() if part.strip()]


def line_f1(prediction: str, reference: str) -> float:
    pred, ref = set(normalise_lines(prediction)), set(normalise_lines(reference))
    if not pred or not ref:
        return float(pred == ref)
    hits = len(pred & ref)
    return 2 * hits / (len(pred) + len(ref))


def score(prediction: str, row: dict[str, Any]) -> dict[str, float]:
    """{"f1", "exact"} of one answer against its row's reference."""
    reference = row["output"]
    return {"f1": line_f1(prediction, reference),
            "exact": float(normalise_lines(prediction) == normalise_lines(reference))}


__all__ = ["line_f1", "normalise_lines", "score"]
