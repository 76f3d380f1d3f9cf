"""The dashboard renders and reacts (Streamlit AppTest on the tiny demo model), plus its pure helpers."""

from __future__ import annotations

import io
import json
import re
import threading
import zipfile
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from app_session import (  # noqa: F401 (at, manifest: fixtures)
    NOTE,
    PROMPT,
    at,
    manifest,
    new_page,
)
from app_session import ok as _ok
from app_session import z_values as _z
from streamlit.testing.v1 import AppTest
from tiny_models import tiny_demo

from app import batch_data, examples, figures, presets
from app.service import Service
from app.text import md_escape, word_diff
from atmoe import ATMoE, GenerationSettings, Overrides, RoutingTrace
from atmoe.model import expert


def _generate(at: AppTest, prompt: str = PROMPT, note: str = NOTE, tokens: int = 6, granularity: str = "sequence"):
    at.text_area(key="prompt").input(prompt)
    at.text_area(key="note").input(note)
    at.number_input(key="max_new_tokens").set_value(tokens)
    at.radio(key="granularity").set_value(granularity)
    return at.button(key="FormSubmitter:prompt_form-Generate").click().run()


def _figure(at: AppTest, key_part: str) -> dict:
    """The plotly JSON of the chart whose element id contains `key_part`."""
    for chart in at.get("plotly_chart"):
        if key_part in chart.proto.id:
            return json.loads(chart.proto.spec)
    raise AssertionError(f"no plotly chart {key_part!r}")


def _apply(at: AppTest) -> AppTest:
    return at.button(key="FormSubmitter:overrides_form-Apply").click().run()


def test_prompt_streams_answer_and_heatmaps_match_trace(at):
    _generate(at)
    _ok(at)
    ans = at.session_state["answer"]
    trace: RoutingTrace = at.session_state["trace"]
    assert ans.new_tokens >= 1 and ans.prompt_tokens > 0 and ans.finish_reason in ("eos", "length")
    assert any("tokens/s" in c.value for c in at.caption)
    group = _figure(at, "group_heatmap")["data"][0]
    assert np.allclose(_z(group), trace.group_weights)
    assert (group["zmin"], group["zmax"]) == (0, 1)
    assert np.allclose(_z(_figure(at, "expert_heatmap")["data"][0]), trace.effective_weights)
    at.button_group(key="expert_level").set_value("expert").run()
    assert np.allclose(_z(_figure(at, "expert_heatmap")["data"][0]), trace.expert_weights)
    # The trace is the engine's routing of this prompt.
    m = ATMoE.load(Path(at.session_state["manifest"]), device="cpu")
    assert np.allclose(m.route(PROMPT, input=NOTE).group_weights, trace.group_weights, atol=1e-5)


def test_fast_decode_toggle_reaches_the_engine(at):
    assert at.checkbox(key="merge").value is True  # the tiny model's merged copy is far under the 1 GiB rule
    _generate(at)
    _ok(at)
    merged = at.session_state["answer"]
    assert merged.settings.merge is True and merged.merged
    assert any("fast decode (merged weights)" in c.value for c in at.caption)
    at.checkbox(key="merge").uncheck()
    _generate(at)
    _ok(at)
    fused = at.session_state["answer"]
    assert fused.settings.merge is False and not fused.merged
    assert any("fused experts" in c.value for c in at.caption)
    assert fused.text == merged.text and np.allclose(fused.trace.group_weights, merged.trace.group_weights)


def test_answers_write_only_values_from_the_instruction_and_note_unless_turned_off(at):
    """Grounded decoding is the dashboard's default: sampled hot, the tiny random model still writes no value that
    neither the instruction nor the note holds; unticked, the setting reaches the engine off and the caption says so."""
    from atmoe.grounding import unsupported_values

    assert at.checkbox(key="grounded").value is True
    at.slider(key="temperature").set_value(2.0)
    for seed in range(3):
        at.number_input(key="seed").set_value(seed)
        _generate(at, tokens=16)
        _ok(at)
        ans = at.session_state["answer"]
        assert ans.settings.grounded and unsupported_values(ans.text, PROMPT, NOTE) == [], ans.text
    assert any("only values from the instruction and note" in c.value for c in at.caption)
    at.checkbox(key="grounded").uncheck()
    _generate(at, tokens=16)
    _ok(at)
    assert at.session_state["answer"].settings.grounded is False and any("any value" in c.value for c in at.caption)


def test_one_settings_object_reaches_the_engine(at, monkeypatch):
    """The dashboard builds one `GenerationSettings` per request and the engine decodes with that very object: the
    form's granularity and fast-decode box reach `ATMoE`, and the answer records what ran (no second settings class
    whose fields could drift from the engine's)."""
    from app import service

    seen: list[GenerationSettings] = []
    real = ATMoE._generate_rows

    def spy(self, prompts, inputs, settings, *args, **kwargs):
        seen.append(settings)
        return real(self, prompts, inputs, settings, *args, **kwargs)

    monkeypatch.setattr(ATMoE, "_generate_rows", spy)
    assert not hasattr(service, "Settings")
    _generate(at, granularity="token")  # fast decode on (the tiny model's default), token routing
    _ok(at)
    token = at.session_state["answer"]
    assert type(token.settings) is GenerationSettings and seen[-1] is token.settings
    assert (token.settings.granularity, token.settings.merge) == ("token", True)
    assert token.trace.granularity == "token" and not token.merged  # merging applies to sequence routing only
    at.checkbox(key="merge").uncheck()
    _generate(at, granularity="sequence")
    _ok(at)
    fused = at.session_state["answer"]
    assert seen[-1] is fused.settings and (fused.settings.granularity, fused.settings.merge) == ("sequence", False)
    assert fused.trace.granularity == "sequence" and not fused.merged
    at.button(key="compare_run").click().run()  # Compare generates twice with the one settings object
    _ok(at)
    cmp = at.session_state["compare"]
    assert cmp["plain"].settings is cmp["changed"].settings is seen[-1] is seen[-2]


def test_moving_one_group_slider_fixes_only_that_group(at):
    _generate(at)
    before = at.session_state["trace"]
    style = before.groups.index("style")
    assert at.slider(key="ov_g:style").value == round(float(before.router_group_weights[:, style].mean()), 2)
    at.slider(key="ov_g:style").set_value(0.0)
    _apply(at)
    _ok(at)
    ov = at.session_state["ov"]
    assert isinstance(ov, Overrides)  # the session keeps the object; dicts only at the JSON / URL edges
    assert ov.groups == {"style": 0.0} and not ov.experts and not ov.disabled  # only the moved slider
    after = at.session_state["trace"]
    assert np.allclose(after.group_weights[:, style], 0) and after.group_overridden[:, style].all()
    assert np.allclose(after.group_weights.sum(1), 1, atol=1e-5)
    assert not np.allclose(after.group_weights, before.group_weights)
    fig = _figure(at, "group_heatmap")
    assert np.allclose(_z(fig["data"][0]), after.group_weights)
    assert len(fig["data"]) == 2 and len(fig["data"][1]["x"]) == after.num_layers  # overridden cells marked
    assert any("style α (mean) = 0.00" in c.value for c in at.caption)
    link = at.query_params["preset"]
    assert presets.decode_url(link if isinstance(link, str) else link[0]) == ov  # the link reproduces the preset
    # Reset to router: no overrides, router weights again.
    at.button(key="FormSubmitter:overrides_form-Reset to router").click().run()
    _ok(at)
    assert at.session_state["ov"] is None
    assert np.allclose(at.session_state["trace"].group_weights, before.group_weights, atol=1e-6)


def test_layer_range_and_disable(at):
    _generate(at)
    at.slider(key="ov_layers").set_value((2, 3))
    at.toggle(key="off_labs").set_value(True)
    _apply(at)
    _ok(at)
    assert at.session_state["ov"].to_dict() == {"groups": {}, "experts": {}, "layers": [2, 3], "disabled": ["labs"]}
    tr = at.session_state["trace"]
    t = tr.experts.index("labs")
    assert np.allclose(tr.expert_weights[2:, t], 0) and not np.allclose(tr.expert_weights[:2, t], 0)


def test_bad_inputs_show_errors_not_tracebacks(at):
    at.button(key="FormSubmitter:prompt_form-Generate").click().run()
    assert not at.exception and any("empty" in e.value for e in at.error)
    _generate(at, prompt="word " * 600, note="")
    assert not at.exception and any("shorten the prompt" in e.value for e in at.error)
    _generate(at)  # a valid prompt, then overrides the softmax budget refuses
    at.slider(key="ov_g:task").set_value(0.9)
    at.slider(key="ov_g:style").set_value(0.9)
    _apply(at)
    assert not at.exception and any("sum" in e.value for e in at.error)
    assert at.session_state["ov"] is None
    uploader = at.file_uploader(key="preset_file")
    uploader.set_value(("preset.json", b"{not json", "application/json")).run()
    assert not at.exception and any("not valid JSON" in e.value for e in at.error)
    at.file_uploader(key="preset_file").set_value(("p.json", b'{"groups": {"nope": 0.5}}', "application/json")).run()
    assert not at.exception and any("nope" in e.value for e in at.error)


def test_preset_file_and_link_round_trip(at, manifest, monkeypatch):
    _generate(at)
    preset = {"groups": {"style": 0.1}, "experts": {"labs": 1.0}, "layers": [1, 3], "disabled": []}
    at.file_uploader(key="preset_file").set_value(("p.json", json.dumps(preset).encode(), "application/json")).run()
    _ok(at)
    assert at.session_state["ov"].to_dict() == preset and at.slider(key="ov_g:style").value == 0.1
    assert at.session_state["trace"].group_overridden[1:, at.session_state["trace"].groups.index("style")].all()
    # A fresh session opened with that link starts from the same preset and prompt.
    link = new_page(run=False)
    link.query_params.update({"preset": presets.encode_url(Overrides.from_dict(preset)), "q": PROMPT})
    link.run()
    assert link.session_state["ov"].to_dict() == preset and link.text_area(key="prompt").value == PROMPT
    bad = new_page(run=False)
    bad.query_params["preset"] = "%%%"
    bad.run()
    assert not bad.exception and any("ignored" in e.value for e in bad.error)


@pytest.fixture(scope="module")
def sigmoid_manifest(tmp_path_factory) -> Path:
    """Independent group gates: an override of one group leaves every other weight as the router's."""
    return tiny_demo(tmp_path_factory.mktemp("app_sigmoid"), mode="sigmoid")


@pytest.fixture()
def downloads(monkeypatch) -> dict[str, bytes]:
    """The bytes behind every download button, by the media id in the button's URL."""
    from streamlit.runtime.memory_media_file_storage import MemoryMediaFileStorage

    files: dict[str, bytes] = {}
    real = MemoryMediaFileStorage.load_and_get_id

    def load_and_get_id(self, path_or_data, mimetype, kind, filename=None):
        file_id = real(self, path_or_data, mimetype, kind, filename)
        files[file_id] = path_or_data.encode() if isinstance(path_or_data, str) else bytes(path_or_data)
        return file_id

    monkeypatch.setattr(MemoryMediaFileStorage, "load_and_get_id", load_and_get_id)
    return files


def _download(at: AppTest, files: dict[str, bytes], label: str) -> bytes:
    for d in at.get("download_button"):
        if d.proto.label.startswith(label):
            return files[Path(d.proto.url).stem]
    raise AssertionError(f"no download button {label!r}")


def test_compare_view_shows_what_the_override_changed(sigmoid_manifest, monkeypatch):
    """Compare: the two answers differ, and the change heatmaps are non-zero exactly in the overridden group's
    columns (sigmoid gates: overriding one group leaves every other weight as the router's)."""
    monkeypatch.setenv("ATMOE_MANIFEST", str(sigmoid_manifest))
    at = new_page()
    _generate(at)
    at.slider(key="ov_g:style").set_value(0.0)
    _apply(at)
    at.button(key="compare_run").click().run()
    _ok(at)
    cmp = at.session_state["compare"]
    plain, changed = cmp["plain"], cmp["changed"]
    assert plain.overrides is None and changed.overrides == at.session_state["ov"] == Overrides.from_dict(
        {"groups": {"style": 0.0}, "experts": {}, "layers": None, "disabled": []})
    assert plain.text != changed.text
    assert plain.settings == changed.settings  # same prompt, settings and seed: only the overrides differ
    tr = changed.trace
    style = tr.groups.index("style")
    delta = _figure(at, "delta_groups")["data"][0]
    assert delta["zmid"] == 0 and list(delta["x"]) == tr.groups
    z = _z(delta)
    assert (np.abs(z[:, style]) > 1e-3).all()                       # the overridden column changed on every layer
    np.testing.assert_allclose(np.delete(z, style, axis=1), 0, atol=1e-7)  # and nothing else did
    np.testing.assert_allclose(z[:, style], -tr.router_group_weights[:, style], atol=1e-6)
    z = _z(_figure(at, "delta_experts")["data"][0])
    in_style = tr.group_index == style
    assert (np.abs(z[:, in_style]) > 1e-4).all()
    np.testing.assert_allclose(z[:, ~in_style], 0, atol=1e-7)
    # The two answers are on the page, each in its own column.
    shown = " ".join(m.value for m in at.markdown)
    for text in (plain.text, changed.text):
        for word in md_escape(text).split()[:2]:
            assert word in shown


def test_per_token_view_rows_match_the_trace(at):
    _generate(at, granularity="token")
    _ok(at)
    ans = at.session_state["answer"]
    tr, p = ans.trace, ans.prompt_tokens
    # every token the model read: the last answer token is never fed back (N tokens, N − 1 decode steps)
    assert tr.granularity == "token" and len(tr.tokens) == p + ans.new_tokens - 1
    alpha, beta = tr.token_group_weights, tr.token_expert_weights           # [T, L, G], [T, L, E]
    heat = _figure(at, "token_heatmap")["data"][0]
    assert heat["zmax"] == 1 and list(heat["y"]) == tr.groups
    assert list(heat["x"]) == list(range(p, len(tr.tokens)))                 # answer tokens only (the default)
    np.testing.assert_allclose(_z(heat), alpha[p:].mean(1).T, atol=1e-6)   # one row per group, mean over layers
    # Dominant group of each answer token, shown as its group's colour, in order.
    from app.views.tokens import COLOURS

    best = alpha[p:].mean(1).argmax(-1)
    expected = [COLOURS[g] for g, t in zip(best, tr.tokens[p:]) if md_escape(t.replace("\n", "↵")).strip()]
    shown = next(m.value for m in at.markdown if "-background[" in m.value)
    assert len(expected) >= 3
    assert re.findall(r":(\w+)-background\[", shown) == expected
    # One expert's α·β over a layer range, prompt tokens included.
    at.slider(key="tok_layers").set_value((1, 2))
    at.selectbox(key="tok_colour").set_value("labs")
    at.checkbox(key="tok_answer_only").uncheck().run()
    _ok(at)
    heat = _figure(at, "token_heatmap")["data"][0]
    e = tr.experts.index("labs")
    g = tr.groups.index(tr.expert_groups[e])
    assert list(heat["y"]) == ["labs α·β"] and list(heat["x"]) == list(range(len(tr.tokens)))
    np.testing.assert_allclose(_z(heat), (alpha[:, 1:3, g] * beta[:, 1:3, e]).mean(1)[None], atol=1e-6)


def test_batch_view_statistics_equal_the_service(at, manifest):
    csv = (b"instruction,input,category\nList the lab results.,Labs: Na 128.,labs\nUse bullet points.,,bullets\n"
           b"Give the vital signs in plain words.,HR 135,vitals\nList the lab values.,K 5.9,labs\n,,x\n")
    at.radio(key="batch_source").set_value("upload").run()
    at.file_uploader(key="batch_file").set_value(("b.csv", csv, "text/csv")).run()
    at.button(key="batch_run").click().run()
    _ok(at)
    summary = at.session_state["batch"]["summary"]
    rows = summary["rows"]
    table = [("List the lab results.", "Labs: Na 128."), ("Use bullet points.", ""),
             ("Give the vital signs in plain words.", "HR 135"), ("List the lab values.", "K 5.9")]
    assert rows["instruction"].tolist() == [i for i, _ in table]            # the empty row was skipped
    svc = Service.load(str(manifest), device="cpu")
    traces = [svc.route(i, n) for i, n in table]
    alpha = np.stack([t.group_weights for t in traces])                   # [N, L, G]
    beta = np.stack([t.expert_weights for t in traces]).mean(1)           # [N, E]
    for gi, g in enumerate(svc.groups):
        np.testing.assert_allclose(rows[f"α {g}"], alpha[:, :, gi].mean(1), atol=1e-4)
        cols = np.nonzero(traces[0].group_index == gi)[0]
        assert rows[f"top {g}"].tolist() == [svc.experts[cols[i]] for i in beta[:, cols].argmax(1)]
    assert len(np.unique(alpha.mean(1).round(3), axis=0)) > 1             # rows really route differently
    # The charts: mean α per layer over the rows, and mean α per category.
    lines = _figure(at, "batch_layers")["data"]
    assert [d["name"] for d in lines] == svc.groups
    for gi, d in enumerate(lines):
        np.testing.assert_allclose(_z({"z": d["y"]}), alpha[:, :, gi].mean(0), atol=1e-6)
    bars = {d["name"]: dict(zip(d["x"], _z({"z": d["y"]}))) for d in _figure(at, "batch_categories")["data"]}
    labs = alpha[[0, 3]].mean((0, 1))
    for gi, g in enumerate(svc.groups):
        assert bars[g]["labs"] == pytest.approx(labs[gi], abs=1e-6)
        assert bars[g]["bullets"] == pytest.approx(alpha[1, :, gi].mean(), abs=1e-6)
    # With the current overrides applied, the batch is routed with them.
    _generate(at)
    at.slider(key="ov_g:style").set_value(0.0)
    _apply(at)
    at.checkbox(key="batch_ov").check()
    at.button(key="batch_run").click().run()
    _ok(at)
    assert np.allclose(at.session_state["batch"]["summary"]["rows"]["α style"], 0)
    # Unreadable uploads name the line.
    at.file_uploader(key="batch_file").set_value(("b.jsonl", b'{"instruction": 1}\nnot json', "text/plain")).run()
    assert any("line 2" in e.value for e in at.error)


def test_export_view_downloads_the_trace_and_the_routing_as_an_adapter(at, downloads):
    _generate(at)
    at.slider(key="ov_g:style").set_value(0.0)
    _apply(at)
    _ok(at)
    tr: RoutingTrace = at.session_state["trace"]
    assert tr.overrides == Overrides(groups={"style": 0.0})   # the object in the program, a dict only in the JSON
    got = RoutingTrace.from_dict(json.loads(_download(at, downloads, "Trace as JSON")))
    for name in ("group_weights", "expert_weights", "router_group_weights", "router_expert_weights"):
        np.testing.assert_allclose(getattr(got, name), getattr(tr, name), err_msg=name)
    assert got.overrides == tr.overrides
    frame = pd.read_csv(io.BytesIO(_download(at, downloads, "Trace as CSV")))
    assert len(frame) == len(tr.to_frame())
    assert json.loads(_download(at, downloads, "Save preset")) == at.session_state["ov"].to_dict()
    assert np.abs(tr.effective_weights - tr.router_effective_weights).max() > 0.05
    for use, expected in (("used", tr.effective_weights), ("router", tr.router_effective_weights)):
        at.radio(key="export_use").set_value(use)
        at.button(key="export_build").click().run()
        _ok(at)
        with zipfile.ZipFile(io.BytesIO(_download(at, downloads, "Download adapter"))) as z:
            assert {"atmoe_adapter/adapter_config.json", "atmoe_adapter/adapter_model.safetensors"} <= set(z.namelist())
            routing = json.loads(z.read("atmoe_adapter/atmoe_routing.json"))
        assert routing["use"] == use
        np.testing.assert_allclose(routing["effective_weights"], expected, atol=1e-6)


def test_experts_view_lists_what_is_loaded(at, manifest):
    m = ATMoE.load(manifest, device="cpu")
    table = next(d.value for d in at.dataframe if "expert" in d.value.columns)
    assert table["expert"].tolist() == m.experts
    assert table["group"].tolist() == [m.expert_groups[e] for e in m.experts]
    assert table["rank"].tolist() == [expert(m, e).rank for e in m.experts]
    metrics = {x.label: x.value for x in at.metric}
    assert metrics["Decoder layers"] == str(m.num_layers)
    assert any(x.value.startswith("**Router**") and x.value.endswith(f"{m.router.config.mode} · trained")
               for x in at.markdown)   # text values are Markdown, not metric cards (which cut them off)
    assert [x.label for x in at.expander if x.label.endswith("training data and metrics")] == \
        [f"{e} — training data and metrics" for e in m.experts]


def test_example_button_fills_the_form(at):
    ex = examples.examples(5)
    assert at.button(key="example_1").label == ex[1]["label"]
    at.button(key="example_1").click().run()
    _ok(at)
    assert (at.text_area(key="prompt").value, at.text_area(key="note").value) == (ex[1]["instruction"], ex[1]["input"])


# ---------------------------------------------------------------- pure helpers

def _trace(L: int = 3) -> RoutingTrace:
    rng = np.random.default_rng(0)
    a = rng.dirichlet(np.ones(2), L)
    b = np.concatenate([rng.dirichlet(np.ones(2), L), np.ones((L, 1))], 1)
    over = np.zeros((L, 2), bool)
    over[1, 0] = True
    return RoutingTrace([f"l{i}" for i in range(L)], ["g1", "g2"], ["a", "b", "c"], ["g1", "g1", "g2"], a, b, a, b,
                        "softmax", group_overridden=over)


def test_figures_use_fixed_ranges_and_mark_overrides():
    tr = _trace()
    fig = figures.group_heatmap(tr)
    assert fig.data[0].zmin == 0 and fig.data[0].zmax == 1 and np.allclose(fig.data[0].z, tr.group_weights)
    assert list(fig.data[1].x) == ["g1"] and list(fig.data[1].y) == ["L1"]
    ex = figures.expert_heatmap(tr, "effective")
    assert np.allclose(ex.data[0].z, tr.effective_weights) and len(ex.layout.shapes) == 1  # one group boundary
    assert len(ex.data[1].x) == 2  # both g1 experts inherit their group's override
    assert figures.delta_heatmap(tr).data[0].zmid == 0


def test_heatmap_rows_are_layers_in_order_with_their_own_values():
    """Row i of every heatmap is layer i: its label is L{i} and its values are layer i's (a reversed label or z axis
    would show one layer's weights under another's name)."""
    L = 5
    rng = np.random.default_rng(1)
    router_a, a = rng.dirichlet(np.ones(2), L), rng.dirichlet(np.ones(2), L)
    b = np.concatenate([rng.dirichlet(np.ones(2), L), np.ones((L, 1))], 1)
    router_b = np.concatenate([rng.dirichlet(np.ones(2), L), np.ones((L, 1))], 1)
    over = np.zeros((L, 2), bool)
    over[0, 1] = True  # the first layer only: its mark must sit on row L0
    tr = RoutingTrace([f"l{i}" for i in range(L)], ["g1", "g2"], ["a", "b", "c"], ["g1", "g1", "g2"], router_a,
                      router_b, a, b, "softmax", group_overridden=over)
    rows = [f"L{i}" for i in range(L)]
    figs = {"group": (figures.group_heatmap(tr), tr.group_weights),
            "expert": (figures.expert_heatmap(tr, "expert"), tr.expert_weights),
            "effective": (figures.expert_heatmap(tr, "effective"), tr.effective_weights),
            "delta group": (figures.delta_heatmap(tr, "group"), tr.group_weights - tr.router_group_weights),
            "delta effective": (figures.delta_heatmap(tr, "effective"),
                                tr.effective_weights - tr.router_effective_weights)}
    for name, (fig, z) in figs.items():
        assert list(fig.data[0].y) == rows, name
        np.testing.assert_allclose(np.asarray(fig.data[0].z, dtype=float), z, err_msg=name)
        assert len(np.unique(z.round(6), axis=0)) == L, name  # rows differ, so an order error shows
    assert list(figs["group"][0].data[1].y) == ["L0"] and list(figs["group"][0].data[1].x) == ["g2"]
    # Hover values: router α and used α of the cell, in the same layer order.
    custom = np.asarray(figs["group"][0].data[0].customdata)
    np.testing.assert_allclose(custom[..., 0].astype(float), np.round(tr.router_group_weights, 4))
    np.testing.assert_allclose(custom[..., 1].astype(float), np.round(tr.group_weights, 4))


def test_presets_only_moved_sliders_become_overrides():
    base = {"g:task": 0.5, "g:style": 0.3, "e:x": 0.4}
    assert presets.overrides_from_sliders(dict(base), base, [], (0, 3), 4) is None
    ov = presets.overrides_from_sliders({**base, "g:style": 0.0, "e:x": 0.9}, base, ["x"], (1, 3), 4)
    assert ov.to_dict() == {"groups": {"style": 0.0}, "experts": {}, "layers": [1, 3], "disabled": ["x"]}
    assert presets.decode_url(presets.encode_url(ov)) == ov
    assert presets.from_json(presets.to_json(ov)) == ov
    for bad in (b"[1, 2]", b'{"groups": {"a": 2}}', b'{"weird": 1}', b"\xff\xfe"):
        with pytest.raises(ValueError):
            presets.from_json(bad)


@pytest.fixture()
def example_files(tmp_path, monkeypatch):
    """app.examples reading from `tmp_path` (nothing there yet), with its caches cleared before and after."""
    def clear():
        examples.heldout_rows.cache_clear()
        examples.off_topic_example.cache_clear()
    monkeypatch.setattr(examples, "EVAL_PATH", tmp_path / "eval.jsonl")
    monkeypatch.setattr(examples, "OFF_TOPIC_PATH", tmp_path / "off_topic.jsonl")
    clear()
    yield tmp_path, clear
    clear()


def test_examples_show_different_combinations_from_the_heldout_split(example_files):
    from demo.suite import EXPERT_DESCRIPTIONS, complex_rows

    folder, clear = example_files
    never_trained = {"labs + flags + plain", "vitals + ranges + bullets"}
    # Nothing shipped: the seeded held-out generator.
    rows = complex_rows(64, seed=0, heldout=True)
    df, source = examples.heldout_rows()
    assert "demo.suite" in source and df.instruction.tolist() == [r["instruction"] for r in rows]
    exs = examples.examples(5)
    labels = [e["label"] for e in exs]
    assert len(labels) == len(set(labels)) == 5 and "off-topic" not in labels
    assert set(labels[:2]) == never_trained                      # the combinations no router trained on come first
    assert {e for label in labels for e in label.split(" + ")} == set(EXPERT_DESCRIPTIONS)  # every expert shown
    by_instruction = {r["instruction"]: r for r in rows}
    for ex in exs:
        row = by_instruction[ex["instruction"]]
        assert ex["input"] == row["input"] and ex["label"] == " + ".join(row["experts"])
    # Shipped files: the rows come from them, and the last example is the first off-topic question.
    shipped = rows[::-1][:24]
    (folder / "eval.jsonl").write_text("".join(json.dumps(r) + "\n" for r in shipped), encoding="utf-8")
    off = {"instruction": "What is the capital of Peru?", "input": "", "output": "Lima.", "experts": []}
    (folder / "off_topic.jsonl").write_text(json.dumps(off) + "\n" + json.dumps({**off, "instruction": "Add 2 and 3."}))
    clear()
    df, source = examples.heldout_rows()
    assert source == str(folder / "eval.jsonl") and df.instruction.tolist() == [r["instruction"] for r in shipped]
    assert df.category.tolist() == ["+".join(r["experts"]) for r in shipped]
    exs = examples.examples(5)
    assert exs[-1] == {"label": "off-topic", "instruction": "What is the capital of Peru?", "input": ""}
    labels = [e["label"] for e in exs[:-1]]
    assert len(labels) == len(set(labels)) == 4 and set(labels[:2]) == never_trained
    assert all(e["instruction"] in {r["instruction"] for r in shipped} for e in exs[:-1])


def test_text_is_escaped_and_diffed_safely():
    evil = "<script>alert(1)</script> :red[x] **b** $x$"
    out = md_escape(evil)
    assert "<script>" not in out and ":red[" not in out and "**" not in out and "$x$" not in out
    old, new, ratio = word_diff("take aspirin daily", "take <b>ibuprofen</b> daily")
    assert ":orange-background[~~aspirin~~]" in old and "<b>" not in new and ":blue-background[**" in new
    assert 0 < ratio < 1


def test_batch_reader_limits_and_reasons():
    rows = "instruction\n" + "\n".join(f"q{i}" for i in range(12))
    df, note = batch_data.read_instructions("a.csv", rows.encode(), limit=10)
    assert len(df) == 10 and "first 10 of 12" in note and set(df.columns) == {"instruction", "input", "category"}
    for name, data, why in (("a.csv", b"text\nhi", "no 'instruction' column"), ("a.xlsx", b"x", "unsupported"),
                            ("a.jsonl", b"[1]", "expected a JSON object"), ("a.csv", b"\xff\xfe\x00", "UTF-8")):
        with pytest.raises(ValueError, match=why):
            batch_data.read_instructions(name, data)


@pytest.mark.parametrize("budget", [1, 3])
def test_streamed_answer_is_the_generated_answer_even_when_it_ends_on_the_last_step(manifest, budget):
    """The Prompt tab (stream) and the Compare tab (generate) report one answer alike: an end-of-turn on the last
    allowed step is "eos" with no token counted for it (a stream once counted the end-of-turn step as a token and
    called it "length")."""
    svc = Service.load(str(manifest), device="cpu")
    eos = svc.model.tokenizer.eos_token_id
    steps = []

    def eos_on_step(module, args, out):   # the model ends its turn on the step `budget`, whatever it says before
        steps.append(1)
        out = out.clone()
        out[..., eos] = 1e4 if len(steps) == budget else -1e4
        return out

    settings = GenerationSettings(max_new_tokens=budget)
    hook = svc.model.model.lm_head.register_forward_hook(eos_on_step)
    try:
        *pieces, streamed = svc.stream(PROMPT, NOTE, settings, None, threading.Event())
        steps.clear()
        generated = svc.generate(PROMPT, NOTE, settings, None)
    finally:
        hook.remove()
    assert streamed.finish_reason == generated.finish_reason == "eos"
    assert streamed.new_tokens == generated.new_tokens == budget - 1
    assert streamed.text == generated.text == "".join(pieces)
