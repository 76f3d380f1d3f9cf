"""Per-session state: every browser session keeps its own overrides, answers and traces in `st.session_state` and
passes them to the shared (stateless) service on each call. Messages raised in callbacks are queued as "flash"
messages and shown at the top of the next render."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

import streamlit as st

from app import presets
from app.service import Answer, Service
from atmoe import GenerationSettings, Overrides
from atmoe.router import GRANULARITIES

STOP_WAIT_S = 30.0
ERRORS = (ValueError, OSError)  # engine input errors (LoadError, BaseModelError are ValueErrors) and file errors


@dataclass(frozen=True)
class Request:
    """What the trace on show was routed for: the instruction, the note after it, and the routing granularity."""

    prompt: str
    input: str
    granularity: str


def embedded() -> bool:
    """`?embed=true` (Streamlit's own embed flag, which also drops its toolbar and padding; the page reads it through
    `st.context`, as `st.query_params` hides it): the link's view alone (no title, no sidebar, no prompt form)."""
    return bool(st.context.is_embedded)


def init() -> None:
    """Session defaults; on the first run, the view comes from the URL (a shared link): instruction `q`, note
    `note`, override preset `preset`, routing granularity `gran`; a link with an instruction is routed as soon as
    the model is loaded (`route_link`), so it opens on that routing's heatmaps. (`tab` and `model` are read by
    `app.main`.)"""
    ss = st.session_state
    if ss.get("_init"):
        return
    ss._init = True
    ss.setdefault("ov", None)            # current Overrides, never empty (None = router only)
    ss.setdefault("answer", None)        # latest Answer
    ss.setdefault("trace", None)         # RoutingTrace shown in the views
    ss.setdefault("trace_of", None)      # the Request that trace was routed for
    ss.setdefault("trace_version", 0)
    ss.setdefault("flash", [])
    qp = st.query_params
    if "q" in qp:
        ss["prompt"] = qp["q"]
    if "note" in qp:
        ss["note"] = qp["note"]
    if "preset" in qp:
        try:
            ov = presets.decode_url(qp["preset"])
            ss.ov = None if ov.is_empty() else ov
        except ValueError as e:
            flash("error", f"The override preset in the link was ignored: {e}")
    if qp.get("gran") in GRANULARITIES:
        ss["granularity"] = qp["gran"]
    ss._link_route = bool(str(qp.get("q", "")).strip())


def route_link(svc: Service) -> None:
    """Once per session, right after the first model is loaded: route the link's instruction with its overrides."""
    ss = st.session_state
    if not ss.pop("_link_route", False) or ss.get("trace_of") is not None:
        return
    prompt, note, granularity = ss.get("prompt", ""), ss.get("note", ""), ss.get("granularity", "sequence")
    try:
        set_trace(svc.route(prompt, note, ss.get("ov"), granularity), prompt, note, granularity)
    except ERRORS as e:
        flash("error", f"The instruction in the link could not be routed: {e}")


def reset_results(keep_overrides: bool) -> None:
    """Forget answers and traces (e.g. when another model is loaded)."""
    ss = st.session_state
    for k in ("answer", "trace", "trace_of", "compare", "batch", "_adapter_zip", "_sliders_for"):
        ss[k] = None
    if not keep_overrides:
        ss.ov = None


def flash(level: str, message: str) -> None:
    st.session_state.setdefault("flash", []).append((level, message))


def show_flash() -> None:
    for level, message in st.session_state.get("flash", []):
        getattr(st, level)(message)
    st.session_state.flash = []


def settings() -> GenerationSettings:
    """The generation settings form's values: the object the engine runs with."""
    ss = st.session_state
    return GenerationSettings(max_new_tokens=int(ss.get("max_new_tokens", GenerationSettings().max_new_tokens)),
                              temperature=float(ss.get("temperature", 0.0)), top_p=float(ss.get("top_p", 1.0)),
                              seed=int(ss.get("seed", 0)), granularity=ss.get("granularity", "sequence"),
                              merge=bool(ss.get("merge", False)), grounded=bool(ss.get("grounded", True)))


def set_trace(trace: Any, prompt: str, input: str, granularity: str) -> None:
    ss = st.session_state
    ss.trace, ss.trace_of = trace, Request(prompt, input, granularity)
    ss.trace_version = ss.get("trace_version", 0) + 1


def set_answer(answer: Answer, prompt: str, input: str) -> None:
    st.session_state.answer = answer
    set_trace(answer.trace, prompt, input, answer.trace.granularity)
    st.session_state.answer_of = (prompt, input)   # read by the Attribution tab after overrides re-route the trace


def adopt_pending() -> None:
    """Adopt an answer finished by a generation run (possibly one that a Stop click interrupted)."""
    box = st.session_state.get("_pending_answer")
    if not box:
        return
    if not box["done"].wait(timeout=STOP_WAIT_S):  # the stopped run ends after its current token
        return
    st.session_state._pending_answer = None
    if "answer" in box:
        set_answer(box["answer"], box["prompt"], box["note"])
        sync_url()


def sync_url() -> None:
    """Encode the current preset, the routed prompt (when short), its granularity (when not the default) and the
    model (by its launch name, when the server offers several; never a path) in the URL, so the link reproduces the
    view. The tab is bound to the URL by the tabs themselves (`app.main`)."""
    ss, qp = st.session_state, st.query_params
    model = ss.get("_model_name")
    if model:
        qp["model"] = model
    elif "model" in qp:
        del qp["model"]
    if ss.get("ov"):
        qp["preset"] = presets.encode_url(ss.ov)
    elif "preset" in qp:
        del qp["preset"]
    if ss.get("trace_of"):
        for key, value in (("q", ss.trace_of.prompt), ("note", ss.trace_of.input)):
            if value and len(value) <= 1500:
                qp[key] = value
            elif key in qp:
                del qp[key]
        if ss.trace_of.granularity != "sequence":
            qp["gran"] = ss.trace_of.granularity
        elif "gran" in qp:
            del qp["gran"]


def set_overrides(svc: Service, overrides: Overrides | None) -> str | None:
    """Validate and adopt `overrides`; re-route the current prompt so the heatmaps show them. Returns the error."""
    ss = st.session_state
    try:
        overrides = svc.check_overrides(overrides)
        if ss.get("trace_of"):
            r = ss.trace_of
            set_trace(svc.route(r.prompt, r.input, overrides, r.granularity), r.prompt, r.input, r.granularity)
    except ERRORS as e:
        return f"Overrides not applied: {e}"
    ss.ov = overrides
    if ss.get("answer") is not None and ss.answer.overrides != overrides:
        flash("info", "Routing updated for the new overrides. Press **Generate** to see the answer they give "
                      "(or use the Compare tab).")
    sync_url()
    return None


def new_stop_event() -> threading.Event:
    ev = threading.Event()
    st.session_state.stop_event = ev
    return ev


def request_stop() -> None:
    ev = st.session_state.get("stop_event")
    if ev is not None:
        ev.set()
