"""Links that open a view (issue 23 §5): the page's URL carries the instruction, note, override preset, granularity,
tab and model (by name or index, never a path); `?embed=true` shows that view alone. Streamlit AppTest on the tiny
demo; the same link in a real browser is in tests/test_browser.py."""

from __future__ import annotations

import json

import numpy as np
import pytest
from app_session import NOTE, PROMPT, manifest, new_page, ok, z_values  # noqa: F401 (manifest: fixture)

from app import presets
from app.launch import Launch
from app.main import model_from_link
from app.text import md_escape
from atmoe import Overrides

PRESET = Overrides.from_dict({"groups": {"style": 0.0}, "layers": [1, 3]})


@pytest.fixture()
def served(manifest, monkeypatch):  # noqa: F811 (the fixture)
    monkeypatch.setenv("ATMOE_MANIFEST", str(manifest))
    return manifest


def _open(params: dict[str, str], embed: bool = False):
    at = new_page(run=False)
    at.query_params.update(params)
    if embed:
        at.context = {"is_embedded": True}   # what Streamlit's frontend reports for `?embed=true`
    return at.run()


def _group_z(at) -> np.ndarray:
    fig = next(json.loads(c.proto.spec) for c in at.get("plotly_chart") if "group_heatmap" in c.proto.id)
    return z_values(fig["data"][0])


def test_a_link_opens_its_instruction_overrides_and_tab_routed(served):
    at = _open({"q": PROMPT, "note": NOTE, "preset": presets.encode_url(PRESET), "tab": "Why"})
    ok(at)
    assert at.text_area(key="prompt").value == PROMPT and at.text_area(key="note").value == NOTE
    assert at.session_state["ov"] == PRESET
    trace = at.session_state["trace"]          # routed on opening: the heatmaps show the link's view
    assert trace.overrides == PRESET
    assert (at.session_state["trace_of"].prompt, at.session_state["trace_of"].input) == (PROMPT, NOTE)
    style = trace.groups.index("style")
    assert np.allclose(trace.group_weights[1:4, style], 0) and not np.allclose(trace.group_weights[0, style], 0)
    assert np.allclose(_group_z(at), trace.group_weights)
    assert at.session_state["tab"] == "Why"
    assert at.query_params["tab"] in ("Why", ["Why"])
    assert len(at.sidebar.slider) > 0 and any("AT-MoE" in t.value for t in at.title)   # the full page


def test_embed_shows_the_view_alone(served):
    at = _open({"q": PROMPT, "note": NOTE, "preset": presets.encode_url(PRESET), "gran": "token"}, embed=True)
    ok(at)
    assert not at.title and not at.text_area and not at.sidebar.slider and not at.sidebar.selectbox
    assert not at.get("tab") and not at.button       # no tabs, no forms: the view alone
    trace = at.session_state["trace"]
    assert trace.overrides == PRESET and trace.granularity == "token"
    assert np.allclose(_group_z(at), trace.group_weights)
    assert any(md_escape(PROMPT[:40]) in c.value and md_escape("style α=0.00") in c.value for c in at.caption)
    experts = _open({"tab": "Experts"}, embed=True)
    ok(experts)
    assert experts.dataframe and not experts.get("plotly_chart") and not experts.sidebar.slider
    unknown = _open({"tab": "Nope"}, embed=True)
    assert not unknown.exception and any("Nope" in e.value for e in unknown.error)


def test_a_link_names_a_model_by_name_or_index_never_a_path(served):
    name = served.parent.name
    for value in (name, "0"):
        at = _open({"model": value, "q": PROMPT})
        ok(at)
        assert at.session_state["trace"] is not None
    for value, said in (("nope", "does not offer"), ("7", "does not offer"), (str(served), "never a path"),
                        (str(served.parent), "never a path"), ("../" + name, "never a path"),
                        ("experts.json", "never a path")):
        for embed in (False, True):
            at = _open({"model": value, "q": PROMPT}, embed=embed)
            assert not at.exception
            assert [e.value for e in at.error if said in e.value and name in e.value], (value, embed)
            assert at.session_state["trace"] is None and not at.get("plotly_chart")   # nothing loaded or shown
    with_free_box = Launch({"a": str(served)}, allow_any=True)     # even a server with a free path box
    with pytest.raises(ValueError, match="never a path"):
        model_from_link(with_free_box, str(served))
    assert model_from_link(with_free_box, "a") == model_from_link(with_free_box, "0") == str(served)


def test_the_url_follows_the_view(served):
    at = new_page()
    at.text_area(key="prompt").input(PROMPT)
    at.radio(key="granularity").set_value("token")
    at.button(key="FormSubmitter:prompt_form-Route only").click().run()
    ok(at)
    assert at.query_params["q"] in (PROMPT, [PROMPT]) and at.query_params["gran"] in ("token", ["token"])
    assert "model" not in at.query_params        # one model served: the link need not name it
    # That URL opened afresh gives the same routing.
    again = _open({k: v if isinstance(v, str) else v[0] for k, v in at.query_params.items()})
    ok(again)
    assert np.allclose(_group_z(again), _group_z(at))


def test_with_several_models_the_link_names_its_model(tmp_path_factory, monkeypatch):
    import sys

    from app_session import SCRIPT
    from tiny_models import tiny_demo

    root = tmp_path_factory.mktemp("link_models")
    a, b = tiny_demo(root / "alpha"), tiny_demo(root / "beta", trained=False, seed=1)
    monkeypatch.setattr(sys, "argv", [SCRIPT, "--manifest", str(a), "--manifest", str(b)])   # as streamlit sets it
    monkeypatch.delenv("ATMOE_MANIFEST", raising=False)
    for params, embed in (({"model": "beta", "q": PROMPT}, False), ({"model": "1", "q": PROMPT}, True)):
        at = _open(params, embed=embed)
        ok(at)
        assert at.session_state["_manifest_loaded"] == str(b) and at.session_state["trace"].router_trained is False
    assert at.query_params["model"] in ("1", ["1"])                  # embedded: the link is left as it came
    at = _open({"model": "beta", "q": PROMPT})
    at.selectbox(key="manifest").select_index(0).run()              # the visitor picks the other model
    ok(at)
    assert at.query_params["model"] in ("alpha", ["alpha"])          # the URL follows, by name
