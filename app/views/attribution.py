"""The Attribution tab: how much of the answer on screen each expert (or group) wrote — the change in the answer's
log-probability when it is removed on a layer range (`atmoe.analysis.attribution`): a target × layer-range matrix,
and the answer's tokens coloured by the selected cell's per-token change."""

from __future__ import annotations

import numpy as np
import plotly.graph_objects as go
import streamlit as st

from app import state
from app.service import Answer, Service
from atmoe.analysis.attribution import Attribution, layer_ranges


def delta_matrix(a: Attribution) -> go.Figure:
    """Targets × layer ranges, Δ log p(answer), diverging around 0 (red: removing it makes the answer less likely)."""
    z = a.total
    bound = float(np.abs(z).max()) or 1.0
    cols = [f"L{x}–{y}" for x, y in a.ranges]
    fig = go.Figure(go.Heatmap(z=z, x=cols, y=a.targets, zmin=-bound, zmax=bound, zmid=0, colorscale="RdBu",
                               colorbar=dict(title="Δ log p"),
                               hovertemplate="%{y} removed on %{x}<br>Δ log p(answer) %{z:.3f}<extra></extra>"))
    fig.update_layout(title="Δ log p(answer) when removed", margin=dict(l=10, r=10, t=40, b=10),
                      height=max(300, 28 * len(a.targets) + 140),
                      xaxis=dict(title="layers", type="category"), yaxis=dict(autorange="reversed", type="category"))
    return fig


def token_figure(tokens: list[str], delta: np.ndarray, per_line: int = 12) -> go.Figure:
    """The answer's tokens in reading order, `per_line` to a row, each cell coloured by its Δ log p (red < 0 < blue)
    with the token written in it; hover gives the value. A plotly figure, not HTML: the page never renders raw HTML."""
    T = len(tokens)
    rows = max(1, -(-T // per_line))
    z = np.full((rows, per_line), np.nan)
    text = np.full((rows, per_line), "", dtype=object)
    z.ravel()[:T] = delta
    text.ravel()[:T] = [t.replace("\n", "↵") for t in tokens]
    bound = float(np.abs(delta).max()) or 1.0
    fig = go.Figure(go.Heatmap(z=z, text=text, texttemplate="%{text}", zmin=-bound, zmax=bound, zmid=0,
                               colorscale="RdBu", colorbar=dict(title="Δ log p"), xgap=2, ygap=2,
                               hovertemplate="“%{text}”: Δ log p %{z:+.3f}<extra></extra>"))
    fig.update_layout(margin=dict(l=10, r=10, t=10, b=10), height=60 + 34 * rows,
                      xaxis=dict(visible=False), yaxis=dict(visible=False, autorange="reversed"))
    return fig


def _run(svc: Service, ans: Answer, prompt: str, note: str, parts: int, targets: list[str], first: bool) -> None:
    ss = st.session_state
    try:
        with st.spinner("Removing each target on each layer range…"):
            result = svc.attribute(prompt, note, ans, targets, layer_ranges(svc.num_layers, parts), first)
    except state.ERRORS as e:
        st.error(f"Cannot attribute this answer: {e}")
        return
    ss.attribution = {"result": result, "answer": ans, "prompt": prompt}


def render(svc: Service) -> None:
    ss = st.session_state
    ans: Answer | None = ss.get("answer")
    st.markdown("How much of the answer each expert wrote: the answer's log-probability when the expert (or a whole "
                "group) is removed on a layer range — its weight set to 0 as **Disable** does, the same answer "
                "teacher-forced — minus its log-probability as routed. Negative: the answer needed it.")
    if ans is None or not ans.new_tokens:
        st.info("Generate an answer in the **Prompt & routing** tab first.")
        return
    prompt, note = ss.answer_of   # what the answer was generated for (the trace on show may be a later routing)
    c = st.columns([1, 3, 1])
    parts = c[0].number_input("Layer ranges", 1, min(svc.num_layers, 8), min(3, svc.num_layers), key="attr_parts")
    choices = [f"expert:{e}" for e in svc.experts] + [f"group:{g}" for g in svc.groups]
    targets = c[1].multiselect("Remove", choices, default=choices, key="attr_targets")
    first = c[2].checkbox("First-order estimate", key="attr_first_order",
                          help="Gradient of log p(answer) × the change of the weights: one backward pass, beside "
                               "the exact removal")
    if st.button("Attribute the answer", key="attr_run", type="primary", disabled=not targets):
        _run(svc, ans, prompt, note, int(parts), targets, first)
    res = ss.get("attribution")
    if not res:
        return
    a: Attribution = res["result"]
    if res["answer"] is not ss.get("answer"):
        st.warning(f"This attribution is of an earlier answer (to “{res['prompt'][:80]}”); press **Attribute the "
                   "answer** for the one on screen.")
    st.plotly_chart(delta_matrix(a), key="attr_matrix", width="stretch")
    c = st.columns(2)
    target = c[0].selectbox("Colour the answer by", a.targets, key="attr_target")
    span = c[1].selectbox("on layers", list(range(len(a.ranges))), key="attr_range",
                          format_func=lambda r: f"{a.ranges[r][0]}–{a.ranges[r][1]}")
    k, r = a.targets.index(target), min(int(span), len(a.ranges) - 1)
    st.plotly_chart(token_figure(a.tokens, a.delta[k, r]), key="attr_tokens", width="stretch")
    st.caption(f"Red: removing {target} on layers {a.ranges[r][0]}–{a.ranges[r][1]} makes that token less likely; "
               f"blue: more likely. Total Δ log p {a.total[k, r]:+.3f} over {len(a.tokens)} tokens.")
    if a.estimate is not None:
        agree = a.agreement()
        st.caption(f"First-order estimate vs exact removal over these {agree['cells']} cells: Pearson "
                   f"{agree['pearson']:.2f}, Spearman {agree['spearman']:.2f}, same sign "
                   f"{agree['sign_agreement']:.0%}.")
    frame = a.to_frame()
    st.dataframe(frame, hide_index=True, width="stretch")
    st.download_button("Download (CSV)", frame.to_csv(index=False), "atmoe_attribution.csv", "text/csv",
                       key="dl_attribution")
