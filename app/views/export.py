"""The Export & presets tab: download the trace, save / load override presets (also encoded in the URL), export the
routing as one PEFT LoRA adapter."""

from __future__ import annotations

from urllib.parse import urlencode

import streamlit as st

from app import presets, state
from app.service import Service


def page_link() -> str:
    """The page's full link: its address and every query parameter it carries now (`q`, `note`, `preset`, `gran`,
    `model`, as `state.sync_url` writes them, and `tab`); "" while it carries none."""
    params = st.query_params.to_dict()
    if not params:
        return ""
    base = (getattr(st.context, "url", None) or "").split("?")[0]
    return f"{base}?{urlencode(params)}"


def _load_preset(svc: Service) -> None:
    ss = st.session_state
    up = st.file_uploader("Load a preset (JSON)", type=["json"], key="preset_file")
    if up is None:
        ss.pop("_preset_msg", None)
        return
    if ss.get("_preset_file") != up.file_id:  # handle each upload once, not on every rerun
        ss._preset_file = up.file_id
        try:
            ov = presets.from_json(up.getvalue())
            error = state.set_overrides(svc, ov)
            ss._preset_msg = ("error", f"Preset {up.name} does not fit this model. {error}") if error else \
                ("success", f"Preset loaded: {presets.describe(ov)}")
        except ValueError as e:
            ss._preset_msg = ("error", f"Invalid preset {up.name}: {e}")
    level, msg = ss.get("_preset_msg", ("info", ""))
    if msg:
        getattr(st, level)(msg)


def render(svc: Service) -> None:
    ss = st.session_state
    trace = ss.get("trace")
    st.subheader("Routing trace")
    if trace is None:
        st.info("Generate or route a prompt to export its trace.")
    else:
        c1, c2 = st.columns(2)
        c1.download_button("Trace as CSV", trace.to_frame().to_csv(index=False), "atmoe_trace.csv", "text/csv",
                           key="dl_trace_csv")
        c2.download_button("Trace as JSON", trace.to_json(), "atmoe_trace.json", "application/json",
                           key="dl_trace_json")

    st.subheader("Override preset")
    st.caption(f"Current: {presets.describe(ss.get('ov'))}")
    st.download_button("Save preset (JSON)", presets.to_json(ss.get("ov")), "atmoe_preset.json", "application/json",
                       key="dl_preset")
    _load_preset(svc)
    link = page_link()
    if link:
        st.caption("This view's link (instruction, note, override preset and tab, as in the page's URL): share it "
                   "to reproduce the view; it opens routed.")
        st.code(link, language=None)
        st.caption("Add `&embed=true` for the view alone (no sidebar, no form), e.g. in a paper's supplementary "
                   "page or a notebook: `IPython.display.IFrame(link + '&embed=true', width=1000, height=600)`.")

    st.subheader("Freeze this routing into one LoRA adapter")
    st.caption("Bakes the per-layer weights w[l, e] = α·β into one standard PEFT LoRA (exact for sequence-level "
               "routing): load it with `PeftModel.from_pretrained(base, folder)` — no router needed.")
    if trace is None:
        return
    if trace.granularity != "sequence":
        st.info("Token-level routing changes at every token; route with granularity **sequence** to export.")
        return
    use = st.radio("Weights", ["used", "router"], horizontal=True, key="export_use",
                   format_func={"used": "used (with overrides)", "router": "router's own"}.get)
    if st.button("Build adapter", key="export_build"):
        try:
            with st.spinner("Exporting…"):
                ss._adapter_zip = {"trace_version": ss.trace_version, "use": use,
                                   "zip": svc.export_adapter_zip(trace, use)}
        except state.ERRORS as e:
            st.error(f"Export failed: {e}")
    built = ss.get("_adapter_zip")
    if built and (built["trace_version"], built["use"]) == (ss.trace_version, use):
        st.download_button("Download adapter (.zip)", built["zip"], "atmoe_adapter.zip", "application/zip",
                           key="dl_adapter")
