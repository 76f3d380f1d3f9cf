"""The Per token tab: per-token routing (granularity "token"): tokens coloured by their dominant group or one
expert's weight."""

from __future__ import annotations

import streamlit as st

from app import figures
from app.service import Service
from app.text import md_escape
from demo.config import TOKEN_MODE_NOTE

# Streamlit Markdown colours, in a colour-blind-friendlier order (blue/orange first).
COLOURS = ["blue", "orange", "violet", "green", "red", "gray"]


def render(svc: Service) -> None:
    ss = st.session_state
    ans = ss.get("answer")
    if ans is None or ans.trace.granularity != "token":
        st.info("Generate with **Routing granularity = token** (Generation settings) to see how the router's weights "
                "change token by token.")
        return
    if svc.shipped_demo:
        st.info(TOKEN_MODE_NOTE)
    trace = ans.trace
    L = trace.num_layers
    c1, c2, c3 = st.columns([2, 2, 1], vertical_alignment="bottom")
    layers = c1.slider("Average over layers", 0, L - 1, (0, L - 1), key="tok_layers")
    choice = c2.selectbox("Colour by", ["dominant group", *trace.experts], key="tok_colour")
    answer_only = c3.checkbox("Answer tokens only", value=True, key="tok_answer_only")
    expert = None if choice == "dominant group" else choice
    st.plotly_chart(figures.token_heatmap(trace, ans.prompt_tokens, tuple(layers), expert, answer_only),
                    key="token_heatmap", width="stretch")
    st.markdown("**Answer tokens by dominant group** — " + " · ".join(
        f":{COLOURS[i % len(COLOURS)]}[{md_escape(g)}]" for i, g in enumerate(trace.groups)))
    dom = figures.dominant_groups(trace, tuple(layers))[ans.prompt_tokens:]
    colour = {g: COLOURS[i % len(COLOURS)] for i, g in enumerate(trace.groups)}
    parts = []
    for token, group, _ in dom:
        text = md_escape(token.replace("\n", "↵"))
        parts.append(f":{colour[group]}-background[{text}]" if text.strip() else text)
    with st.container(border=True):
        st.markdown("".join(parts) if parts else "_(no answer tokens)_")
    shown = "" if answer_only else "; the dashed line separates the prompt from the answer"
    st.caption(f"Hover the heatmap for each token's values{shown}.")
