"""Page layout: sidebar (model, overrides), then one tab per view. Each view lives in `app/views/`."""

from __future__ import annotations

import argparse
import os
import sys

import streamlit as st

from app import state
from app.service import DEFAULT_MANIFEST, Service, missing_manifest_message
from app.views import batch, catalog, compare, export, overrides, prompt, tokens


def manifest_from_args(argv: list[str] | None = None) -> str:
    """`-- --manifest PATH`, else $ATMOE_MANIFEST, else the shipped default."""
    parser = argparse.ArgumentParser(add_help=False)
    parser.add_argument("--manifest", default=None)
    args, _ = parser.parse_known_args(sys.argv[1:] if argv is None else argv)
    return args.manifest or os.environ.get("ATMOE_MANIFEST") or DEFAULT_MANIFEST


@st.cache_resource(max_entries=2, show_spinner="Loading the model (once per process)…")
def load_service(manifest: str) -> Service:
    """One model per manifest path, shared by every session (the engine keeps no per-request state)."""
    return Service.load(manifest)


def get_service() -> Service | None:
    with st.sidebar:
        st.header("Model")
        path = st.text_input("Expert manifest", value=manifest_from_args(), key="manifest",
                             help="Path to an experts.json (or its folder). Press Enter to load.").strip()
    missing = missing_manifest_message(path)
    if missing:
        st.error(missing)
        return None
    try:
        svc = load_service(path)
    except state.ERRORS as e:
        st.error(f"The model in `{path}` could not be loaded: {e}")
        return None
    if st.session_state.get("_manifest_loaded") != path:  # another model: earlier results do not apply to it
        state.reset_results(keep_overrides=st.session_state.get("_manifest_loaded") is None)
        st.session_state._manifest_loaded = path
        if st.session_state.get("ov"):
            try:
                svc.check_overrides(st.session_state.ov)
            except ValueError as e:
                st.session_state.ov = None
                state.flash("warning", f"The override preset does not fit this model and was dropped: {e}")
    info = svc.info()
    st.sidebar.caption(f"{info['base_model']} · {info['layers']} layers · {len(svc.experts)} experts in "
                       f"{len(svc.groups)} groups · {info['device']} / {info['dtype']} · router "
                       f"{info['router']['mode']}{'' if info['router']['trained'] else ' (untrained: uniform)'}")
    return svc


def main() -> None:
    st.set_page_config(page_title="AT-MoE dashboard", page_icon="🧭", layout="wide")
    state.init()
    st.title("AT-MoE: which experts answer, layer by layer")
    svc = get_service()
    if svc is None:
        return
    state.adopt_pending()
    with st.container():  # always present, so the tabs below keep their place (and selection) across reruns
        state.show_flash()
    views = {"Prompt & routing": prompt, "Compare": compare, "Per token": tokens, "Batch": batch,
             "Experts": catalog, "Export & presets": export}
    for tab, view in zip(st.tabs(list(views), key="view"), views.values(), strict=True):
        with tab:
            view.render(svc)
    with st.sidebar:  # last, so its sliders start from the trace this run produced
        overrides.render(svc)
