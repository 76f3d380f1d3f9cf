"""Expert attribution (atmoe.analysis.attribution) on tiny models: each removal is the forward a user gets with that
override, teacher forcing routes like generation, an expert that wrote nothing there changes nothing, and the
first-order estimate is the derivative of the exact change."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from tiny_models import save_adapter, tiny_demo, tiny_llama, tiny_tokenizer

from atmoe import ATMoE, Overrides
from atmoe.analysis.attribution import (agreement, attribute, attribute_rows, first_order, labelled_rate,
                                        layer_ranges, removal, teacher_forced, wilson)

PROMPT, NOTE = "List the vital signs.", "Vitals: HR 135, SpO2 88."


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> ATMoE:
    return ATMoE.load(tiny_demo(tmp_path_factory.mktemp("attr")), device="cpu")


@pytest.fixture(scope="module")
def answer(model: ATMoE) -> list[int]:
    g = model.generate(PROMPT, input=NOTE, max_new_tokens=8)
    assert len(g.token_ids) >= 3
    return g.token_ids


def _logprobs(m: ATMoE, text_ids: list[int], n_prompt: int, overrides: Overrides | None) -> np.ndarray:
    """The answer's log-probs from a plain `score` call."""
    logits = m.score(input_ids=text_ids, overrides=overrides).logits
    lp = logits.log_softmax(-1)[n_prompt - 1:-1]
    return lp.gather(-1, torch.tensor(text_ids[n_prompt:])[:, None])[:, 0].numpy()


def test_each_removal_equals_a_plain_score_call_with_that_override(model: ATMoE, answer: list[int]) -> None:
    targets = ["expert:vitals", "group:style"]
    ranges = layer_ranges(model.num_layers, 2)
    a = attribute(model, PROMPT, answer, input=NOTE, targets=targets, ranges=ranges, reads="all")
    ids = model.encode(PROMPT, NOTE) + answer
    n = len(ids) - len(answer)
    as_routed = _logprobs(model, ids, n, None)
    assert np.allclose(a.logprobs, as_routed, atol=1e-5)
    for k, t in enumerate(targets):
        for r, span in enumerate(ranges):
            ablated = _logprobs(model, ids, n, removal(model, t, span))
            assert np.allclose(a.delta[k, r], ablated - as_routed, atol=1e-4)
    assert np.abs(a.total).max() > 1e-2   # the experts matter on this model: the comparison above can fail


def test_teacher_forcing_routes_like_generation(model: ATMoE) -> None:
    g = model.generate(PROMPT, input=NOTE, max_new_tokens=8)
    tf = teacher_forced(model, PROMPT, g.token_ids, input=NOTE)
    assert tf.predicted == g.token_ids   # greedy: each answer token is the most likely one under this routing
    assert np.allclose(tf.trace.group_weights, g.trace.group_weights, atol=1e-5)
    assert np.allclose(tf.trace.effective_weights, g.trace.effective_weights, atol=1e-5)
    # score() reads the answer too: another routing (so "prompt" is not a no-op)
    everything = teacher_forced(model, PROMPT, g.token_ids, input=NOTE, reads="all")
    assert not np.allclose(everything.trace.group_weights, g.trace.group_weights, atol=1e-4)


def test_rows_batched_equal_rows_alone(model: ATMoE, answer: list[int]) -> None:
    prompts = [PROMPT, "Summarize this case in one line, with bullet points please."]
    answers = [answer, answer[:3]]
    together = attribute_rows(model, prompts, answers, inputs=[NOTE, ""], batch_size=2)
    for p, i, a, t in zip(prompts, [NOTE, ""], answers, together):
        alone = attribute(model, p, a, input=i)
        assert np.allclose(t.delta, alone.delta, atol=1e-4) and np.allclose(t.logprobs, alone.logprobs, atol=1e-5)
        assert t.delta.shape == (len(model.experts), 1, len(a)) and len(t.tokens) == len(a)


def test_removing_an_expert_at_zero_weight_changes_nothing(model: ATMoE, answer: list[int]) -> None:
    ov = Overrides(experts={"bullets": 0.0})          # the answer was made without `bullets`
    a = attribute(model, PROMPT, answer, input=NOTE, targets=["expert:bullets", "expert:plain"], overrides=ov)
    assert np.abs(a.delta[0]).max() < 1e-5
    assert np.abs(a.delta[1]).max() > 1e-3
    with pytest.raises(ValueError, match="one layer range"):
        removal(model, "expert:plain", (0, 1), Overrides(experts={"bullets": 0.0}, layers=(2, 3)))


@pytest.fixture(scope="module")
def half_model(tmp_path_factory: pytest.TempPathFactory, one_torch_thread: None) -> ATMoE:
    """Four layers; the experts of group `late` have LoRA modules on layers 2–3 only."""
    folder = tmp_path_factory.mktemp("half")
    tok = tiny_tokenizer()
    base = tiny_llama(len(tok), layers=4)
    targets = ["q_proj", "v_proj", "up_proj"]
    experts = [("early", "a", save_adapter(base, folder / "a", targets, seed=1), ""),
               ("early", "b", save_adapter(base, folder / "b", targets, seed=2), ""),
               ("late", "c", save_adapter(base, folder / "c", targets, seed=3, layers_to_transform=[2, 3]), ""),
               ("late", "d", save_adapter(base, folder / "d", targets, seed=4, layers_to_transform=[2, 3]), "")]
    m = ATMoE.from_experts(base, tok, experts)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in m.router.parameters():
            p.normal_(0, 0.5)
    return m


def test_removing_an_expert_absent_from_the_layer_range_changes_nothing(half_model: ATMoE) -> None:
    m = half_model
    answer = m.encode("plain language, bullet points")[:6]
    a = attribute(m, PROMPT, answer, targets=["expert:c", "expert:a"], ranges=[(0, 1), (2, 3)])
    assert np.abs(a.delta[0, 0]).max() < 1e-6       # c has no module on layers 0–1 (its group neither)
    assert np.abs(a.delta[0, 1]).max() > 1e-3       # …and does matter on layers 2–3
    assert np.abs(a.delta[1, 0]).max() > 1e-3       # a matters on 0–1


def test_first_order_is_the_derivative_of_the_exact_change(tmp_path: Path, one_torch_thread: None) -> None:
    # An untrained router gives β = 1/2 whatever it reads, so fixing an expert at 1/2 − ε moves w by exactly
    # −ε·α on those layers and nothing else: the exact change divided by ε tends to the estimate's.
    m = ATMoE.load(tiny_demo(tmp_path, trained=False), device="cpu")
    answer = m.generate(PROMPT, input=NOTE, max_new_tokens=6).token_ids
    eps = 1e-3
    changes = [Overrides(experts={"vitals": 0.5 - eps}, layers=(1, 2)), Overrides(experts={"plain": 0.5 + eps})]
    est = first_order(m, PROMPT, answer, changes, input=NOTE)
    base = teacher_forced(m, PROMPT, answer, input=NOTE).logprobs.sum()
    for ov, e in zip(changes, est):
        exact = teacher_forced(m, PROMPT, answer, input=NOTE, overrides=ov).logprobs.sum() - base
        assert abs(exact) > 1e-5
        assert e == pytest.approx(exact, rel=0.05, abs=1e-6)
    full = attribute(m, PROMPT, answer, input=NOTE, first_order=True)
    assert full.estimate.shape == full.total.shape and np.isfinite(full.estimate).all()
    assert full.agreement()["cells"] == len(m.experts)


def test_rates_and_agreement_on_known_numbers() -> None:
    assert agreement(np.array([1.0, 2.0, 3.0]), np.array([2.0, 4.0, 6.5]))["spearman"] == pytest.approx(1.0)
    assert agreement(np.array([-1.0, 2.0]), np.array([1.0, 2.0]))["sign_agreement"] == 0.5
    low, high = wilson(8, 10)
    assert 0.44 < low < 0.5 and 0.94 < high < 0.97        # the textbook 95% Wilson interval of 8/10: 0.49–0.94

    class A:  # the two fields labelled_rate reads
        def __init__(self, totals: dict[str, float]) -> None:
            self.targets = [f"expert:{e}" for e in totals]
            self.total = np.array(list(totals.values()))[:, None]
    rows = [A({"x": -3.0, "y": -1.0, "z": 0.0}), A({"x": 0.5, "y": -1.0, "z": 0.0}),
            A({"x": -1.0, "y": 0.0, "z": -2.0})]
    out = labelled_rate(rows, [["x"], ["x"], ["x"]])
    assert out["rows"] == 3 and out["rate"] == pytest.approx(1 / 3) and out["pair_rate"] == pytest.approx(3 / 6)


# ---------------------------------------------------------------------------------------------- the dashboard tab
from app_session import NOTE as APP_NOTE, PROMPT as APP_PROMPT, at, manifest, ok, z_values  # noqa: E402,F401


def _app_generate(at, prompt: str = APP_PROMPT, tokens: int = 6):  # noqa: ANN001, ANN202
    at.text_area(key="prompt").input(prompt)
    at.text_area(key="note").input(APP_NOTE)
    at.number_input(key="max_new_tokens").set_value(tokens)
    return at.button(key="FormSubmitter:prompt_form-Generate").click().run()


def _chart(at, key_part: str) -> dict:  # noqa: ANN001
    import json
    for chart in at.get("plotly_chart"):
        if key_part in chart.proto.id:
            return json.loads(chart.proto.spec)
    raise AssertionError(f"no plotly chart {key_part!r}")


def test_attribution_tab_shows_the_engines_numbers_and_reacts(at, manifest: Path) -> None:  # noqa: ANN001
    assert any("Generate an answer" in i.value for i in at.info)
    _app_generate(at)
    ok(at)
    at.number_input(key="attr_parts").set_value(2)
    at.button(key="attr_run").click().run()
    ok(at)
    a = at.session_state["attribution"]["result"]
    ans = at.session_state["answer"]
    m = ATMoE.load(manifest, device="cpu")
    g = m.generate(APP_PROMPT, input=APP_NOTE, settings=ans.settings)
    assert m.tokenizer.decode(g.token_ids, skip_special_tokens=True) == ans.text
    expected = attribute(m, APP_PROMPT, g.token_ids, input=APP_NOTE, targets=a.targets,
                         ranges=layer_ranges(m.num_layers, 2))
    assert np.allclose(z_values(_chart(at, "attr_matrix")["data"][0]), expected.total, atol=1e-3)
    assert a.targets == [f"expert:{e}" for e in m.experts] + [f"group:{x}" for x in m.groups]
    def coloured() -> np.ndarray:
        z = z_values(_chart(at, "attr_tokens")["data"][0]).ravel()
        return z[~np.isnan(z)]
    first = at.selectbox(key="attr_target").value
    assert np.allclose(coloured(), expected.delta[expected.targets.index(first), 0], atol=1e-3)
    at.selectbox(key="attr_target").set_value("group:style").run()
    at.selectbox(key="attr_range").set_value(1).run()
    assert np.allclose(coloured(), expected.delta[expected.targets.index("group:style"), 1], atol=1e-3)
    assert not at.warning
    _app_generate(at, "Summarize this case in one line.")
    assert any("earlier answer" in w.value for w in at.warning)                 # the old attribution is marked


def test_cli_attributes_a_data_set_and_reports_the_labelled_rate(manifest: Path, tmp_path: Path, capsys) -> None:
    import json
    import pandas as pd
    from atmoe.cli import main

    rows = [{"instruction": "List the vital signs.", "input": "Vitals: HR 135.", "experts": ["vitals"]},
            {"instruction": "Use bullet points.", "input": "Labs: K 5.6.", "experts": ["bullets", "labs"]}]
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert main(["attribute", "--dataset", str(data), "--manifest", str(manifest), "--device", "cpu",
                 "--max-new-tokens", "4", "--first-order", "--csv", str(tmp_path / "a.csv")]) == 0
    out = capsys.readouterr().out
    assert "labelled expert removed costs more" in out and "of 2 rows" in out and "first-order vs exact" in out
    frame = pd.read_csv(tmp_path / "a.csv")
    assert len(frame) == 2 * 6 and set(frame.columns) >= {"row", "target", "delta", "estimate", "answer_tokens"}


@pytest.mark.integration
def test_on_the_shipped_demo_removing_the_labelled_expert_costs_most(one_torch_thread: None) -> None:
    """A property of a working model, not an identity (docs/analysis.md has the full held-out figure: 64/64). Four
    held-out rows (every 16th), each row's reference answer teacher-forced: removing a labelled expert must cost more
    than removing an unlabelled one in all four (by chance: 1 in 16)."""
    import json

    root = Path(__file__).resolve().parents[1]
    manifest, data = root / "assets" / "coadapted" / "experts.json", root / "assets" / "data" / "eval.jsonl"
    m = ATMoE.load(manifest, device="cpu")        # shipped in the repo; the base comes with `make install`
    rows = [json.loads(x) for x in data.read_text().splitlines()[::16]]
    answers = [m.tokenizer(r["output"], add_special_tokens=False)["input_ids"] for r in rows]
    result = attribute_rows(m, [r["instruction"] for r in rows], answers, inputs=[r["input"] for r in rows])
    rate = labelled_rate(result, [r["experts"] for r in rows])
    assert rate["rows"] == 4 and rate["rate"] == 1.0, rate
