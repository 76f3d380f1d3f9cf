"""The Compare tab: the router-only answer next to the overridden one, a word-level diff, and what the overrides
changed."""

from __future__ import annotations

import streamlit as st

from app import figures, presets, state
from app.service import Service
from app.text import word_diff


def _run(svc: Service) -> None:
    ss = st.session_state
    prompt, note = ss.get("prompt", ""), ss.get("note", "")
    settings = state.settings()
    try:
        with st.spinner("Generating both answers…"):
            plain = svc.generate(prompt, note, settings, None)
            changed = svc.generate(prompt, note, settings, ss.get("ov"))
    except state.ERRORS as e:
        st.error(f"Cannot compare: {e}")
        return
    ss.compare = {"plain": plain, "changed": changed, "prompt": prompt}


def render(svc: Service) -> None:
    ss = st.session_state
    st.markdown("Same prompt, same settings and seed: the router alone vs. the router with your overrides "
                f"({presets.describe(ss.get('ov'))}).")
    if not ss.get("ov"):
        st.info("No overrides are set: move sliders in the sidebar and press **Apply** to see a difference.")
    if st.button("Run comparison", key="compare_run", type="primary"):
        _run(svc)
    cmp = ss.get("compare")
    if not cmp:
        return
    plain, changed = cmp["plain"], cmp["changed"]
    old_md, new_md, ratio = word_diff(plain.text, changed.text)
    st.caption(f"Word overlap ratio {ratio:.2f}: removed words are struck through (orange), added words are bold "
               "(blue).")
    left, right = st.columns(2)
    with left:
        st.subheader("Router only")
        with st.container(border=True):
            st.markdown(old_md)
        st.caption(f"{plain.new_tokens} tokens · {plain.seconds:.2f} s · {plain.finish_reason}")
    with right:
        st.subheader("With overrides")
        with st.container(border=True):
            st.markdown(new_md)
        st.caption(f"{changed.new_tokens} tokens · {changed.seconds:.2f} s · {changed.finish_reason} · "
                   f"{presets.describe(changed.overrides)}")
    c1, c2 = st.columns([2, 3])
    c1.plotly_chart(figures.delta_heatmap(changed.trace, "group"), key="delta_groups", width="stretch")
    c2.plotly_chart(figures.delta_heatmap(changed.trace, "effective"), key="delta_experts", width="stretch")
    st.caption("Router values come from the same overridden pass: once a layer is overridden, later layers see "
               "different hidden states, so their router values can move too.")
