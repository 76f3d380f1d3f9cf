"""The Why tab: which words of the instruction pushed the router toward a group or expert (exact logit terms), and
an optional sweep of that weight from 0 to 1."""

from __future__ import annotations

import streamlit as st

from app import explain_data, state
from app.service import Service
from app.text import md_escape


def _explanation(svc: Service, prompt: str, note: str):  # -> Explanation | None
    """This session's explanation of the routed prompt, computed once per prompt and model."""
    ss = st.session_state
    of = {"model": svc.source, "prompt": prompt, "note": note}
    cached = ss.get("_explanation")
    if cached is None or cached["of"] != of:
        try:
            with st.spinner("Explaining the routing…"):
                cached = {"of": of, "explanation": svc.explain(prompt, note)}
        except state.ERRORS as e:
            st.error(f"Cannot explain this prompt: {e}")
            return None
        ss._explanation = cached
    return cached["explanation"]


def _sweep(svc: Service, prompt: str, note: str, target: str) -> None:
    ss = st.session_state
    with st.expander("Sweep this weight from 0 to 1 (generates once per step)"):
        with st.form("why_sweep_form"):
            steps = st.number_input("Steps", 2, 11, 3, key="why_steps")
            run = st.form_submit_button("Run sweep")
        if run:
            try:
                with st.spinner("Generating one answer per step…"):
                    frame = svc.sweep(prompt, note, target, int(steps), state.settings())
                ss._sweep = {"target": target, "prompt": prompt, "note": note, "frame": frame}
            except state.ERRORS as e:
                st.error(f"Cannot sweep: {e}")
        done = ss.get("_sweep")
        if done and (done["prompt"], done["note"]) == (prompt, note):
            st.caption(f"{explain_data.target_label(done['target'])} fixed at each weight on every layer; same prompt, "
                       "settings and seed (the Generation settings of the Prompt tab).")
            cols = st.columns(len(done["frame"]))
            for col, row in zip(cols, done["frame"].itertuples()):
                box = col.container(border=True)
                box.markdown(f"**w = {row.weight:.2f}**")
                box.markdown(md_escape(row.text) if row.text.strip() else "_(empty answer)_")


def render(svc: Service) -> None:
    ss = st.session_state
    if not ss.get("trace_of"):
        st.info("Route or generate a prompt in **Prompt & routing** to see which of its words drove the routing.")
        return
    prompt, note = ss.trace_of.prompt, ss.trace_of.input
    ex = _explanation(svc, prompt, note)
    if ex is None:
        return
    L = svc.num_layers
    c1, c2 = st.columns([2, 3], vertical_alignment="bottom")
    target = c1.selectbox("Explain the weight of", ex.targets, key="why_target", format_func=explain_data.target_label)
    layers = c2.slider("Layers (one, a range, or all = the mean)", 0, L - 1, (0, L - 1), key="why_layers")
    layers = (int(layers[0]), int(layers[1]))
    st.plotly_chart(explain_data.words_figure(ex, target, layers), key="why_words", width="stretch")
    t = explain_data.terms(ex, target, layers)
    rel = " relative to the mean of the members normalised together (softmax: only differences matter)" \
        if t["relative"] else " (a sigmoid gate: absolute)"
    st.caption(f"Logit{rel}: {t['logit']:+.3f} = Σ words + bias {t['bias']:+.3f} (mean over the chosen layers). "
               f"The router reads the {'instruction' if ex.reads == 'instruction' else 'whole prompt'}"
               + {"last": " — **last** pooling: only its last token counts.",
                  "attention": " — **attention** pooling: each group weighs the tokens with its own learnt query."
                  }.get(ex.pooling, "."))
    if ex.attention is not None:
        st.plotly_chart(explain_data.attention_figure(ex, layers), key="why_attention", width="stretch")
        st.caption("Attention pooling: each group's router reads the instruction through its own learnt weights over "
                   "the tokens (each row sums to 1; a flat row would be mean pooling). These weights are part of the "
                   "terms above.")
    st.plotly_chart(explain_data.heatmap_figure(ex, target), key="why_heatmap", width="stretch")
    st.caption(explain_data.CAPTION)
    _sweep(svc, prompt, note, target)
