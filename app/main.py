"""Page layout: sidebar (model, overrides), then one tab per view. Each view lives in `app/views/`.

A link opens a view: `q`, `note`, `preset`, `gran` (see `app.state`), `tab` (a tab's label) and `model` (a model this
server was started with, by its name or its place in the list from 0 — never a path). `embed=true` shows that view
alone, for an iframe in a paper's supplementary page or a notebook: no title, no sidebar, no prompt form."""

from __future__ import annotations

import os
from collections.abc import Sequence

import streamlit as st

from app import launch, presets, state
from app.launch import Launch, LaunchError
from app.service import Service, missing_manifest_message
from app.text import md_escape
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


def model_from_link(options: Launch, value: str) -> str:
    """The manifest path of the model a link names (`model=`: a launch name, or its index from 0 in launch order).
    ValueError for anything else — a path above all: visitors choose among the server's models, never a file."""
    value = value.strip()
    names = list(options.manifests)
    offered = ", ".join(f"{i} = {n}" for i, n in enumerate(names))
    if any(c in value for c in "/\\") or value.lower().endswith(".json") or value in ("", ".", ".."):
        raise ValueError(f"The link names the model `{value}`: a link names one of this server's models by its name "
                         f"or number, never a path. This server offers: {offered}.")
    if value in options.manifests:
        return options.manifests[value]
    if value.isdigit() and int(value) < len(names):
        return options.paths[int(value)]
    raise ValueError(f"The link names the model `{value}`, which this server does not offer. It offers: {offered}. "
                     f"Open the page without `model=` (or with one of these) to see a view.")


def get_service(options: Launch, link_path: str | None = None) -> Service | None:
    """The model to show: the sidebar's choice, or (embedded) the link's model or the first one."""
    if state.embedded():
        path, listed = link_path or options.paths[0], True
    else:
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
    st.session_state._model_name = (options.name_of(path) if listed and path in options.paths
                                    and len(options.paths) > 1 else None)
    if state.embedded():
        return svc
    info = svc.info()
    st.sidebar.caption(f"{info['base_model']} · {info['layers']} layers · {len(svc.experts)} experts in "
                       f"{len(svc.groups)} groups · {info['device']} / {info['dtype']} · router "
                       f"{info['router']['mode']}{'' if info['router']['trained'] else ' (untrained: uniform)'}")
    return svc


def main(argv: Sequence[str] = ()) -> None:
    """The page; `argv` are the launch arguments (`streamlit run streamlit_app.py -- …`)."""
    st.set_page_config(page_title="AT-MoE dashboard", page_icon="🧭", layout="wide",
                       initial_sidebar_state="collapsed" if state.embedded() else "auto")
    state.init()
    if not state.embedded():   # embedded: Streamlit's embed mode drops its chrome; the page writes no sidebar
        st.title("AT-MoE: which experts answer, layer by layer")
    options = launch_options(argv)
    if options is None:
        return
    link_path = None
    if "model" in st.query_params:
        try:
            link_path = model_from_link(options, str(st.query_params["model"]))
        except ValueError as e:
            st.error(str(e))
            return
        if st.session_state.get("_link_model") != link_path:  # once per link: the sidebar may choose another later
            st.session_state._link_model = st.session_state["manifest"] = link_path
    svc = get_service(options, link_path)
    if svc is None:
        return
    state.route_link(svc)
    state.adopt_pending()
    with st.container():  # always present, so the tabs below keep their place (and selection) across reruns
        state.show_flash()
    if state.embedded():
        embed(svc)
        return
    for tab, view in zip(st.tabs(list(VIEWS), key="tab", bind="query-params"), VIEWS.values(), strict=True):
        with tab:
            view.render(svc)
    with st.sidebar:  # last, so its sliders start from the trace this run produced
        overrides.render(svc)
    state.sync_url()


VIEWS = {"Prompt & routing": prompt, "Compare": compare, "Per token": tokens, "Why": explain, "Batch": batch,
         "Attribution": attribution, "Atlas": atlas, "Experts": catalog, "Export & presets": export}

def embed(svc: Service) -> None:
    """The link's tab alone; the routing tab shows just its heatmaps, under one line saying what was routed."""
    name = str(st.query_params.get("tab", next(iter(VIEWS))))
    if name not in VIEWS:
        st.error(f"The link names the tab `{name}`; the views are: {', '.join(VIEWS)}.")
        return
    if VIEWS[name] is not prompt:
        VIEWS[name].render(svc)
        return
    ss = st.session_state
    if ss.get("trace_of") is None:
        st.info("This link names no instruction to route (`q=`).")
        return
    st.caption(f"“{md_escape(prompt._short(ss.trace_of.prompt, 120))}” · overrides: "
               f"{md_escape(presets.describe(ss.get('ov')))} · granularity {ss.trace_of.granularity}")
    prompt.heatmaps()
