"""The Batch tab: route many instructions at once (upload or the held-out set) and summarise which groups they use."""

from __future__ import annotations

import pandas as pd
import streamlit as st

from app import batch_data, figures, presets, state
from app.examples import heldout_rows
from app.service import BATCH_CHUNK, Service
from atmoe import Overrides


def _table() -> tuple[pd.DataFrame | None, str]:
    source = st.radio("Instructions", ["held-out set", "upload"], horizontal=True, key="batch_source")
    if source == "held-out set":
        df, where = heldout_rows()
        st.caption(f"{len(df)} held-out instructions from {where}.")
        return df, where
    up = st.file_uploader("CSV or JSONL with column `instruction` (optional `input`, `category`)",
                          type=["csv", "jsonl", "json", "tsv"], key="batch_file")
    if up is None:
        return None, ""
    try:
        df, note = batch_data.read_instructions(up.name, up.getvalue())
    except ValueError as e:
        st.error(f"Cannot read {up.name}: {e}")
        return None, ""
    if note:
        st.warning(note)
    st.caption(f"{len(df)} instructions from {up.name} (at most {batch_data.MAX_ROWS} rows).")
    return df, up.name


def _route(svc: Service, df: pd.DataFrame, overrides: Overrides | None) -> tuple[list, pd.DataFrame, list[str]]:
    """Route in chunks with a progress bar; a chunk that fails is retried row by row so one bad row is skipped."""
    bar = st.progress(0.0, text="Routing…")
    traces, kept, errors = [], [], []
    for start in range(0, len(df), BATCH_CHUNK):
        chunk = df.iloc[start:start + BATCH_CHUNK]
        try:
            traces += svc.route_many(chunk["instruction"].tolist(), chunk["input"].tolist(), overrides)
            kept += list(chunk.index)
        except state.ERRORS:
            for i, row in chunk.iterrows():
                try:
                    traces.append(svc.route(row["instruction"], row["input"], overrides))
                    kept.append(i)
                except state.ERRORS as e:
                    errors.append(f"row {i + 1}: {e}")
        done = min(start + BATCH_CHUNK, len(df))
        bar.progress(done / len(df), text=f"Routed {done} / {len(df)}")
    bar.empty()
    return traces, df.loc[kept].reset_index(drop=True), errors


def render(svc: Service) -> None:
    ss = st.session_state
    df, name = _table()
    use_ov = st.checkbox(f"Apply the current overrides ({presets.describe(ss.get('ov'))})", key="batch_ov",
                         value=False)
    if df is not None and st.button("Route all", key="batch_run", type="primary"):
        traces, kept, errors = _route(svc, df, ss.get("ov") if use_ov else None)
        if errors:
            st.warning(f"{len(errors)} row(s) skipped: " + "; ".join(errors[:5]) + (" …" if len(errors) > 5 else ""))
        ss.batch = {"summary": batch_data.summarise(traces, kept), "name": name} if traces else None
        if not traces:
            st.error("No instruction could be routed.")
    res = ss.get("batch")
    if not res:
        return
    s = res["summary"]
    st.caption(f"{len(s['rows'])} instructions from {res['name']}")
    c1, c2 = st.columns(2)
    c1.plotly_chart(figures.batch_layer_lines(s["per_layer"]), key="batch_layers", width="stretch")
    c2.plotly_chart(figures.batch_category_bars(s["per_category"]), key="batch_categories", width="stretch")
    st.dataframe(s["rows"], hide_index=True, width="stretch")
    st.download_button("Download table (CSV)", s["rows"].to_csv(index=False), "atmoe_batch.csv", "text/csv",
                       key="dl_batch")
