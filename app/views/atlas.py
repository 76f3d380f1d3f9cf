"""The Atlas tab: a set of instructions placed in 2-D by their routing (PCA, `atmoe.analysis.atlas`), coloured by
their labelled skills; how the set's load spreads over experts and layers (`atmoe.analysis.routes.balance`); and the
controllability curve over the held-out set (`atmoe.analysis.sweep.sweep_rows`)."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from app import state
from app.examples import EVAL_PATH, heldout_rows
from app.service import BATCH_CHUNK, Service
from atmoe.analysis.atlas import FEATURES, atlas, separation, stack
from atmoe.analysis.routes import balance
from atmoe.analysis.sweep import curve
from demo.metrics import score

CATEGORICAL = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"]
MAX_ROWS = 2000
CURVE_CAP = 400   # rows × weights one curve may generate from the dashboard


def scatter(frame: pd.DataFrame, explained: np.ndarray) -> go.Figure:
    """One marker per instruction, one colour per label; hover shows the instruction."""
    fig = go.Figure()
    for i, (label, part) in enumerate(frame.groupby("label", sort=True)):
        fig.add_trace(go.Scatter(x=part["x"], y=part["y"], mode="markers", name=str(label),
                                 marker=dict(size=9, color=CATEGORICAL[i % len(CATEGORICAL)], opacity=0.85),
                                 customdata=part[["instruction"]].to_numpy(),
                                 hovertemplate="%{customdata[0]}<extra>" + str(label) + "</extra>"))
    fig.update_layout(title="Routing atlas (PCA)", margin=dict(l=10, r=10, t=40, b=10), height=480,
                      xaxis=dict(title=f"PC1 ({explained[0]:.0%} of the variance)"),
                      yaxis=dict(title=f"PC2 ({explained[1]:.0%})"), legend=dict(title="skills"))
    return fig


def load_heatmap(stats: dict) -> go.Figure:
    """Layers × experts, the mean effective weight over the set (each expert's load)."""
    z = np.array(stats["mean_weight"])
    fig = go.Figure(go.Heatmap(z=z, x=stats["experts"], y=[f"L{i}" for i in range(len(z))], colorscale="Viridis",
                               zmin=0.0, colorbar=dict(title="mean w"),
                               hovertemplate="layer %{y}<br>%{x}: mean weight %{z:.3f}<extra></extra>"))
    fig.update_layout(title="Expert load: mean effective weight α·β", margin=dict(l=10, r=10, t=40, b=10),
                      height=max(360, 16 * len(z) + 170), xaxis=dict(type="category"),
                      yaxis=dict(title="decoder layer", autorange="reversed", type="category"))
    return fig


def balance_table(stats: dict) -> pd.DataFrame:
    """One row per expert: layer-mean load, share of rows it dominates, its most loaded layer, unused."""
    load = np.array(stats["mean_weight"])
    return pd.DataFrame({"expert": stats["experts"], "mean weight": load.mean(0).round(4),
                         "dominates (share of rows)": np.round(stats["dominant_overall"], 3),
                         "busiest layer": load.argmax(0), "unused": [e in stats["unused"] for e in stats["experts"]]})


def _rows() -> tuple[pd.DataFrame | None, str]:
    source = st.radio("Instructions", ["held-out set", "upload"], horizontal=True, key="atlas_source")
    if source == "held-out set":
        df, where = heldout_rows()
        return df, where
    up = st.file_uploader("JSONL with `instruction` (optional `input`, `experts` labels)", type=["jsonl"],
                          key="atlas_file")
    if up is None:
        return None, ""
    try:
        rows = [json.loads(line) for line in up.getvalue().decode("utf-8-sig").splitlines() if line.strip()]
        df = pd.DataFrame([{"instruction": str(r["instruction"]), "input": str(r.get("input", "")),
                            "category": "+".join(r.get("experts") or []) or "—"} for r in rows[:MAX_ROWS]])
    except (ValueError, KeyError, TypeError, AttributeError) as e:
        st.error(f"Cannot read {up.name}: each line must be a JSON object with `instruction` ({e})")
        return None, ""
    return (df if len(df) else None), up.name


def _route(svc: Service, df: pd.DataFrame) -> list:
    bar = st.progress(0.0, text="Routing…")
    traces = []
    for start in range(0, len(df), BATCH_CHUNK):
        chunk = df.iloc[start:start + BATCH_CHUNK]
        traces += svc.route_many(chunk["instruction"].tolist(), chunk["input"].tolist(), None)
        done = min(start + BATCH_CHUNK, len(df))
        bar.progress(done / len(df), text=f"Routed {done} / {len(df)}")
    bar.empty()
    return traces


def reference_rows() -> list[dict]:
    """The held-out rows with their reference answers (`output`): the shipped file, else the seeded generator."""
    if EVAL_PATH.is_file():
        return [json.loads(x) for x in EVAL_PATH.read_text(encoding="utf-8").splitlines() if x.strip()]
    from demo.suite import complex_rows

    return complex_rows(64, seed=0, heldout=True)


def curve_figure(curve: pd.DataFrame, own: float, target: str) -> go.Figure:
    """Mean score per weight, one line per metric, the router's own mean weight dashed."""
    fig = go.Figure()
    for i, metric in enumerate(c for c in curve.columns if c not in ("weight", "rows", "new_tokens")):
        fig.add_trace(go.Scatter(x=curve["weight"], y=curve[metric], mode="lines+markers", name=metric,
                                 line=dict(color=CATEGORICAL[i % len(CATEGORICAL)])))
    fig.add_vline(x=own, line=dict(color="black", dash="dash"), annotation_text="router's own mean")
    fig.update_layout(title=f"Mean score over the set vs {target} fixed", margin=dict(l=10, r=10, t=40, b=10),
                      height=380, xaxis=dict(title=f"{target} weight", range=[-0.02, 1.02]),
                      yaxis=dict(title="mean score", range=[0, 1.02]))
    return fig


def _curve(svc: Service) -> None:
    """The controllability curve over the held-out set: every row at every weight, scored against its reference."""
    ss = st.session_state
    st.subheader("Controllability over the set")
    rows = reference_rows()
    c = st.columns([2, 1, 1])
    target = c[0].selectbox("Fix", [f"group:{g}" for g in svc.groups] + [f"expert:{e}" for e in svc.experts],
                            key="curve_target")
    steps = int(c[1].number_input("Weights", 2, 11, 3, key="curve_steps"))
    n = int(c[2].number_input("Rows", 1, len(rows), min(16, len(rows)), key="curve_rows"))
    st.caption(f"{n} held-out rows × {steps} weights = {n * steps} generations (at most {CURVE_CAP}), with the "
               "generation settings of the Prompt & routing tab; each answer scored against the row's reference "
               "(line F1 and exact match).")
    if st.button("Run the curve", key="curve_run", disabled=n * steps > CURVE_CAP):
        bar = st.progress(0.0, text="Generating…")
        part = rows[:n]
        try:
            frame, own = svc.sweep_set([r["instruction"] for r in part], [r.get("input", "") for r in part], target,
                                       steps, state.settings(), scorer=lambda i, text: score(text, part[i]),
                                       progress=lambda done, total: bar.progress(done / total,
                                                                                 text=f"Generated {done} / {total}"))
            ss.curve = {"frame": frame, "curve": curve(frame), "own": own, "target": target}
        except state.ERRORS as e:
            st.error(f"Cannot run the curve: {e}")
        bar.empty()
    res = ss.get("curve")
    if res:
        st.plotly_chart(curve_figure(res["curve"], res["own"], res["target"]), key="curve_chart", width="stretch")
        st.dataframe(res["curve"], hide_index=True, width="stretch")
        st.download_button("Download the lines (CSV)", res["frame"].to_csv(index=False), "atmoe_curve.csv",
                           "text/csv", key="dl_curve")


def render(svc: Service) -> None:
    ss = st.session_state
    st.markdown("Each instruction placed by its routing (the router alone, no overrides): instructions routed alike "
                "sit together, so a trained router shows one cluster per skill combination. Below, how the set's "
                "load spreads over the experts.")
    df, name = _rows()
    kind = st.radio("Routing features", FEATURES, horizontal=True, key="atlas_features",
                    format_func=lambda k: {"mean": "layer-mean α and β", "full": "every layer's α·β"}[k])
    if df is not None and st.button("Route and map", key="atlas_run", type="primary"):
        try:
            traces = _route(svc, df)
        except state.ERRORS as e:
            st.error(f"Cannot route this set: {e}")
            traces = []
        if traces:
            alpha, beta = stack(traces)
            ss.atlas = {"alpha": alpha, "beta": beta, "rows": df.reset_index(drop=True), "name": name}
    res = ss.get("atlas")
    if res:
        _atlas(svc, res, kind)
    _curve(svc)


def _atlas(svc: Service, res: dict, kind: str) -> None:
    frame, fit = atlas(res["alpha"], res["beta"], svc.layout, labels=res["rows"]["category"].tolist(), kind=kind)
    frame["instruction"] = res["rows"]["instruction"]
    st.plotly_chart(scatter(frame, fit.explained), key="atlas_scatter", width="stretch")
    sep = separation(frame[["x", "y"]].to_numpy(), frame["label"])
    st.caption(f"{len(frame)} instructions from {res['name']}; the plane shows {fit.explained.sum():.0%} of the "
               f"routing's variance. Leave-one-out nearest-centroid accuracy of the labels in the plane: "
               f"{sep['accuracy']:.0%} (chance {sep['chance']:.0%}, {sep['labels']} labels).")
    stats = balance(res["alpha"], res["beta"], svc.layout)
    c = st.columns([3, 2])
    c[0].plotly_chart(load_heatmap(stats), key="atlas_load", width="stretch")
    with c[1]:
        st.dataframe(balance_table(stats), hide_index=True, width="stretch")
        ratio = np.array(stats["max_mean_ratio"])
        st.caption(f"Most loaded ÷ mean load per layer: {ratio.min():.2f}–{ratio.max():.2f} (1 = balanced). "
                   f"Unused (mean weight < {stats['unused_below']} on every layer): "
                   f"{', '.join(stats['unused']) or 'none'}.")
        st.download_button("Balance statistics (JSON)", json.dumps(stats, indent=1), "atmoe_balance.json",
                           "application/json", key="dl_balance")
