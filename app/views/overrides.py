"""The sidebar's overrides: override the router. One form — nothing is applied until **Apply** is pressed.

Sliders start at the router's own α/β for the current prompt, averaged over the applied layer range. Only sliders moved
away from that value (and disabled experts) become fixed overrides: in softmax mode fixed group weights are a share of
a budget of 1 and the free groups split the rest, so sending every slider as fixed would over-constrain the router.
A free slider therefore shows the router's value, not the renormalised one the model uses; the caption under each
slider gives both (and the fixed value), from the last routing.
"""

from __future__ import annotations

import numpy as np
import streamlit as st

from app import presets, state
from app.service import Service
from atmoe import Overrides, RoutingTrace


def slider_notes(trace: RoutingTrace, layers: tuple[int, int]) -> dict[str, str]:
    """Per slider ('g:…' / 'e:…'), means over `layers` (inclusive) of `trace`: the router's value, the value fixed
    and the value in use — e.g. 'router 0.74 · in use 0.00 (renormalised)' or 'fixed 1.00 · router 0.12'."""
    rows = slice(layers[0], layers[1] + 1)
    source = trace.overrides or Overrides()
    fixed_groups, disabled = source.groups, set(source.disabled)

    def mean(weights: np.ndarray, i: int) -> float:
        return float(np.mean(weights[rows, i]))

    notes = {}
    for i, g in enumerate(trace.groups):
        router, used = mean(trace.router_group_weights, i), mean(trace.group_weights, i)
        if trace.group_overridden[rows, i].any():
            how = f"fixed {used:.2f}" if g in fixed_groups else f"off, in use {used:.2f} (every expert disabled)"
            notes[f"g:{g}"] = f"{how} · router {router:.2f}"
        else:
            notes[f"g:{g}"] = _free(router, used)
    effective = trace.effective_weights
    for i, e in enumerate(trace.experts):
        router, used = mean(trace.router_expert_weights, i), mean(trace.expert_weights, i)
        if trace.expert_overridden[rows, i].any():
            note = f"{'off, in use' if e in disabled else 'fixed'} {used:.2f} · router {router:.2f}"
        else:
            note = _free(router, used)
        notes[f"e:{e}"] = f"{note} · effective α·β {mean(effective, i):.2f}"
    return notes


def _free(router: float, used: float) -> str:
    same = f"{router:.2f}" == f"{used:.2f}"
    return f"router {router:.2f} · in use {used:.2f}" + ("" if same else " (renormalised)")


def _layers(svc: Service) -> tuple[int, int]:
    ov = st.session_state.get("ov")
    return ov.layers if ov is not None and ov.layers is not None else (0, svc.num_layers - 1)


def _sync_widgets(svc: Service) -> None:
    """When a new trace or preset arrives, move every widget to router values + the preset's fixed values."""
    ss = st.session_state
    trace = ss.trace
    stamp = (ss.trace_version, repr(ss.get("ov")))
    if ss.get("_sliders_for") == stamp:
        return
    layers = _layers(svc)
    base = presets.slider_base(trace.router_group_weights, trace.router_expert_weights, trace.groups, trace.experts,
                               layers)
    values = presets.slider_values(base, ss.get("ov"))
    for k, v in values.items():
        ss[f"ov_{k}"] = v
    disabled = ss.ov.disabled if ss.get("ov") is not None else ()
    for e in svc.experts:
        ss[f"off_{e}"] = e in disabled
    ss["ov_layers"] = layers
    ss._slider_base, ss._sliders_for = base, stamp


def _apply(svc: Service) -> None:
    ss = st.session_state
    values = {k: ss[f"ov_{k}"] for k in ss._slider_base}
    disabled = [e for e in svc.experts if ss.get(f"off_{e}")]
    layers = tuple(ss["ov_layers"])
    if layers != _layers(svc):  # a new range changes the router's averages: compare against the new base
        trace = ss.trace
        new_base = presets.slider_base(trace.router_group_weights, trace.router_expert_weights, trace.groups,
                                       trace.experts, layers)
        moved = {k: v for k, v in values.items() if abs(v - ss._slider_base[k]) > 1e-6}
        values = {**new_base, **moved}
        base = new_base
    else:
        base = ss._slider_base
    try:
        ov = presets.overrides_from_sliders(values, base, disabled, layers, svc.num_layers)
    except ValueError as e:
        state.flash("error", f"Overrides not applied: {e}")
        return
    error = state.set_overrides(svc, ov)
    if error:
        state.flash("error", error)


def _reset(svc: Service) -> None:
    error = state.set_overrides(svc, None)
    if error:
        state.flash("error", error)
    st.session_state._sliders_for = None


def render(svc: Service) -> None:
    st.header("Overrides")
    ss = st.session_state
    if ss.get("trace") is None:
        st.info("Generate (or route) a prompt first: the sliders start at the router's values for it.")
        if ss.get("ov"):
            st.caption(f"Preset loaded: {presets.describe(ss.ov)}")
        return
    _sync_widgets(svc)
    L = svc.num_layers
    a, b = _layers(svc)
    notes = slider_notes(ss.trace, (a, b))
    with st.form("overrides_form", border=False):
        st.slider("Layer range", 0, L - 1, key="ov_layers", help="Overrides apply to these decoder layers "
                  "(inclusive); the sliders show the router's mean over the applied range")
        st.caption(f"A slider sits at the router's value, or at the value you fixed. Under it, means over layers "
                   f"{a}–{b} of the last routing: the router's value and the value in use (free weights share "
                   f"what the fixed ones leave).")
        st.subheader("Group weights α")
        for g in svc.groups:
            st.slider(f"α {g}", 0.0, 1.0, step=0.01, key=f"ov_g:{g}",
                      help=f"Router's mean: {ss._slider_base[f'g:{g}']:.2f}. Move to fix it.")
            st.caption(notes[f"g:{g}"])
        for g in svc.groups:
            st.subheader(f"Experts in {g} (β)")
            for e in svc.layout.experts_of(g):
                c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
                c1.slider(f"β {e}", 0.0, 1.0, step=0.01, key=f"ov_e:{e}",
                          help=f"Router's mean: {ss._slider_base[f'e:{e}']:.2f}. Within a group β sums to 1.")
                c2.toggle("off", key=f"off_{e}", help=f"Disable {e}")
                st.caption(notes[f"e:{e}"])
        c1, c2 = st.columns(2)
        c1.form_submit_button("Apply", type="primary", on_click=_apply, args=(svc,), width="stretch")
        c2.form_submit_button("Reset to router", on_click=_reset, args=(svc,), width="stretch")
    st.caption(f"In effect: {presets.describe(ss.get('ov'))}")
