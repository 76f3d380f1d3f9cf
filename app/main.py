"""Page layout: sidebar (model, overrides), then one tab per view. Each view lives in `app/views/`."""

from __future__ import annotations

import os
from collections.abc import Sequence

import streamlit as st

from app import launch, state
from app.launch import Launch, LaunchError
from app.service import Service, missing_manifest_message
from app.views import atlas, attribution, batch, catalog, compare, explain, export, overrides, prompt, tokens


def launch_options(argv: Sequence[str]) -> Launch | None:
    """The manifests this server offers (see `app.launch`); bad launch arguments become a message on the page."""
    try:
        return launch.parse(argv, os.environ.get("ATMOE_MANIFEST"))
    except LaunchError as e:
        st.error(f"The dashboard was started with unusable arguments: {e}.\n\nUsage: `{launch.USAGE}`")
        return None


@st.cache_resource(max_entries=None, show_spinner="Loading the model (once per process)…")
def load_listed(manifest: str) -> Service:
    """One model per launch-listed manifest, shared by every session (the engine keeps no per-request state).
    Only paths from the launch list reach this cache, so it holds at most that many models and nothing a visitor
    does evicts the model another session is using."""
    return Service.load(manifest)


@st.cache_resource(max_entries=1, show_spinner="Loading the model…")
def load_any(manifest: str) -> Service:
    """A model from the free path box (--allow-any-manifest, local use): one at a time, apart from the listed ones."""
    return Service.load(manifest)


def _choose(options: Launch) -> tuple[str, bool]:
    """Sidebar model choice → (manifest path, whether it is from the launch list)."""
    with st.sidebar:
        st.header("Model")
        path = st.selectbox("Expert manifest", options.paths, key="manifest", format_func=options.name_of,
                            help="The models this server was started with (`--manifest`, `--models-dir`)")
        if options.allow_any:
            free = st.text_input("…or any manifest path on this server", key="manifest_path",
                                 help="Path to an experts.json (or its folder). Press Enter to load.").strip()
            st.caption(":warning: Started with `--allow-any-manifest`: whoever opens this page can load any path "
                       "on the server. For local use only.")
            if free:
                return free, False
    return path, True


def get_service(options: Launch) -> Service | None:
    path, listed = _choose(options)
    listed = listed or path in options.paths  # a listed path typed into the free box shares the listed model
    missing = missing_manifest_message(path)
    if missing:
        st.error(missing)
        return None
    try:
        svc = load_listed(path) if listed else load_any(path)
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


def main(argv: Sequence[str] = ()) -> None:
    """The page; `argv` are the launch arguments (`streamlit run streamlit_app.py -- …`)."""
    st.set_page_config(page_title="AT-MoE dashboard", page_icon="🧭", layout="wide")
    state.init()
    st.title("AT-MoE: which experts answer, layer by layer")
    options = launch_options(argv)
    if options is None:
        return
    svc = get_service(options)
    if svc is None:
        return
    state.adopt_pending()
    with st.container():  # always present, so the tabs below keep their place (and selection) across reruns
        state.show_flash()
    views = {"Prompt & routing": prompt, "Compare": compare, "Per token": tokens, "Why": explain, "Batch": batch,
             "Attribution": attribution, "Atlas": atlas, "Experts": catalog, "Export & presets": export}
    for tab, view in zip(st.tabs(list(views), key="view"), views.values(), strict=True):
        with tab:
            view.render(svc)
    with st.sidebar:  # last, so its sliders start from the trace this run produced
        overrides.render(svc)
