"""View 4 (sidebar): override the router. One form — nothing is applied until **Apply** is pressed.

Sliders start at the router's own α/β for the current prompt, averaged over the applied layer range. Only sliders moved
away from that value (and disabled experts) become fixed overrides: in softmax mode fixed group weights are a share of
a budget of 1 and the free groups split the rest, so sending every slider as fixed would over-constrain the router.
"""

from __future__ import annotations

import streamlit as st

from app import presets, state
from app.service import Service


def _layers(svc: Service) -> tuple[int, int]:
    ov = st.session_state.get("ov") or {}
    return tuple(ov["layers"]) if ov.get("layers") else (0, svc.num_layers - 1)


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
    disabled = (ss.get("ov") or {}).get("disabled") or []
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
    with st.form("overrides_form", border=False):
        st.slider("Layer range", 0, L - 1, key="ov_layers", help="Overrides apply to these decoder layers "
                  "(inclusive); the sliders show the router's mean over the applied range")
        st.subheader("Group weights α")
        for g in svc.groups:
            st.slider(f"α {g}", 0.0, 1.0, step=0.01, key=f"ov_g:{g}",
                      help=f"Router's mean: {ss._slider_base[f'g:{g}']:.2f}. Move to fix it.")
        for g in svc.groups:
            st.subheader(f"Experts in {g} (β)")
            for e in [e for e in svc.experts if svc.expert_groups[e] == g]:
                c1, c2 = st.columns([3, 1], vertical_alignment="bottom")
                c1.slider(f"β {e}", 0.0, 1.0, step=0.01, key=f"ov_e:{e}",
                          help=f"Router's mean: {ss._slider_base[f'e:{e}']:.2f}. Within a group β sums to 1.")
                c2.toggle("off", key=f"off_{e}", help=f"Disable {e}")
        c1, c2 = st.columns(2)
        c1.form_submit_button("Apply", type="primary", on_click=_apply, args=(svc,), width="stretch")
        c2.form_submit_button("Reset to router", on_click=_reset, args=(svc,), width="stretch")
    st.caption(f"In effect: {presets.describe(ss.get('ov'))}")
