"""The dashboard renders and reacts (Streamlit AppTest on the tiny demo model), plus its pure helpers."""

from __future__ import annotations

import base64
import json
import threading
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest
from tiny_models import tiny_demo

from app import batch, examples, figures, presets
from app.service import DEFAULT_MANIFEST, Service, Settings, missing_manifest_message
from app.text import md_escape, word_diff
from atmoe import ATMoE, RoutingTrace

SCRIPT = str(Path(__file__).resolve().parents[1] / "streamlit_app.py")
PROMPT = "List the vital signs. Flag each as low, normal or high. Use bullet points."
NOTE = "72 yo M with shortness of breath.\nVitals: HR 135, SpO2 88.\nLabs: Na 128, K 4.1."


@pytest.fixture(scope="module")
def manifest(tmp_path_factory) -> Path:
    return tiny_demo(tmp_path_factory.mktemp("app"))


@pytest.fixture()
def at(manifest, monkeypatch) -> AppTest:
    monkeypatch.setenv("ATMOE_MANIFEST", str(manifest))
    app = AppTest.from_file(SCRIPT, default_timeout=60).run()
    assert not app.exception, [e.value for e in app.exception]
    return app


def _ok(at: AppTest) -> None:
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]


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


def _z(trace_json: dict) -> np.ndarray:
    """A plotly JSON array: a plain list, or plotly's typed-array form {dtype, bdata (base64), shape}."""
    z = trace_json["z"]
    if isinstance(z, dict):
        arr = np.frombuffer(base64.b64decode(z["bdata"]), dtype=np.dtype(z["dtype"]))
        return arr.reshape([int(n) for n in str(z.get("shape", len(arr))).split(",")]).astype(float)
    return np.array(z, dtype=float)


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


def test_moving_one_group_slider_fixes_only_that_group(at):
    _generate(at)
    before = at.session_state["trace"]
    style = before.groups.index("style")
    assert at.slider(key="ov_g:style").value == round(float(before.router_group_weights[:, style].mean()), 2)
    at.slider(key="ov_g:style").set_value(0.0)
    _apply(at)
    _ok(at)
    ov = at.session_state["ov"]
    assert ov["groups"] == {"style": 0.0} and not ov["experts"] and not ov["disabled"]  # only the moved slider
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
    assert at.session_state["ov"] == {"groups": {}, "experts": {}, "layers": [2, 3], "disabled": ["labs"]}
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
    assert at.session_state["ov"] == preset and at.slider(key="ov_g:style").value == 0.1
    assert at.session_state["trace"].group_overridden[1:, at.session_state["trace"].groups.index("style")].all()
    # A fresh session opened with that link starts from the same preset and prompt.
    link = AppTest.from_file(SCRIPT, default_timeout=60)
    link.query_params.update({"preset": presets.encode_url(preset), "q": PROMPT})
    link.run()
    assert link.session_state["ov"] == preset and link.text_area(key="prompt").value == PROMPT
    bad = AppTest.from_file(SCRIPT, default_timeout=60)
    bad.query_params["preset"] = "%%%"
    bad.run()
    assert not bad.exception and any("ignored" in e.value for e in bad.error)


def test_compare_tokens_batch_export_views(at):
    _generate(at, granularity="token")
    _ok(at)
    assert _figure(at, "token_heatmap")["data"][0]["zmax"] == 1
    at.slider(key="ov_g:style").set_value(0.0)
    _apply(at)
    at.button(key="compare_run").click().run()
    _ok(at)
    delta = _figure(at, "delta_groups")["data"][0]
    assert delta["zmid"] == 0 and delta["colorscale"]
    csv = b"instruction,input,category\nList the lab results.,Labs: Na 128.,labs\nUse bullet points.,,bullets\n,,x\n"
    at.radio(key="batch_source").set_value("upload").run()
    at.file_uploader(key="batch_file").set_value(("b.csv", csv, "text/csv")).run()
    at.button(key="batch_run").click().run()
    _ok(at)
    rows = at.session_state["batch"]["summary"]["rows"]
    assert len(rows) == 2 and "top task" in rows.columns
    at.file_uploader(key="batch_file").set_value(("b.jsonl", b'{"instruction": 1}\nnot json', "text/plain")).run()
    assert any("line 2" in e.value for e in at.error)
    at.file_uploader(key="batch_file").set_value(None).run()
    _generate(at)  # sequence level: the adapter export is offered
    at.button(key="export_build").click().run()
    _ok(at)
    assert any(d.proto.label.startswith("Download adapter") for d in at.get("download_button"))


def test_example_button_fills_the_form(at):
    ex = examples.examples(5)
    assert at.button(key="example_1").label == ex[1]["label"]
    at.button(key="example_1").click().run()
    _ok(at)
    assert (at.text_area(key="prompt").value, at.text_area(key="note").value) == (ex[1]["instruction"], ex[1]["input"])


def test_missing_manifest_explains_how_to_build(at, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert "make assets" in missing_manifest_message(DEFAULT_MANIFEST)
    at.text_input(key="manifest").input(str(tmp_path / "nowhere.json")).run()
    assert not at.exception and any("No expert manifest" in e.value for e in at.error)


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


def test_presets_only_moved_sliders_become_overrides():
    base = {"g:task": 0.5, "g:style": 0.3, "e:x": 0.4}
    assert presets.overrides_from_sliders(dict(base), base, [], (0, 3), 4) is None
    ov = presets.overrides_from_sliders({**base, "g:style": 0.0, "e:x": 0.9}, base, ["x"], (1, 3), 4)
    assert ov == {"groups": {"style": 0.0}, "experts": {}, "layers": [1, 3], "disabled": ["x"]}
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
    from atmoe.demo.suite import EXPERT_DESCRIPTIONS, complex_rows

    folder, clear = example_files
    never_trained = {"labs + flags + plain", "vitals + ranges + bullets"}
    # Nothing shipped: the seeded held-out generator.
    rows = complex_rows(64, seed=0, heldout=True)
    df, source = examples.heldout_rows()
    assert "atmoe.demo.suite" in source and df.instruction.tolist() == [r["instruction"] for r in rows]
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
    df, note = batch.read_instructions("a.csv", rows.encode(), limit=10)
    assert len(df) == 10 and "first 10 of 12" in note and set(df.columns) == {"instruction", "input", "category"}
    for name, data, why in (("a.csv", b"text\nhi", "no 'instruction' column"), ("a.xlsx", b"x", "unsupported"),
                            ("a.jsonl", b"[1]", "expected a JSON object"), ("a.csv", b"\xff\xfe\x00", "UTF-8")):
        with pytest.raises(ValueError, match=why):
            batch.read_instructions(name, data)


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

    settings = Settings(max_new_tokens=budget)
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
