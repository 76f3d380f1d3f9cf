"""The dashboard says plainly when no expert is engaged, and that token mode is an analysis view (issue 24).

AppTest on tiny demos: the softmax one of `app_session`, a sigmoid one (independent gates, which overrides can close
one by one), and a tiny demo standing in for the shipped default (the token-mode note speaks of the shipped router).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
from app_session import NOTE, PROMPT, SCRIPT, at, generate, manifest, new_page, ok  # noqa: F401 (at, manifest: fixtures)
from streamlit.testing.v1 import AppTest
from tiny_models import tiny_demo

from app.service import DEFAULT_MANIFESTS
from demo.config import TOKEN_MODE_NOTE

ENGAGED_NONE = "No expert engaged"


def _generate(at: AppTest, granularity: str = "sequence") -> AppTest:
    return generate(at, granularity=granularity, max_new_tokens=4)


def _apply(at: AppTest, **widgets: object) -> AppTest:
    """Set sidebar override widgets (by key) and press Apply."""
    for key, value in widgets.items():
        (at.toggle(key=key) if key.startswith("off_") else at.slider(key=key)).set_value(value)
    at.button(key="FormSubmitter:overrides_form-Apply").click().run()
    ok(at)
    return at


def _said(at: AppTest) -> list[str]:
    return [i.value for i in at.info if ENGAGED_NONE in i.value]


@pytest.fixture(scope="module")
def sigmoid_manifest(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tiny_demo(tmp_path_factory.mktemp("sigmoid"), mode="sigmoid")


@pytest.fixture()
def sigmoid_at(sigmoid_manifest: Path, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    monkeypatch.setenv("ATMOE_MANIFEST", str(sigmoid_manifest))
    return new_page()


def test_every_expert_off_says_the_model_is_the_base_model(at: AppTest) -> None:
    _generate(at)
    assert not _said(at) and not at.session_state["answer"].trace.stays_out()   # a softmax router always engages
    experts = list(at.session_state["answer"].trace.experts)
    _apply(at, **{f"off_{e}": True for e in experts})
    _generate(at)
    assert at.session_state["answer"].trace.experts_off
    said = _said(at)
    assert len(said) == 1 and "every expert's weight is 0 on every layer" in said[0] and "base model" in said[0]


def test_low_gates_are_said_without_claiming_the_base_model_and_one_open_gate_silences_it(sigmoid_at: AppTest) -> None:
    at = _generate(sigmoid_at)
    trace = at.session_state["answer"].trace
    assert trace.engaged_groups() and not _said(at)                 # the random router opens some gate
    low = {f"ov_g:{g}": 0.2 for g in trace.groups}
    _apply(at, **low)
    _generate(at)
    said = _said(at)
    assert len(said) == 1 and "every group gate stayed ≤ 0.3 on every layer (highest" in said[0]
    assert "not exactly the base model" in said[0] and "0.20" in said[0]
    _generate(at, granularity="token")
    said = _said(at)
    assert len(said) == 1 and "on every layer and every token" in said[0]
    _apply(at, **{**low, "ov_g:style": 0.5})                       # one gate opens: the page no longer says it
    _generate(at)
    assert at.session_state["answer"].trace.engaged_groups() == ["style"] and not _said(at)


@pytest.fixture()
def shipped_at(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """A page serving a tiny demo at the shipped default's path (the server started with no arguments)."""
    from app import main

    monkeypatch.chdir(tmp_path)
    tiny_demo(Path(next(iter(DEFAULT_MANIFESTS.values()))).parent)
    monkeypatch.setattr(sys, "argv", [SCRIPT])
    monkeypatch.delenv("ATMOE_MANIFEST", raising=False)
    main.load_listed.clear()         # the shipped path is relative: no model cached from another folder
    yield new_page()
    main.load_listed.clear()


def _token_notes(at: AppTest) -> int:
    return [i.value for i in at.info].count(TOKEN_MODE_NOTE)


def test_token_mode_says_it_is_an_analysis_view_of_the_shipped_router(shipped_at: AppTest) -> None:
    at = _generate(shipped_at)
    assert _token_notes(at) == 0
    _generate(at, granularity="token")
    assert _token_notes(at) == 2                                    # under the form, and on the Per token tab
    _generate(at)
    assert _token_notes(at) == 0


def test_a_users_own_model_gets_no_note_about_the_shipped_router(at: AppTest) -> None:
    _generate(at, granularity="token")
    assert _token_notes(at) == 0


def test_values_the_prompt_does_not_hold_are_named_under_the_answer(at: AppTest, manifest: Path) -> None:
    """The grounding line (`atmoe.grounding`): the answer's values absent from instruction and note, and the
    measurements the manifest declares that the answer writes a value for and they do not name (by any of a
    measurement's names: sodium is the note's Na; a mention without a value is no measurement), nothing else."""
    import dataclasses

    from app.views.prompt import unsupported_note
    from atmoe.load.manifest import Manifest

    _generate(at)
    prompt, note = at.session_state["answer_of"]
    declared = Manifest.load(manifest).measurements
    assert NOTE in note and "120" not in prompt + note and "Hb" not in prompt + note
    cases = (("Hb 120 and Hb 120, 7", ["120", "7"], ["Hb"]), (note, [], []),
             ("sodium 128, temperature 128", [], ["temperature"]), ("heart rate 135, temperature high", [], []))
    for text, values, names in cases:
        at.session_state["answer"] = dataclasses.replace(at.session_state["answer"], text=text)
        at.run()
        ok(at)
        shown = [w.value for w in at.warning if "not in your instruction or note" in w.value]
        assert shown == ([unsupported_note(text, prompt, note, declared)] if values or names else [])
        assert not values or f"Values not in your instruction or note**: {', '.join(values)}." in shown[0]
        assert not names or f"Measurements not in your instruction or note**: {', '.join(names)}." in shown[0]


def test_a_request_the_stay_out_head_keeps_out_says_so(sigmoid_manifest: Path, tmp_path: Path,
                                                        monkeypatch: pytest.MonkeyPatch) -> None:
    """A router whose stay-out head keeps every request out: the page says the head decided, with its score."""
    import shutil

    import torch

    from atmoe.load.manifest import Manifest
    from atmoe.router import load_router, save_router
    from atmoe.train.stay_out import with_head

    folder = tmp_path / "kept"
    shutil.copytree(sigmoid_manifest.parent, folder)
    path = Manifest.load(folder / sigmoid_manifest.name).router_path()
    router = with_head(load_router(path))
    with torch.no_grad():
        router.stay_bias.fill_(20.0)
    save_router(router, path)
    monkeypatch.setenv("ATMOE_MANIFEST", str(folder / sigmoid_manifest.name))
    at = _generate(new_page())
    said = _said(at)
    assert at.session_state["answer"].trace.kept_out
    assert len(said) == 1 and "stay-out head judged this request outside every expert's skill (score 1.00 ≥ 0.50)" \
        in said[0] and "the answer is the base model's" in said[0]
