"""Controllability curve: generate the same prompt with one group or expert weight fixed at 0, …, 1.

    frame = sweep(m, "List the lab results", input=note, target="group:style", steps=5, max_new_tokens=64)
    frame  →  weight, text, finish_reason, new_tokens [, one column per metric of `scorer`]

Each step is a plain `ATMoE.generate` with `Overrides(groups={g: w})` ("group:<g>") or `Overrides(experts={e: w})`
("expert:<e>", its weight within its group), on `layers` (default all), with the same seed and settings, so the only
thing that changes from row to row is that weight. The renormalisation of the others is the overrides' (see
`overrides.py`): in a softmax group budget the free groups share 1 − w.

Scoring is the caller's: `scorer(text) → {metric: value}` (for the demo, `lambda t: metrics.score(t, row)` from
`demo.metrics`); the engine knows no metric.

Over a data set (`sweep_rows`, `atmoe sweep --dataset`): every row at every weight, batched per weight; `curve`
averages the metrics per weight and `router_weight` says where the router itself sits on that axis.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
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


RowScorer = Callable[[int, str], dict[str, float]]   # (row index, answer) → {metric: value}
MAX_CELLS = 20_000   # rows × steps: generations one dataset sweep may ask for


def sweep_rows(m: ATMoE, prompts: Sequence[str], target: str, *, inputs: Sequence[str] | None = None,
               steps: int = 5, layers: tuple[int, int] | None = None, scorer: RowScorer | None = None,
               batch_size: int = 8, max_cells: int = MAX_CELLS, progress: Callable[[int, int], None] | None = None,
               **generation: Any) -> pd.DataFrame:
    """The controllability curve over a data set: every row generated at every weight of `target` (rows batched
    together per weight, `ATMoE.generate_batch`), one line per (row, weight): `row, weight, text, finish_reason,
    new_tokens` and the metrics of `scorer(row, text)`. `curve(frame)` averages it per weight. Refuses more than
    `max_cells` generations (rows × steps). `progress(done, total)` after each batch."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 2:
        raise ValueError(f"steps must be an integer ≥ 2 (the two endpoints), got {steps!r}")
    if "overrides" in generation:
        raise ValueError("sweep sets the overrides itself; choose the target and layers instead")
    if len(prompts) * steps > max_cells:
        raise ValueError(f"{len(prompts)} rows × {steps} steps = {len(prompts) * steps} generations, more than the cap "
                         f"of {max_cells}: use fewer rows or steps")
    m.layout.parse_target(target)
    inputs = list(inputs) if inputs is not None else [""] * len(prompts)
    lines, total, done = [], len(prompts) * steps, 0
    for w in np.linspace(0.0, 1.0, steps):
        ov = sweep_overrides(m, target, float(w), layers)
        for start in range(0, len(prompts), batch_size):
            out = m.generate_batch(list(prompts[start:start + batch_size]), inputs=inputs[start:start + batch_size],
                                   overrides=ov, **generation)
            for i, g in enumerate(out, start):
                line: dict[str, Any] = {"row": i, "weight": float(w), "text": g.text, "finish_reason": g.finish_reason,
                                        "new_tokens": len(g.token_ids)}
                if scorer is not None:
                    line.update(scorer(i, g.text))
                lines.append(line)
            done += len(out)
            if progress is not None:
                progress(done, total)
    return pd.DataFrame(lines)


def curve(frame: pd.DataFrame) -> pd.DataFrame:
    """Mean of every numeric column per weight, and the number of rows: the dataset-level curve."""
    numeric = frame.drop(columns=["row"], errors="ignore").select_dtypes("number")
    out = numeric.groupby("weight").mean()
    out.insert(0, "rows", frame.groupby("weight").size())
    return out.reset_index()


def router_weight(m: ATMoE, prompts: Sequence[str], target: str, *, inputs: Sequence[str] | None = None,
                  layers: tuple[int, int] | None = None, batch_size: int = 16) -> float:
    """The router's own mean weight of `target` over the rows and `layers` (α of a group; β, the weight within its
    group, of an expert — what the sweep fixes): where the curve's x-axis sits without overrides."""
    level, name = m.layout.parse_target(target)
    a, b = layers if layers is not None else (0, m.num_layers - 1)
    inputs = list(inputs) if inputs is not None else [""] * len(prompts)
    values = []
    for start in range(0, len(prompts), batch_size):
        for t in m.route_batch(list(prompts[start:start + batch_size]), inputs=inputs[start:start + batch_size]):
            w = t.group_weights[:, t.groups.index(name)] if level == "group" else \
                t.expert_weights[:, t.experts.index(name)]
            values.append(float(np.mean(w[a:b + 1])))
    return float(np.mean(values))


__all__ = ["MAX_CELLS", "RowScorer", "Scorer", "curve", "router_weight", "sweep", "sweep_overrides", "sweep_rows"]
