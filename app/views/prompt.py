"""The Prompt & routing tab: prompt and streamed answer, then the group and expert heatmaps of its routing."""

from __future__ import annotations

import threading
from collections.abc import Sequence

import streamlit as st

from app import figures, presets, state
from app.examples import examples
from app.service import DEMO_SCOPE, Answer, Service
from app.text import md_escape
from atmoe import GenerationSettings, RoutingTrace
from atmoe.grounding import unsupported_measurements, unsupported_values
from atmoe.router import GRANULARITIES
from atmoe.trace import STAY_OUT
from demo.config import TOKEN_MODE_NOTE


def _use_example(ex: dict[str, str]) -> None:
    st.session_state.prompt, st.session_state.note = ex["instruction"], ex["input"]


def _example_buttons() -> None:
    st.caption("Examples from the held-out set, combinations no router trained on first: one click fills the form")
    exs = examples(5)
    cols = st.columns(len(exs))
    for i, (col, ex) in enumerate(zip(cols, exs)):
        col.button(ex["label"], key=f"example_{i}", on_click=_use_example, args=(ex,), width="stretch",
                   help=ex["instruction"])


def _form(svc: Service) -> str | None:
    """The prompt form; returns 'generate' / 'route' when submitted."""
    with st.form("prompt_form"):
        st.text_area("Instruction", key="prompt", height=90,
                     placeholder="e.g. List the lab results. Flag each as low, normal or high. Use bullet points.")
        st.text_area("Input (optional clinical note)", key="note", height=90)
        with st.expander("Generation settings"):
            c = st.columns(5)
            c[0].number_input("Max new tokens", 1, 1024, GenerationSettings().max_new_tokens, key="max_new_tokens")
            c[1].slider("Temperature (0 = greedy)", 0.0, 2.0, 0.0, 0.05, key="temperature")
            c[2].slider("Top-p", 0.05, 1.0, 1.0, 0.05, key="top_p")
            c[3].number_input("Seed", 0, 2**31 - 1, 0, key="seed")
            c[4].radio("Routing granularity", list(GRANULARITIES), key="granularity", horizontal=True,
                       help="sequence: one routing per prompt (the paper's); token: re-routed at every token, "
                            "for the per-token view")
            st.checkbox("Fast decode (merged weights)", value=svc.merge_default, key="merge",
                        help=f"Batch 1, sequence routing: once the prompt has fixed the weights, each projection "
                             f"group decodes with one merged weight W0 + Σ w·B·A, written into buffers the model "
                             f"keeps once used (+{svc.merge_mb:.0f} MB; the base weights are never changed). Same "
                             f"answer within float rounding; off = the base weights and one low-rank expand per "
                             f"projection group, no extra copy.")
        st.checkbox("Only values from the instruction and note", value=True, key="grounded",
                    help="Grounded decoding: the answer may write a number only when the instruction or the note "
                         "writes it, or an expert declares it in the manifest (the reference ranges); a value is "
                         "never left half-written; no value follows the name of a measurement the manifest declares "
                         "(sodium, heart rate, …) unless the instruction or note names it. An answer may come out "
                         "incomplete, never with an invented value. Off: the model writes any number, and the "
                         "warning under the answer names those that neither source holds.")
        b = st.columns([1, 1, 4])
        gen = b[0].form_submit_button("Generate", type="primary")
        route = b[1].form_submit_button("Route only", help="Routing heatmaps without generating")
    st.caption(f"Overrides in effect: {md_escape(presets.describe(st.session_state.get('ov')))}")
    return "generate" if gen else "route" if route else None


def _generate(svc: Service, prompt: str, note: str) -> None:
    """Stream the answer token by token. A Stop click (or any rerun, or a closed tab) interrupts the script inside
    `write_stream` — or, with fast reruns, starts the next run while this one winds down. Either way the `finally`
    stops the engine and leaves the partial answer in a plain dict (Streamlit calls may raise in a run being
    stopped); the next run waits for it and adopts it (`state.adopt_pending`)."""
    stop = state.new_stop_event()
    pending: dict = {"prompt": prompt, "note": note, "done": threading.Event()}
    st.session_state._pending_answer = pending
    stream = svc.stream(prompt, note, state.settings(), st.session_state.get("ov"), stop)
    pieces: list[str] = []
    result: list[Answer] = []

    def text_only():
        for item in stream:
            if isinstance(item, Answer):
                result.append(item)
                return
            pieces.append(item)
            yield md_escape(item)  # write_stream renders Markdown: model text must not be interpreted

    try:
        with st.container(border=True):
            st.write_stream(text_only())
    finally:
        if not result:  # interrupted: stop after the current token and collect the routing so far
            stop.set()
            try:
                for item in stream:
                    (result if isinstance(item, Answer) else pieces).append(item)
            except state.ERRORS:
                pass
            stream.close()
        if result:
            pending["answer"] = result[0]
        pending["done"].set()
    state.adopt_pending()


def _short(text: str, n: int = 80) -> str:
    return text if len(text) <= n else text[:n - 1] + "…"


def _show_answer(svc: Service, text: bool = True) -> None:
    ans: Answer | None = st.session_state.get("answer")
    if ans is None:
        st.info("Type an instruction (or pick an example) and press **Generate**.")
        return
    ss = st.session_state
    asked, request = tuple(ss.get("answer_of") or ("", "")), ss.get("trace_of")
    if (request is not None and (request.prompt, request.input) != asked) or ans.overrides != ss.get("ov"):
        st.info(f"**Earlier answer**: generated for “{md_escape(_short(asked[0]))}” with overrides "
                f"{md_escape(presets.describe(ans.overrides))}. The heatmaps below are the routing of the current "
                "instruction and overrides; press **Generate** for their answer.")
    if text:  # (just streamed answers are already on the page)
        with st.container(border=True):
            st.markdown(md_escape(ans.text) if ans.text.strip() else "_(empty answer)_")
    st.caption(f"{ans.new_tokens} tokens in {ans.seconds:.2f} s · {ans.tokens_per_second:.1f} tokens/s · "
               f"prompt {ans.prompt_tokens} tokens · finished: {ans.finish_reason} · "
               f"{'fast decode (merged weights)' if ans.merged else 'fused experts'} · "
               f"{'only values from the instruction and note' if ans.settings.grounded else 'any value'} · overrides: "
               f"{md_escape(presets.describe(ans.overrides))}")
    manifest = svc.model.manifest
    warning = unsupported_note(ans.text, *asked, measurements=manifest.measurements if manifest else ())
    if warning:
        st.warning(warning)


def unsupported_note(answer: str, prompt: str, note: str, measurements: Sequence[Sequence[str]] = ()) -> str | None:
    """The line that names the values of an answer that neither the instruction nor the note writes, and the
    measurements the manifest declares that the answer gives a value for and they do not name; or None."""
    values = unsupported_values(answer, prompt, note)
    names = unsupported_measurements(answer, measurements, prompt, note)
    if not values and not names:
        return None
    parts = []
    if values:
        shown = ", ".join(values[:12]) + (f" and {len(values) - 12} more" if len(values) > 12 else "")
        parts.append(f"**Values not in your instruction or note**: {md_escape(shown)}. They come from the model — an "
                     "expert's knowledge (such as a reference range) or invented: check each against a source.")
    if names:
        parts.append(f"**Measurements not in your instruction or note**: {md_escape(', '.join(names))}. The answer "
                     "writes a value for them, and nothing you gave measured them: a value under the wrong name.")
    return "\n\n".join(parts)


def stays_out_note(trace: RoutingTrace) -> str | None:
    """The line that says the routing kept every expert out (`RoutingTrace.stays_out`), or None when it did not.
    Exact about what follows: only weights of exactly 0 give the base model; low gates still add the experts."""
    if not trace.stays_out():
        return None
    where = "on every layer" + (" and every token" if trace.granularity == "token" else "")
    if trace.kept_out and trace.experts_off:
        return (f"**No expert engaged**: the router's stay-out head judged this request outside every expert's skill "
                f"(score {trace.head_score:.2f} ≥ {trace.head_threshold:.2f}), so every expert's weight is 0 {where} — "
                "the answer is the base model's. Overrides still apply: fix a group's weight in the sidebar to "
                "engage it.")
    if trace.experts_off:
        return (f"**No expert engaged**: every expert's weight is 0 {where}, so the experts add nothing — with this "
                "routing the model is the base model (within float rounding).")
    highest = trace.highest_group_weights
    top = int(highest.argmax())
    return (f"**No expert engaged**: every group gate stayed ≤ {STAY_OUT} {where} (highest: "
            f"{md_escape(trace.groups[top])} {highest[top]:.2f}). The experts still add their updates scaled by "
            "these gates, so the model is not exactly the base model (that needs every weight at 0).")


def heatmaps() -> None:
    trace = st.session_state.get("trace")
    if trace is None:
        return
    note = stays_out_note(trace)
    if note:
        st.info(note)
    left, right = st.columns([2, 3])
    with left:
        st.plotly_chart(figures.group_heatmap(trace), key="group_heatmap", width="stretch")
        means = trace.group_weights.mean(0)
        st.caption("Mean α over layers — " + " · ".join(f"{g} α (mean) = {v:.2f}"
                                                        for g, v in zip(trace.groups, means)))
    with right:
        level = st.segmented_control("Expert weight", ["effective", "expert"], key="expert_level",
                                     format_func={"effective": "effective α·β", "expert": "within-group β"}.get,
                                     default="effective") or "effective"
        st.plotly_chart(figures.expert_heatmap(trace, level), key="expert_heatmap", width="stretch")
    notes = []
    if not trace.router_trained:
        notes.append("the router is untrained, so its weights are uniform")
    if trace.fallback_layers:
        notes.append(f"layers {trace.fallback_layers} fell back to uniform weights (non-finite hidden states)")
    if notes:
        st.warning("Note: " + "; ".join(notes) + ".")


def render(svc: Service) -> None:
    if svc.shipped_demo:
        st.info(DEMO_SCOPE)
    _example_buttons()
    action = _form(svc)
    if svc.shipped_demo and st.session_state.get("granularity") == "token":   # what the shipped router is for
        st.info(TOKEN_MODE_NOTE)
    st.button("Stop generating", key="stop", on_click=state.request_stop,
              help="Stops the running generation after the current token")
    ss = st.session_state
    streamed = False
    if action:
        prompt, note = ss.get("prompt", ""), ss.get("note", "")
        try:
            if action == "generate":
                _generate(svc, prompt, note)
                streamed = True
            else:
                state.set_trace(svc.route(prompt, note, ss.get("ov"), ss.get("granularity", "sequence")),
                                prompt, note, ss.get("granularity", "sequence"))
                state.sync_url()
        except state.ERRORS as e:
            st.error(f"Cannot {action} this prompt: {e}")
    _show_answer(svc, text=not streamed)
    heatmaps()
