"""Which models a dashboard page may load (chosen at launch, never by a visitor), and the override sliders' captions
(router value, fixed value, value in use). Streamlit AppTest on tiny demo models."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
from app_session import NOTE, PROMPT, SCRIPT, new_page
from app_session import ok as _ok
from app_session import z_values as _z
from streamlit.testing.v1 import AppTest
from tiny_models import tiny_demo

from app import launch
from app.launch import Launch, LaunchError
from app.service import DEFAULT_MANIFESTS, DEMO_SCOPE, Service, missing_manifest_message
from app.views.overrides import slider_notes


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> tuple[Path, Path]:
    """Two tiny demos: `alpha` (trained softmax router) and `beta` (untrained router, so the page tells them apart)."""
    root = tmp_path_factory.mktemp("models")
    return tiny_demo(root / "alpha"), tiny_demo(root / "beta", trained=False, seed=1)


def _app(monkeypatch, *args: str, env: str | None = None) -> AppTest:
    """A fresh session of a server started as `streamlit run streamlit_app.py -- *args` (sys.argv is what
    Streamlit sets), with $ATMOE_MANIFEST = env."""
    monkeypatch.setattr(sys, "argv", [SCRIPT, *args])
    if env is None:
        monkeypatch.delenv("ATMOE_MANIFEST", raising=False)
    else:
        monkeypatch.setenv("ATMOE_MANIFEST", env)
    return new_page()


def _loads(monkeypatch) -> list[str]:
    """Record every model load (the caches are cleared first, so each manifest loads once more at most)."""
    from app import main

    main.load_listed.clear()
    main.load_any.clear()
    calls: list[str] = []
    real = Service.load.__func__

    def load(cls, manifest, device="auto"):
        calls.append(str(manifest))
        return real(cls, manifest, device)

    monkeypatch.setattr(Service, "load", classmethod(load))
    return calls


# ---------------------------------------------------------------- launch arguments (pure)

def test_without_arguments_the_shipped_manifests_that_exist_are_offered(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (co_name, co), (stage1_name, stage1) = DEFAULT_MANIFESTS.items()
    assert launch.parse([]).manifests == {co_name: co}   # none built: the default, whose page says how to build
    assert "make assets" in missing_manifest_message(co)
    Path(stage1).parent.mkdir(parents=True)
    Path(stage1).write_text("{}")
    assert launch.parse([]).manifests == {stage1_name: stage1}
    Path(co).parent.mkdir(parents=True)
    Path(co).write_text("{}")
    assert launch.parse([]).manifests == {co_name: co, stage1_name: stage1}
    assert launch.parse(["--allow-any-manifest"]).allow_any


def test_launch_arguments_name_the_allowed_manifests(models, tmp_path):
    a, b = models
    assert launch.parse([], str(a)).paths == [str(a)]  # $ATMOE_MANIFEST alone replaces the default
    opts = launch.parse(["--manifest", str(a), "--manifest", str(b.parent), "--manifest", str(a)], str(b))
    assert opts.manifests == {"alpha": str(a), "beta": str(b.parent), "beta (2)": str(b)}  # a twice: offered once
    assert not opts.allow_any and opts.name_of(str(b)) == "beta (2)"
    # --models-dir: every */experts.json, then every *.json that is a manifest (not a results file).
    (tmp_path / "solo.json").write_text(a.read_text())
    (tmp_path / "results.json").write_text('{"mean": 0.1}')
    (tmp_path / "empty").mkdir()
    opts = launch.parse(["--models-dir", str(a.parents[1]), "--models-dir", str(tmp_path), "--allow-any-manifest"])
    assert opts.manifests == {"alpha": str(a), "beta": str(b), "solo": str(tmp_path / "solo.json")}
    assert opts.allow_any
    for argv, said in ((["--models-dir", str(tmp_path / "nope")], "no such folder"),
                       (["--models-dir", str(tmp_path / "empty")], "holds no manifest"),
                       (["--manifest"], "expected one argument"),
                       (["--manifest", " "], "empty"),
                       (["--manifests", "x"], "unrecognized arguments")):
        with pytest.raises(LaunchError, match=said):
            launch.parse(argv)
    with pytest.raises(LaunchError):
        Launch({})


def test_script_args_are_only_those_streamlit_passed(monkeypatch):
    monkeypatch.setattr(sys, "argv", [SCRIPT, "--manifest", "x"])
    assert launch.script_argv(SCRIPT) == ["--manifest", "x"]
    monkeypatch.setattr(sys, "argv", ["/usr/bin/pytest", "-q", "tests/test_app_models.py"])  # a test runner's own
    assert launch.script_argv(SCRIPT) == []


# ---------------------------------------------------------------- the page

def test_visitors_pick_among_launch_names_only(models, monkeypatch):
    a, b = models
    calls = _loads(monkeypatch)
    at = _app(monkeypatch, "--manifest", str(a), "--manifest", str(b))
    _ok(at)
    assert not at.text_input and not at.sidebar.text_input  # no free path box anywhere
    box = at.selectbox(key="manifest")
    assert box.options == ["alpha", "beta"] and box.value == str(a)  # names shown, first is the default
    assert not any("untrained" in c.value for c in at.sidebar.caption)
    at.text_area(key="prompt").input(PROMPT)
    at.button(key="FormSubmitter:prompt_form-Route only").click().run()
    assert at.session_state["trace"] is not None
    # Selecting the second allowed manifest loads it; the first model's results do not carry over.
    at.selectbox(key="manifest").select_index(1).run()
    _ok(at)
    assert at.session_state["_manifest_loaded"] == str(b) and at.session_state["trace"] is None
    assert any("(untrained: uniform)" in c.value for c in at.sidebar.caption)
    at.button(key="FormSubmitter:prompt_form-Route only").click().run()
    _ok(at)
    assert at.session_state["trace"].router_trained is False
    # Another session on alpha reuses the model loaded for the first: each listed manifest loads once.
    other = new_page()
    _ok(other)
    assert sorted(calls) == sorted([str(a), str(b)])


def test_missing_default_manifest_explains_how_to_build(monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)  # no assets/ here
    at = _app(monkeypatch)
    assert at.selectbox(key="manifest").options == [next(iter(DEFAULT_MANIFESTS))]
    assert any("No expert manifest" in e.value and "make assets" in e.value for e in at.error)
    at = _app(monkeypatch, env=str(tmp_path / "nowhere.json"))
    assert any("No expert manifest" in e.value and "--manifest" in e.value for e in at.error)


def test_the_shipped_demo_says_its_experts_are_not_a_clinical_tool(models, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    tiny_demo(Path(next(iter(DEFAULT_MANIFESTS.values()))).parent)   # stands in for the shipped default
    _loads(monkeypatch)                                                # no model cached from another folder
    at = _app(monkeypatch)
    _ok(at)
    assert DEMO_SCOPE in [i.value for i in at.info]
    at = _app(monkeypatch, env=str(models[0]))                         # a user's own model: no such notice
    _ok(at)
    assert DEMO_SCOPE not in [i.value for i in at.info]


def test_bad_launch_arguments_give_a_message_not_a_traceback(monkeypatch, tmp_path):
    for args, said in ((("--models-dir", str(tmp_path / "nope")), "no such folder"),
                       (("--manifset", "x"), "unrecognized arguments")):
        at = _app(monkeypatch, *args)
        assert any(said in e.value and "Usage" in e.value for e in at.error), [e.value for e in at.error]
        assert not at.selectbox and not at.text_input


def test_any_path_only_behind_the_launch_flag(models, monkeypatch, tmp_path):
    a, b = models
    calls = _loads(monkeypatch)
    at = _app(monkeypatch, "--manifest", str(a), "--allow-any-manifest")
    _ok(at)
    assert any("--allow-any-manifest" in c.value and "local use" in c.value for c in at.sidebar.caption)
    free = at.text_input(key="manifest_path")
    free.input(str(tmp_path / "nowhere.json")).run()
    assert any("No expert manifest" in e.value for e in at.error)
    (tmp_path / "notes.txt").write_text("not a manifest")
    at.text_input(key="manifest_path").input(str(tmp_path / "notes.txt")).run()
    assert not at.exception and any("could not be loaded" in e.value for e in at.error)
    # Free paths load apart from the listed models: trying two others does not evict alpha.
    for path in (b, b.parent):
        at.text_input(key="manifest_path").input(str(path)).run()
        _ok(at)
        assert at.session_state["_manifest_loaded"] == str(path)
    at.text_input(key="manifest_path").input("").run()
    _ok(at)
    assert at.session_state["_manifest_loaded"] == str(a)
    assert calls == [str(a), str(tmp_path / "notes.txt"), str(b), str(b.parent)]  # alpha loaded once


# ---------------------------------------------------------------- slider captions

def _caption_under(at: AppTest, key: str) -> str:
    """The first caption after the widget with `key` in the sidebar (page order)."""
    nodes = list(at.sidebar)
    i = next(i for i, n in enumerate(nodes) if getattr(n, "key", None) == key)
    return next(n.value for n in nodes[i + 1:] if n.type == "caption")


def test_slider_captions_tell_router_fixed_and_used_values(models, monkeypatch):
    a, _ = models
    at = _app(monkeypatch, "--manifest", str(a))
    at.text_area(key="prompt").input(PROMPT)
    at.text_area(key="note").input(NOTE)
    at.number_input(key="max_new_tokens").set_value(4)
    at.button(key="FormSubmitter:prompt_form-Generate").click().run()
    _ok(at)
    router = at.session_state["trace"]
    task, style = router.groups.index("task"), router.groups.index("style")
    r_task = float(router.router_group_weights[:, task].mean())
    assert _caption_under(at, "ov_g:task") == f"router {r_task:.2f} · in use {r_task:.2f}"  # nothing fixed yet
    # Fix style at 1.0 under the softmax router: the task group gets nothing, whatever its slider shows.
    at.slider(key="ov_g:style").set_value(1.0)
    at.button(key="FormSubmitter:overrides_form-Apply").click().run()
    _ok(at)
    tr = at.session_state["trace"]
    assert tr.mode == "softmax" and at.session_state["ov"].groups == {"style": 1.0}
    assert np.allclose(tr.group_weights[:, task], 0)
    r_task = float(tr.router_group_weights[:, task].mean())
    assert r_task > 0.05
    assert at.slider(key="ov_g:task").value == round(r_task, 2)  # the slider keeps the router's value ...
    task_note = _caption_under(at, "ov_g:task")
    assert task_note == f"router {r_task:.2f} · in use 0.00 (renormalised)"  # ... and its caption the used one
    heat = next(c for c in at.get("plotly_chart") if "group_heatmap" in c.proto.id)
    shown = _z(json.loads(heat.proto.spec)["data"][0])
    assert np.allclose(shown, tr.group_weights) and f"in use {shown[:, task].mean():.2f}" in task_note
    assert _caption_under(at, "ov_g:style").startswith("fixed 1.00 · router ")
    # Experts: a disabled one says so, the others in its group are renormalised around it.
    labs = tr.experts.index("labs")
    at.toggle(key="off_labs").set_value(True)
    at.button(key="FormSubmitter:overrides_form-Apply").click().run()
    _ok(at)
    tr = at.session_state["trace"]
    assert _caption_under(at, "ov_e:labs").startswith("off, in use 0.00 · router ")
    notes = slider_notes(tr, (0, tr.num_layers - 1))
    for e in tr.experts:
        assert _caption_under(at, f"ov_e:{e}") == notes[f"e:{e}"]
        i = tr.experts.index(e)
        assert f"effective α·β {tr.effective_weights[:, i].mean():.2f}" in notes[f"e:{e}"]
    mates = [i for i, g in enumerate(tr.expert_groups) if g == tr.expert_groups[labs] and i != labs]
    assert any("(renormalised)" in notes[f"e:{tr.experts[i]}"] for i in mates)
