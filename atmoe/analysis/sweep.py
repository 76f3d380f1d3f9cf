"""Controllability curve: generate the same prompt with one group or expert weight fixed at 0, …, 1.

    frame = sweep(m, "List the lab results", input=note, target="group:style", steps=5, max_new_tokens=64)
    frame  →  weight, text, finish_reason, new_tokens [, one column per metric of `scorer`]

Each step is a plain `ATMoE.generate` with `Overrides(groups={g: w})` ("group:<g>") or `Overrides(experts={e: w})`
("expert:<e>", its weight within its group), on `layers` (default all), with the same seed and settings, so the only
thing that changes from row to row is that weight. The renormalisation of the others is the overrides' (see
`overrides.py`): in a softmax group budget the free groups share 1 − w.

Scoring is the caller's: `scorer(text) → {metric: value}` (for the demo, `lambda t: metrics.score(t, row)` from
`demo.metrics`); the engine knows no metric.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from ..overrides import Overrides

if TYPE_CHECKING:
    from ..model import ATMoE

Scorer = Callable[[str], dict[str, float]]


def sweep_overrides(m: ATMoE, target: str, weight: float, layers: tuple[int, int] | None = None) -> Overrides:
    """The override of one sweep step: `target` ("group:<g>" | "expert:<e>") fixed at `weight` on `layers`."""
    level, name = m.layout.parse_target(target)
    return Overrides(groups={name: weight}, layers=layers) if level == "group" else \
        Overrides(experts={name: weight}, layers=layers)


def sweep(m: ATMoE, prompt: str, input: str = "", target: str = "", steps: int = 5,
          layers: tuple[int, int] | None = None, scorer: Scorer | None = None, **generation: Any) -> pd.DataFrame:
    """One generation per weight in linspace(0, 1, steps) for `target`; `generation`: `ATMoE.generate`'s settings
    (max_new_tokens, temperature, top_p, seed, merge, router, granularity), the same for every step."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an integer ≥ 2 (the two endpoints), got {steps!r}")
    if "overrides" in generation:
        raise ValueError("sweep sets the overrides itself; choose the target and layers instead")
    m.layout.parse_target(target)   # a bad target fails before any generation
    rows = []
    for w in np.linspace(0.0, 1.0, steps):
        w = float(w)
        g = m.generate(prompt, input=input, overrides=sweep_overrides(m, target, w, layers), **generation)
        row: dict[str, Any] = {"weight": w, "text": g.text, "finish_reason": g.finish_reason,
                               "new_tokens": len(g.token_ids)}
        if scorer is not None:
            row.update(scorer(g.text))
        rows.append(row)
    return pd.DataFrame(rows)


__all__ = ["Scorer", "sweep", "sweep_overrides"]
