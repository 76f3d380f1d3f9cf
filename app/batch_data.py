"""Batch analysis data: read an uploaded CSV/JSONL of instructions, summarise many traces. Pure pandas/numpy."""

from __future__ import annotations

import io
import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from atmoe import RoutingTrace

MAX_ROWS = 500


def read_instructions(name: str, data: bytes, limit: int = MAX_ROWS) -> tuple[pd.DataFrame, str | None]:
    """Columns `instruction`, `input` ('' if absent), `category` ('—' if absent); at most `limit` rows.
    Returns (table, note) where note says what was dropped or cut; ValueError with the reason if unreadable."""
    suffix = Path(name).suffix.lower()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise ValueError(f"{name} is not UTF-8 text") from None
    if suffix in (".jsonl", ".json", ".ndjson"):
        rows = []
        for i, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{name} line {i} is not valid JSON ({e.msg}); expected one JSON object per line") \
                    from None
            if not isinstance(row, dict):
                raise ValueError(f"{name} line {i} is a {type(row).__name__}, expected a JSON object")
            rows.append(row)
        df = pd.DataFrame(rows)
    elif suffix in (".csv", ".tsv", ".txt"):
        try:
            df = pd.read_csv(io.StringIO(text), sep="\t" if suffix == ".tsv" else ",", dtype=str,
                             keep_default_na=False)
        except (pd.errors.ParserError, pd.errors.EmptyDataError) as e:
            raise ValueError(f"{name} is not a readable CSV: {str(e).splitlines()[0]}") from None
    else:
        raise ValueError(f"{name}: unsupported file type '{suffix or 'none'}'; upload .csv or .jsonl")
    return normalise(df, name, limit)


def normalise(df: pd.DataFrame, name: str, limit: int = MAX_ROWS) -> tuple[pd.DataFrame, str | None]:
    if "instruction" not in df.columns:
        raise ValueError(f"{name} has no 'instruction' column (found: {', '.join(map(str, df.columns[:8])) or 'none'})")
    out = pd.DataFrame({"instruction": df["instruction"].fillna("").astype(str),
                        "input": df["input"].fillna("").astype(str) if "input" in df.columns else "",
                        "category": df["category"].fillna("—").astype(str) if "category" in df.columns else "—"})
    notes = []
    empty = (out["instruction"].str.strip() == "") & (out["input"].str.strip() == "")
    if empty.any():
        notes.append(f"{int(empty.sum())} empty row(s) skipped")
        out = out[~empty]
    if len(out) > limit:
        notes.append(f"only the first {limit} of {len(out)} rows are analysed")
        out = out.iloc[:limit]
    if out.empty:
        raise ValueError(f"{name} has no non-empty instructions")
    return out.reset_index(drop=True), "; ".join(notes) or None


def summarise(traces: Sequence[RoutingTrace], table: pd.DataFrame) -> dict[str, pd.DataFrame]:
    """per_layer (layer, group, weight), per_category (category, group, weight), rows (one per instruction: mean α per
    group and its top expert per group by layer-mean β)."""
    groups, experts = traces[0].groups, traces[0].experts
    alpha = np.stack([t.group_weights for t in traces])                       # [N, L, G]
    beta = np.stack([t.expert_weights for t in traces])                       # [N, L, E]
    L = alpha.shape[1]
    per_layer = pd.DataFrame([(l, g, float(alpha[:, l, gi].mean())) for gi, g in enumerate(groups) for l in range(L)],
                             columns=["layer", "group", "weight"])
    mean_alpha = alpha.mean(1)                                                # [N, G]
    mean_beta = beta.mean(1)                                                  # [N, E]
    rows = table[["instruction", "category"]].copy()
    for gi, g in enumerate(groups):
        rows[f"α {g}"] = mean_alpha[:, gi].round(4)
    layout = traces[0].layout
    for g in groups:
        cols = np.array(layout.members(g))
        best = cols[mean_beta[:, cols].argmax(1)]
        rows[f"top {g}"] = [experts[i] for i in best]
        rows[f"top {g} β"] = mean_beta[np.arange(len(best)), best].round(4)
    cat = pd.DataFrame(mean_alpha, columns=groups)
    cat["category"] = table["category"].to_numpy()
    per_category = cat.groupby("category", sort=True)[groups].mean().reset_index().melt(
        id_vars="category", var_name="group", value_name="weight")
    per_category["group"] = pd.Categorical(per_category["group"], categories=groups, ordered=True)
    per_category = per_category.sort_values(["group", "category"]).reset_index(drop=True)
    per_category["group"] = per_category["group"].astype(str)
    return {"per_layer": per_layer, "per_category": per_category, "rows": rows}
