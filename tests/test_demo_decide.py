"""The deciding comparison's shortcut (issue 24): one forward over prompt + reference says whether greedy decoding
would write the reference exactly. Checked against real greedy generation on a tiny demo, for every system."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_models import tiny_demo

from atmoe import ATMoE
from demo.decide import (
    SYSTEMS,
    _overrides,
    fully_right,
    held_out_rows,
    paired,
    wording_ids,
)
from demo.suite import WORDINGS


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> ATMoE:
    return ATMoE.load(tiny_demo(tmp_path_factory.mktemp("decide"), mode="sigmoid"), device="cpu")


@pytest.mark.parametrize("system", SYSTEMS)
def test_the_shortcut_agrees_with_greedy_decoding(model, system):
    """Greedy tokens g of a tiny model: with g[k] taken as the end token, g[:k] is what greedy decoding writes and
    then stops, so it is fully right; g[:k] with its last token changed, or one token short is not.
    Alone or in a left-padded batch, the verdict is the same. (A random tiny model rarely ends by itself, hence a
    chosen end token; the answers are token ids because its text does not re-encode to them.)"""
    m = model
    rows = held_out_rows(6)
    router = _overrides(m, system, rows[:1])[0]
    gens = [m.generate(r["instruction"], input=r["input"], max_new_tokens=12, router=router,
                        overrides=_overrides(m, system, [r])[1][0]).token_ids for r in rows]
    checked = 0
    for k in (3, 8):
        cases = [(r, g[:k], g[k]) for r, g in zip(rows, gens) if len(g) > k and g[k] not in g[:k]]
        for r, a, end in cases:
            assert fully_right(m, [r], system, answers=[a], eos=[end]).all()
            assert not fully_right(m, [r], system, answers=[a[:-1] + [(a[-1] + 1) % 100]], eos=[end]).any()
            assert not fully_right(m, [r], system, answers=[a[:-1]], eos=[end]).any()
            checked += 1
        alone = [bool(fully_right(m, [r], system, answers=[a], eos=[cases[0][2]])[0]) for r, a, _ in cases]
        batch = fully_right(m, [r for r, *_ in cases], system, batch_size=4, answers=[a for _, a, _ in cases],
                            eos=[cases[0][2]])                             # left-padded together
        assert batch.tolist() == alone and alone[0]
    assert checked >= 6


def test_the_paired_interval_is_of_the_differences():
    a, b = np.array([1, 1, 1, 0] * 50, bool), np.array([1, 0, 1, 0] * 50, bool)
    d = paired(a, b)
    assert d["diff"] == pytest.approx(0.25) and d["ci95"][0] < 0.25 < d["ci95"][1] and d["width"] < 0.2
    assert paired(a, a) == {"diff": 0.0, "ci95": [0.0, 0.0], "width": 0.0, "n": 200}


@pytest.mark.parametrize("wordings", WORDINGS)
def test_the_wording_interval_resamples_wordings_not_rows(wordings):
    """Every row is made of one wording per skill it asks for. A difference carried by one wording of one skill is
    certain row by row and uncertain wording by wording: the wording interval is the wider, and it reaches 0 (a
    draw without that wording). A difference the same on every row has a point interval either way."""
    from demo.suite import heldout_phrases
    rows = held_out_rows(576, wordings)
    ids = wording_ids(rows, wordings)
    assert [len(i) for i in ids] == [len(r["experts"]) for r in rows]
    one = heldout_phrases(wordings)["ranges"][0]
    a = np.array([one in r["instruction"] for r in rows])
    d = paired(a, np.zeros(len(rows), bool), ids)
    assert d["ci95"][0] > 0.02 and d["width_wordings"] > 2 * d["width"] and d["ci95_wordings"][0] == 0.0
    same = paired(np.ones(len(rows), bool), np.zeros(len(rows), bool), ids)
    assert same["ci95"] == same["ci95_wordings"] == [1.0, 1.0]
    with pytest.raises(ValueError, match="is not made of one"):
        wording_ids([{**rows[0], "instruction": "List the labs."}], wordings)


def test_two_stored_reports_are_paired_without_a_model(tmp_path, capsys):
    import json

    from demo.decide import main
    report = {"manifest": "a", "n": 48, "seed": 24, "wordings": "heldout", "rows": {"shipped": [1] * 48}}
    other = {**report, "manifest": "b", "rows": {"shipped": [i % 2 for i in range(48)]}}
    for name, r in (("a", report), ("b", other), ("c", {**other, "n": 47})):
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    main(["--pair", str(tmp_path / "a.json"), str(tmp_path / "b.json")])
    out = capsys.readouterr().out
    assert out.startswith("a − b (48 rows, heldout wordings): +0.500, rows resampled [") and "wordings resampled" in out
    with pytest.raises(SystemExit, match=r"^error: .*c.json ran other rows \(n 47"):
        main(["--pair", str(tmp_path / "a.json"), str(tmp_path / "c.json")])
    (tmp_path / "d.json").write_text(json.dumps({"n": 48}))
    with pytest.raises(SystemExit, match=r"^error: .*d.json is not a demo.decide report \(it lacks manifest, seed, "):
        main(["--pair", str(tmp_path / "a.json"), str(tmp_path / "d.json")])


def test_reports_on_each_held_out_set_pool_into_one_difference(tmp_path, capsys):
    """Pooled, the rows add up and a skill's wordings are drawn from every set's: a difference carried by one set
    alone is certain row by row and not wording by wording."""
    import json

    from demo.decide import main, pool_reports
    reports = {}
    for w, n in (("heldout", 48), ("fresh", 48), ("blind", 36)):
        reports[w] = {"manifest": "a", "n": n, "seed": 24, "wordings": w, "rows": {"shipped": [int(w == "blind")] * n}}
        reports["o" + w] = {**reports[w], "manifest": "b", "rows": {"shipped": [0] * n}}
    for name, r in reports.items():
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    pooled = pool_reports([(reports[w], reports["o" + w], w) for w in ("heldout", "fresh", "blind")])
    assert pooled["diff"] == 36 / 132 and pooled["ci95"][0] > 0.15
    assert pooled["ci95_wordings"][0] < pooled["ci95"][0] and pooled["width_wordings"] > pooled["width"]
    alone = pool_reports([(reports["blind"], reports["oblind"], "blind")])
    assert alone["ci95"] == alone["ci95_wordings"] == [1.0, 1.0]

    def files(*names: str) -> str:
        return ",".join(str(tmp_path / f"{n}.json") for n in names)
    main(["--pair", files("heldout", "fresh", "blind"), files("oheldout", "ofresh", "oblind")])
    assert capsys.readouterr().out.startswith("a − b (132 rows, heldout, fresh, blind wordings): +0.273, rows")
    with pytest.raises(SystemExit, match=r"^error: --pair needs as many reports on each side, got 2 and 1$"):
        main(["--pair", files("heldout", "fresh"), files("oheldout")])
    with pytest.raises(SystemExit, match=r"^error: pooled reports must each ask other wordings, got heldout, heldout"):
        main(["--pair", files("heldout", "heldout"), files("oheldout", "oheldout")])


def test_a_pair_keeps_only_the_rows_that_need_so_many_experts(tmp_path, capsys):
    """`--skills 2`: the difference on the rows that need two experts, the others left out of both columns."""
    import json

    from demo.decide import held_out_rows, main
    sizes = [len(r["experts"]) for r in held_out_rows(48)]
    report = {"manifest": "a", "n": 48, "seed": 24, "wordings": "heldout", "rows": {"shipped": [1] * 48}}
    other = {**report, "manifest": "b", "rows": {"shipped": [int(k == 2) for k in sizes]}}  # b right on 2-skill rows
    for name, r in (("a", report), ("b", other)):
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    for skills, diff in (("2", "+0.000"), ("3", "+1.000")):
        main(["--pair", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--skills", skills])
        assert capsys.readouterr().out.startswith(
            f"a − b ({sizes.count(int(skills))} rows needing {skills} experts, heldout wordings): {diff}, rows")


def test_a_pair_can_keep_only_the_rows_a_stay_out_head_lets_in(tmp_path, capsys, monkeypatch):
    """`--let-in M`: rows M's head keeps out leave both columns (a model without a head would answer them)."""
    import json

    import demo.decide as dec
    sizes = [len(r["experts"]) for r in dec.held_out_rows(48)]
    report = {"manifest": "a", "n": 48, "seed": 24, "wordings": "heldout", "rows": {"shipped": [1] * 48}}
    other = {**report, "manifest": "b", "rows": {"shipped": [int(k == 2) for k in sizes]}}
    for name, r in (("a", report), ("b", other)):
        (tmp_path / f"{name}.json").write_text(json.dumps(r))
    monkeypatch.setattr(dec.ATMoE, "load", lambda path, device="auto": "the head's model")
    monkeypatch.setattr(dec, "kept_rows", lambda m, rows: [len(r["experts"]) == 3 for r in rows])
    dec.main(["--pair", str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--let-in", "m.json"])
    assert capsys.readouterr().out.startswith(
        f"a − b ({sizes.count(2)} rows let in by m.json's stay-out head, heldout wordings): +0.000, rows")


def test_the_held_out_rows_are_written_for_generation_without_a_model(tmp_path, capsys):
    """`--write-rows` hands the rows decide scores to `demo.evaluate --data` (and so to `demo.facts`)."""
    import json

    from demo.decide import held_out_rows, main
    main(["--n", "20", "--wordings", "blind", "--write-rows", str(tmp_path / "rows.jsonl")])
    rows = [json.loads(x) for x in (tmp_path / "rows.jsonl").read_text(encoding="utf-8").splitlines()]
    assert rows == held_out_rows(20, "blind") and rows != held_out_rows(20)
    assert "20 held-out rows (blind wordings" in capsys.readouterr().out


@pytest.mark.parametrize("systems", ["uniform", "shipped,flat", ""])
def test_systems_other_than_shipped_first_are_refused_in_one_line(systems):
    from demo.decide import main
    with pytest.raises(SystemExit, match=r"^error: --systems must start with shipped and name only shipped, "):
        main(["--systems", systems, "--n", "4"])


def test_transplant_asks_each_row_three_ways_and_counts_per_wording(model, tmp_path, monkeypatch):
    """demo.transplant on a tiny demo: every row needing the skill, once per way; the swapped text holds the training
    wording and no held-out one; the third way is the text as asked under the swapped text's replayed routing; the
    per-wording counts add up; a bad --n is one line."""
    import demo.transplant as tp
    from atmoe.overrides import ReplayedWeights
    from demo.suite import PHRASES
    monkeypatch.setattr(tp.ATMoE, "load", lambda *a, **k: model)
    asked, replayed = [], []
    real_fully, real_check = tp.fully_right, tp._check
    monkeypatch.setattr(tp, "fully_right", lambda m, rows, *a: asked.append(rows) or real_fully(m, rows, *a))
    monkeypatch.setattr(tp, "_check", lambda m, rows, ids, router, ov, eos: replayed.append((rows[0], ov))
                        or real_check(m, rows, ids, router, ov, eos))
    r = tp.transplant("tiny", "ranges", "Add the normal range to each.", 32)
    n = r["n"]
    assert n == sum(c["n"] for c in r["per_wording"].values()) == len(replayed) > 0
    assert all(len(v) == n for v in r["rows"].values())
    as_written, swapped = ([row["instruction"] for row in rows] for rows in asked)
    assert all("Add the normal range to each." in s and not any(p in s for p in PHRASES["ranges"][1]) for s in swapped)
    assert all(any(p in s for p in PHRASES["ranges"][1]) for s in as_written)
    assert [row["instruction"] for row, _ in replayed] == as_written
    assert all(isinstance(ov, ReplayedWeights) for _, ov in replayed)
    with pytest.raises(SystemExit, match=r"^error: --n must be >= 1"):
        tp.main(["--n", "0", "--out", str(tmp_path / "r.json")])
