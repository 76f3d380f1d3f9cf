"""The "Why" tab renders the word attribution of the routed prompt and reacts to its controls (AppTest)."""

from __future__ import annotations

import json

import numpy as np
from app_session import NOTE, PROMPT, at, manifest  # noqa: F401 (at, manifest: fixtures)
from app_session import ok as _ok
from app_session import new_page, z_values
from streamlit.testing.v1 import AppTest

from app import explain_data
from atmoe import ATMoE
from tiny_models import tiny_demo


def _z(at: AppTest, key_part: str) -> np.ndarray:
    """The z of the plotly chart whose id contains `key_part`."""
    for chart in at.get("plotly_chart"):
        if key_part in chart.proto.id:
            return z_values(json.loads(chart.proto.spec)["data"][0])
    raise AssertionError(f"no plotly chart {key_part!r}")


def test_why_tab_explains_the_routed_prompt_and_reacts(at, manifest):
    assert any("Route or generate a prompt" in i.value for i in at.info)   # nothing routed yet
    at.text_area(key="prompt").input(PROMPT)
    at.text_area(key="note").input(NOTE)
    at.button(key="FormSubmitter:prompt_form-Route only").click().run()
    _ok(at)
    ex = at.session_state["_explanation"]["explanation"]
    m = ATMoE.load(manifest, device="cpu")
    assert ex.words == m.explain(PROMPT, NOTE).words == PROMPT.split()   # the instruction's words, not the note's
    target = at.selectbox(key="why_target")
    assert target.value == "group:task" and "bullets (expert)" in target.options
    assert not any("why_attention" in c.proto.id for c in at.get("plotly_chart"))   # mean pooling: nothing to show
    heat = _z(at, "why_heatmap")
    assert np.allclose(heat, ex.word_matrix("group:task").to_numpy())
    assert np.allclose(_z(at, "why_words")[0], ex.by_word("group:task").contribution)
    assert any("not** the word's effect on the answer" in c.value for c in at.caption)

    target.set_value("expert:bullets").run()
    _ok(at)
    after = _z(at, "why_heatmap")
    assert np.allclose(after, ex.word_matrix("expert:bullets").to_numpy()) and not np.allclose(after, heat)

    at.slider(key="why_layers").set_value((2, 2)).run()
    _ok(at)
    assert np.allclose(_z(at, "why_words")[0], ex.word_matrix("expert:bullets").loc[2])
    assert at.session_state["_explanation"]["explanation"] is ex   # re-slicing, not re-explaining


def test_sweep_in_the_why_tab(at):
    at.text_area(key="prompt").input(PROMPT)
    at.number_input(key="max_new_tokens").set_value(3)
    at.button(key="FormSubmitter:prompt_form-Route only").click().run()
    at.number_input(key="why_steps").set_value(2)
    at.button(key="FormSubmitter:why_sweep_form-Run sweep").click().run()
    _ok(at)
    done = at.session_state["_sweep"]
    assert done["target"] == "group:task" and done["prompt"] == PROMPT and list(done["frame"].weight) == [0.0, 1.0]
    assert any(md.value == "**w = 1.00**" for md in at.markdown)


def test_figures_are_literal_and_centred():
    class Fake:  # the two Explanation methods the figures read
        words = ["<b>bold</b>", "x"]
        relative = {"group": True}

        def by_word(self, target, layers):
            import pandas as pd
            return pd.DataFrame({"word": [0, 1], "text": self.words, "contribution": [0.5, -0.25]})

    fig = explain_data.words_figure(Fake(), "group:task", (0, 1))
    assert fig.data[0].text[0][0] == "&lt;b&gt;bold&lt;/b&gt;" and (fig.data[0].zmin, fig.data[0].zmax) == (-0.5, 0.5)


def test_why_tab_shows_where_each_group_looks_with_attention_pooling(tmp_path, monkeypatch):
    manifest = tiny_demo(tmp_path / "attention", mode="sigmoid", pooling="attention")
    monkeypatch.setenv("ATMOE_MANIFEST", str(manifest))
    at = new_page()
    at.text_area(key="prompt").input(PROMPT)
    at.text_area(key="note").input(NOTE)
    at.button(key="FormSubmitter:prompt_form-Route only").click().run()
    _ok(at)
    ex = at.session_state["_explanation"]["explanation"]
    L = ATMoE.load(manifest, device="cpu").num_layers
    shown = _z(at, "why_attention")
    assert np.allclose(shown, ex.attention_by_word((0, L - 1)).to_numpy())
    assert shown.shape == (3, len(PROMPT.split())) and np.allclose(shown.sum(1), 1)   # groups × words, rows sum to 1
    assert not np.allclose(shown, shown[:, :1])         # random queries: not the flat row of mean pooling
    at.slider(key="why_layers").set_value((1, 1)).run()
    _ok(at)
    assert np.allclose(_z(at, "why_attention"), ex.attention_by_word((1, 1)).to_numpy())
