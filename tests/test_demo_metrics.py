"""Line F1 credits content, not form; the evaluation's bookkeeping (CI, chance, routing scores, table, resume) is
right without the real model (a tiny random Llama stands in where generation is needed)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest

from atmoe.trace import RoutingTrace
from demo import evaluate as ev
from demo.metrics import line_f1, score
from demo.suite import GROUPS, complex_rows

ROWS = complex_rows(64, heldout=True)
EXPERTS = [e for names in GROUPS.values() for e in names]
EXPERT_GROUPS = {e: g for g, names in GROUPS.items() for e in names}


def _mean(answers: list[str]) -> float:
    return float(np.mean([score(a, r)["f1"] for a, r in zip(answers, ROWS, strict=True)]))


# ---------------------------------------------------------------- metrics
def test_own_reference_scores_one_whatever_the_spacing_and_case() -> None:
    for row in ROWS:
        assert score(row["output"], row) == {"f1": 1.0, "exact": 1.0}
        messy = "\n\n".join("  " + x.upper().replace(" ", "   ") for x in row["output"].splitlines())
        assert score(messy, row) == {"f1": 1.0, "exact": 1.0}


@pytest.mark.parametrize("answer", [lambda r: "OK", lambda r: "", lambda r: r["input"], lambda r: r["instruction"]],
                         ids=["constant", "empty", "note", "instruction"])
def test_degenerate_answers_score_near_zero(answer) -> None:
    assert _mean([answer(r) for r in ROWS]) <= 0.05


def test_another_rows_reference_scores_near_zero() -> None:
    assert _mean([ROWS[(i + 1) % len(ROWS)]["output"] for i in range(len(ROWS))]) <= 0.15


def test_a_partly_right_answer_gets_partial_credit() -> None:
    for row in ROWS:
        lines = row["output"].splitlines()
        n = len(lines)
        missing = score("\n".join(lines[:-1]), row)
        assert missing["f1"] == pytest.approx(2 * (n - 1) / (2 * n - 1)) and missing["exact"] == 0.0
        extra = score("\n".join([*lines, "- Na 999: high"]), row)
        assert 0.5 < extra["f1"] < 1.0 and extra["exact"] == 0.0


def test_bullets_on_wrong_content_score_zero() -> None:
    wrong_value = lambda text: re.sub(r"(?<=\s)\d+(\.\d+)?", "999", text, count=1)  # noqa: E731
    for row in ROWS:
        bulleted = [x if x.startswith("- ") else "- " + x for x in row["output"].splitlines()]
        assert line_f1("\n".join(wrong_value(x) for x in bulleted), row["output"]) == 0.0
        assert line_f1("- OK\n- normal\n- high", row["output"]) == 0.0


# ---------------------------------------------------------------- evaluation bookkeeping (no model)
def _trace(alpha: list[list[float]], beta: list[list[float]], mode: str = "sigmoid") -> RoutingTrace:
    a, b = np.array(alpha, dtype=np.float32), np.array(beta, dtype=np.float32)
    return RoutingTrace(layers=[f"l{i}" for i in range(len(a))], groups=list(GROUPS), experts=EXPERTS,
                        expert_groups=[EXPERT_GROUPS[e] for e in EXPERTS], router_group_weights=a,
                        router_expert_weights=b, group_weights=a, expert_weights=b, mode=mode)


def test_selection_reads_the_layer_means_and_gates_the_layer_profile() -> None:
    row = {"experts": ["labs", "plain"]}
    # layer 0 picks vitals and flags-off wrongly, layer 1 outvotes it: the layer means pick labs and plain
    t = _trace([[0.9, 0.2, 0.4], [0.9, 0.4, 0.8]],
               [[0.4, 0.6, 0.5, 0.5, 0.3, 0.7], [0.9, 0.1, 0.5, 0.5, 0.2, 0.8]])
    assert ev.selection_hits(t, row) == (2, 2)
    assert ev.gate_hits(t, row) == (3, 3)         # task on, knowledge never opens (max 0.4), style opens on layer 1
    t = _trace([[0.9, 0.7, 0.1], [0.9, 0.7, 0.1]], [[0.3, 0.7, 0.5, 0.5, 0.6, 0.4]] * 2)
    assert ev.selection_hits(t, row) == (0, 2)
    assert ev.gate_hits(t, row) == (1, 3)
    # style open on the top layer only (mean 0.33): still on, as the router's layer split intends
    t = _trace([[0.9, 0.1, 0.0], [0.9, 0.1, 0.0], [0.9, 0.1, 1.0]], [[1, 0, 0.5, 0.5, 0, 1]] * 3)
    assert ev.gate_hits(t, row) == (3, 3)
    # a shared budget: "on" above 1/(2G) = 1/6
    t = _trace([[0.5, 0.1, 0.4]] * 2, [[1, 0, 0.5, 0.5, 0, 1]] * 2, mode="softmax")
    assert ev.gate_hits(t, row) == (3, 3)
    assert ev.gate_hits(t, {"experts": ["labs"]}) == (2, 3)


def test_layer_constant_fixes_the_layer_means() -> None:
    t = _trace([[0.9, 0.2, 0.4], [0.7, 0.4, 0.8]], [[0.4, 0.6, 0.5, 0.5, 0.3, 0.7], [0.8, 0.2, 0.1, 0.9, 0.1, 0.9]])
    ov = ev.layer_constant(t)
    assert ov.layers is None and not ov.disabled
    assert ov.groups == pytest.approx({"task": 0.8, "knowledge": 0.3, "style": 0.6})
    assert ov.experts == pytest.approx({"labs": 0.6, "vitals": 0.4, "flags": 0.3, "ranges": 0.7, "bullets": 0.2,
                                        "plain": 0.8})


def test_chance_is_the_majority_label_per_group() -> None:
    rows = [{"experts": ["labs", "flags"]}, {"experts": ["labs", "bullets"]}, {"experts": ["vitals", "ranges"]},
            {"experts": ["labs"]}]
    # task: labs 3 of 4; knowledge: 1 of 2; style: 1 of 1 → (3 + 1 + 1) / 7
    assert ev.chance_selection(rows, EXPERT_GROUPS) == pytest.approx(5 / 7)
    assert ev.chance_selection([{"experts": []}], EXPERT_GROUPS) is None
    assert ev.chance_selection(ROWS, EXPERT_GROUPS) == pytest.approx(0.5, abs=0.1)  # balanced combinations


def test_bootstrap_interval_contains_the_mean_and_narrows_with_n() -> None:
    rng = np.random.default_rng(1)
    small, large = rng.uniform(size=16), rng.uniform(size=400)
    for values in (small, large):
        lo, hi = ev.bootstrap_ci(values)
        assert lo < values.mean() < hi
        assert ev.bootstrap_ci(values) == (lo, hi)   # fixed seed
    assert np.subtract(*ev.bootstrap_ci(large)[::-1]) < np.subtract(*ev.bootstrap_ci(small)[::-1])
    assert ev.bootstrap_ci(np.ones(10)) == (1.0, 1.0)


def _results() -> dict:
    def system(f1: float, selection: float | None = None, gate: float | None = None) -> dict:
        return {"about": "", "f1": f1, "ci95": [f1 - 0.05, f1 + 0.05], "exact": f1 / 2,
                "per_skill": {e: (f1 if e != "plain" else None) for e in EXPERTS}, "selection": selection,
                "gate_accuracy": gate}
    return {"n": 64, "decoding": "greedy", "max_new_tokens": 80, "shipped": "grouped_sigmoid", "skills": EXPERTS,
            "chance": {"selection": 0.5}, "systems": {"base": system(0.1), "oracle_constant": system(0.9),
                                                      "grouped_sigmoid": system(0.8, 0.95, 0.875)}}


def test_markdown_table_has_every_system_and_column() -> None:
    table = ev.markdown_table(_results())
    head, rows = table.split("\n\n")
    assert "n = 64" in head and "greedy" in head and "max_new_tokens = 80" in head
    lines = rows.strip().splitlines()
    assert lines[0] == ("| system | " + " | ".join(EXPERTS)
                        + " | mean F1 [95% CI] | exact | selection (chance) | gate acc. |")
    assert [x.split(" | ")[0] for x in lines[2:]] == ["| `base`", "| `oracle_constant`",
                                                      "| `grouped_sigmoid` (shipped)"]
    assert all(x.count("|") == lines[0].count("|") for x in lines)
    assert "**0.800** [0.750, 0.850] | 0.400 | 0.950 (0.500) | 0.875 |" in lines[-1]
    assert lines[2].endswith("| 0.050 | – | – |") and "| – |" in lines[2]   # plain: no rows → "–"


def test_paired_differences_are_shipped_minus_each_system_with_the_combination_split() -> None:
    from demo.suite import HELDOUT_COMBOS
    rows = ROWS[:40]
    perfect = [r["output"] for r in rows]
    unseen = [tuple(r["meta"]["combo"]) in HELDOUT_COMBOS for r in rows]
    half = [r["output"] if i % 2 else "" for i, r in enumerate(rows)]
    results = {**_results(), "answers": {"base": [""] * 40, "grouped_sigmoid": perfect, "oracle_constant": half}}
    paired = ev.paired_differences(results, rows)
    assert paired["minus"]["base"] == {"diff": 1.0, "ci95": [1.0, 1.0]}
    half_diff = paired["minus"]["oracle_constant"]
    assert half_diff["diff"] == pytest.approx(0.5) and half_diff["ci95"][0] < 0.5 < half_diff["ci95"][1]
    split = paired["by_combination"]
    assert split["never_trained_combinations"] == {"n": sum(unseen), "f1": 1.0} and 0 < sum(unseen) < 40
    assert split["trained_combinations"]["n"] == 40 - sum(unseen)
    table = ev.markdown_table({**results, "paired": paired})
    assert "| `base` | +1.000 [+1.000, +1.000] |" in table and "never-trained combinations 1.000" in table


# ---------------------------------------------------------------- the whole evaluation on a tiny random model
@pytest.fixture(scope="module")
def tiny(tmp_path_factory, one_torch_thread):
    import torch
    from tiny_models import save_adapter, tiny_llama, tiny_tokenizer

    from atmoe.model import ATMoE

    folder = tmp_path_factory.mktemp("tiny_demo")
    tok = tiny_tokenizer([r["instruction"] + "\n" + r["input"] + "\n" + r["output"] for r in ROWS], vocab_size=400)
    base = tiny_llama(len(tok), layers=2)
    specs = [(EXPERT_GROUPS[e], e, save_adapter(base, folder / e, ["q_proj", "v_proj", "down_proj"], seed=i), "")
             for i, e in enumerate(EXPERTS)]
    m = ATMoE.from_experts(base, tok, specs, groups=list(GROUPS))
    routers = {}
    for i, (name, mode) in enumerate((("grouped_sigmoid", "sigmoid"), ("grouped_softmax", "softmax"),
                                      ("flat_router", "flat"))):
        r = m.new_router(mode=mode)
        torch.manual_seed(i)
        with torch.no_grad():
            for p in r.parameters():
                p.add_(0.5 * torch.randn_like(p))
        r.trained = True
        routers[name] = r
    return m, routers


def test_evaluate_runs_every_system_and_resumes(tiny, tmp_path) -> None:
    m, routers = tiny
    rows = ROWS[:4]
    partial = tmp_path / "partial.json"
    results = ev.evaluate(m, rows, routers, max_new_tokens=3, batch_size=3, partial_path=partial)
    names = ["base", *(f"expert:{e}" for e in EXPERTS), "uniform_merge", "oracle_constant", "router_constant",
             *routers]
    assert list(results["systems"]) == names and list(results["answers"]) == names
    assert results["shipped"] == "grouped_sigmoid" and results["n"] == 4
    for name, s in results["systems"].items():
        assert len(results["answers"][name]) == 4
        assert 0.0 <= s["f1"] <= 1.0 and s["ci95"][0] <= s["f1"] <= s["ci95"][1]
        assert (s["selection"] is not None) == (name in routers) == (s["gate_accuracy"] is not None)
    assert json.loads(partial.read_text())["systems"].keys() == results["systems"].keys()

    # the base system is the base model; the answers do not depend on the batch size
    alone = m.generate_batch([rows[1]["instruction"]], inputs=[rows[1]["input"]], max_new_tokens=3,
                             overrides={"disabled": EXPERTS})[0].text
    assert results["answers"]["base"][1] == alone

    def refuse(*a, **k):
        raise AssertionError("a finished system was generated again")

    m.generate_batch, m.route_batch = refuse, refuse   # instance attributes on a test's own model
    try:
        again = ev.evaluate(m, rows, routers, max_new_tokens=3, batch_size=3, partial_path=partial)
        assert again == results
        with pytest.raises(AssertionError, match="generated again"):   # other settings: the partial is stale
            ev.evaluate(m, rows, routers, max_new_tokens=4, partial_path=partial)
    finally:
        del m.generate_batch, m.route_batch


def test_system_overrides_are_what_the_docstring_says(tiny) -> None:
    m, routers = tiny
    by_name = {s.name: s for s in ev.systems(m, routers)}
    row = {"experts": ["vitals", "ranges"]}
    oracle = by_name["oracle_constant"].overrides_for(row)
    assert oracle.groups == {"task": 1.0, "knowledge": 1.0, "style": 0.0}
    assert oracle.experts == {"vitals": 1.0, "ranges": 1.0}
    solo = by_name["expert:plain"].overrides_for(row)
    assert solo.groups == {"task": 0.0, "knowledge": 0.0, "style": 1.0} and solo.experts == {"plain": 1.0}
    assert by_name["base"].overrides_for(row).disabled == tuple(EXPERTS)
    assert by_name["grouped_softmax"].overrides_for(row) is None
    shipped = routers["grouped_sigmoid"]
    assert by_name["router_constant"].router is shipped and by_name["router_constant"].needs_routing
    # applied, the layer-constant router uses on every layer the layer mean of the router's own routing
    r = ROWS[0]
    own = m.route(r["instruction"], input=r["input"], router=shipped)
    used = m.route(r["instruction"], by_name["router_constant"].overrides_for(r, own), input=r["input"], router=shipped)
    assert np.ptp(own.group_weights, axis=0).max() > 1e-3          # the router does vary over layers
    np.testing.assert_allclose(used.group_weights, np.broadcast_to(own.group_weights.mean(0), own.group_weights.shape),
                               atol=1e-6)
    np.testing.assert_allclose(used.expert_weights, np.broadcast_to(own.expert_weights.mean(0),
                                                                    own.expert_weights.shape), atol=1e-6)


# ---------------------------------------------------------------- command line
def test_main_reports_bad_input_without_a_traceback(tmp_path) -> None:
    data = tmp_path / "eval.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in ROWS[:2]))
    cases = [
        (["--data", str(tmp_path / "missing.jsonl")], "missing.jsonl"),
        (["--data", str(data), "--router", "no_equals_sign"], "NAME=PATH"),
        (["--data", str(data), "--router", f"mine={tmp_path / 'nope.safetensors'}"], "router file not found"),
        (["--data", str(data), "--manifest", str(tmp_path / "none.json")], "none.json"),
        (["--data", str(data), "--n", "0"], "--n"),
    ]
    for argv, needle in cases:
        with pytest.raises(SystemExit) as exc:
            ev.main(argv)
        assert str(exc.value).startswith("error: ") and needle in str(exc.value), argv
    (tmp_path / "bad.jsonl").write_text('{"instruction": "x"}\n')
    with pytest.raises(SystemExit, match="line 1: missing"):
        ev.main(["--data", str(tmp_path / "bad.jsonl")])
