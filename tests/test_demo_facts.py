"""The facts check: every answer line's value, flag and range against the note; vitals never read as labs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from demo.facts import check_answer, main, note_values, parse_line, score_answers
from demo.suite import complex_rows

REPO = Path(__file__).resolve().parents[1]
LABS_FIRST = "67 yo F with back pain.\nLabs: K 6.1, Hb 14.2, Na 139.\nVitals: SpO2 96, HR 76."
VITALS_FIRST = "67 yo F with back pain.\nVitals: SpO2 96, HR 76.\nLabs: K 6.1, Hb 14.2, Na 139."


def row(combo: list[str | None], note: str = LABS_FIRST) -> dict:
    return {"instruction": "…", "input": note, "output": "", "experts": [e for e in combo if e],
            "meta": {"combo": combo}}


def errors(answer: str, r: dict) -> list[list[str]]:
    return [c.errors for c in check_answer(answer, r).lines]


def test_lines_and_notes_are_read_as_the_suite_writes_them():
    assert note_values(VITALS_FIRST) == {"K": "6.1", "Hb": "14.2", "Na": "139", "HR": "76", "SpO2": "96"}
    assert parse_line("- potassium 6.1: high") == ("K", "6.1", "high", None)
    assert parse_line("Hb 14.2 (normal 12.0-17.0)") == ("Hb", "14.2", None, ("12.0", "17.0"))
    assert parse_line("systolic blood pressure 105 (normal 90.1)") == ("SBP", "105", None, ("90.1",))
    assert parse_line("WBC (normal 4.5-10.0)") == ("WBC", None, None, ("4.5", "10.0"))
    assert parse_line("Vitals: SpO2 96, HR 76.")[0] is None        # several facts on one line: none of them
    assert parse_line("Everything looks fine.")[0] is None


@pytest.mark.parametrize("combo, answer", [
    (["labs", "flags", None], "K 6.1: high\nHb 14.2: normal\nNa 139: normal"),
    (["labs", "flags", "plain"], "potassium 6.1: high\nhemoglobin 14.2: normal\nsodium 139: normal"),
    (["labs", "ranges", "bullets"], "- K 6.1 (normal 3.5-5.0)\n- Hb 14.2 (normal 12.0-17.0)\n- Na 139 (normal 135-145)"),
    (["vitals", None, "plain"], "oxygen level 96\nheart rate 76"),
    (["labs", "ranges", None], "K 6.1 (normal 3.5-5)\nHb 14.2 (normal 12-17)\nNa 139 (normal 135-145)"),  # 5 = 5.0
])
def test_right_answers_pass(combo, answer):
    check = check_answer(answer, row(combo))
    assert check.right and not check.missing and all(c.value == "ok" for c in check.lines)


def test_a_mangled_range_is_a_wrong_range_and_nothing_else():
    r = row(["labs", "ranges", None])
    assert errors("K 6.1 (normal 3.5-5.0)\nHb 14.2 (normal 1.2-1.7)\nNa 139 (normal 135-145)", r) == \
        [[], ["wrong range"], []]
    assert errors("K 6.1\nHb 14.2 (normal 12.0)\nNa 139 (normal 135-145)", r) == \
        [["missing range"], ["wrong range"], []]


def test_an_inverted_flag_is_a_wrong_flag_judged_on_the_notes_value():
    r = row(["labs", "flags", "plain"])
    assert errors("potassium 6.1: low\nhemoglobin 14.2: normal\nsodium 139: normal", r) == \
        [["wrong flag"], [], []]
    # a flag right for a wrong value is still wrong for the patient: 4.1 would be normal, the note's 6.1 is high
    assert errors("potassium 4.1: normal\nhemoglobin 14.2: normal\nsodium 139", r) == \
        [["wrong value", "wrong flag"], [], ["missing flag"]]


@pytest.mark.parametrize("note", [LABS_FIRST, VITALS_FIRST])
def test_a_vital_read_as_a_lab_is_a_cross_read_in_either_note_order(note):
    r = row(["labs", None, "plain"], note)
    check = check_answer("potassium 6.1\nhemoglobin 96\nsodium 139", r)     # SpO2's 96 under a lab's name
    assert [c.value for c in check.lines] == ["ok", "cross-read", "ok"] and not check.right
    # a vital listed in a labs answer, under its own name, is a cross-read too; the lab it displaced is missing
    check = check_answer("K 6.1\nSpO2 96\nNa 139", row(["labs", None, None], note))
    assert [c.value for c in check.lines] == ["ok", "cross-read", "ok"] and check.missing == ("Hb",)
    # the issue's case: the note has no hemoglobin at all; the 96 is still SpO2's, not an invented lab
    no_hb = note.replace(" Hb 14.2,", "")
    assert [c.value for c in check_answer("hemoglobin 96", row(["labs", None, None], no_hb)).lines] == ["cross-read"]
    # and the reverse: a lab read as a vital
    check = check_answer("heart rate 76\noxygen level 139", row(["vitals", None, "plain"], note))
    assert [c.value for c in check.lines] == ["ok", "cross-read"]


def test_a_wrong_value_and_a_measurement_the_note_lacks():
    r = row(["labs", None, None])
    assert [c.value for c in check_answer("K 6.7\nHb 14.2\nNa 139", r).lines] == ["wrong value", "ok", "ok"]
    assert [c.value for c in check_answer("K 6.1\nCr 14.2\nNa 139", r).lines] == ["ok", "not in note", "ok"]
    assert check_answer("K 6.1\nNa 139", r).missing == ("Hb",)            # incomplete, not wrong
    assert [c.errors for c in check_answer("K 6.1\nNa 139", r).lines] == [[], []]


def test_suffixes_nobody_asked_for_are_counted():
    assert errors("K 6.1: high\nHb 14.2 (normal 12.0-17.0)\nNa 139", row(["labs", None, None])) == \
        [["unasked flag"], ["unasked range"], []]


def _degenerate_scores(answer: str, r: dict) -> tuple:
    rep = score_answers([r], [answer])["overall"]
    return rep["lines"], rep["value_ok"], rep["flag_acc"], rep["missing"], rep["rows_right"], \
        score_answers([r], [answer])["degenerate"]


def test_degenerate_answers_score_what_they_say():
    r = row(["labs", "flags", None])
    # empty: no line to be wrong, every asked line missing; never right
    assert _degenerate_scores("", r) == (0, 0, None, 3, 0, {"empty": 1})
    # the note echoed: its lines each name several measurements or none, so none is read; all missing
    assert _degenerate_scores(LABS_FIRST, r) == (3, 0, None, 3, 0, {"echo": 1})
    # a constant line: once right (value and flag), then duplicates, which are not judged again; two missing
    assert _degenerate_scores("K 6.1: high\n" * 4, r) == (4, 1, 1.0, 2, 0, {"repeated": 1})
    # a constant word: nothing read
    assert _degenerate_scores("normal\n" * 3, r) == (3, 0, None, 3, 0, {"repeated": 1})
    # another row's reference: its measurements are not this note's (or not with these values)
    other = row(["labs", "flags", None], "50 yo M.\nLabs: Na 128, Cr 3.1, Glu 60.\nVitals: HR 120.")
    assert errors("Na 128: low\nCr 3.1: high\nGlu 60: low", other) == [[], [], []]
    assert errors("Na 128: low\nCr 3.1: high\nGlu 60: low", r) == [["wrong value", "wrong flag"], ["not in note"],
                                                                    ["not in note"]]
    assert _degenerate_scores("Na 128: low\nCr 3.1: high\nGlu 60: low", r)[:5] == (3, 0, 0.0, 2, 0)


def test_every_reference_answer_scores_full_marks_on_the_suites_own_rows():
    rows = [json.loads(x) for x in (REPO / "assets" / "data" / "eval.jsonl").read_text().splitlines()]
    rows += complex_rows(160, seed=3, heldout=True)            # every complex combination, other notes
    rep = score_answers(rows, [r["output"] for r in rows])
    o = rep["overall"]
    assert o["rows_right"] == o["rows"] == len(rows) and o["value_acc"] == o["flag_acc"] == o["range_acc"] == 1.0
    assert o["missing"] == o["cross_reads"] == o["unasked"] == 0 and o["lines"] == o["expected"]
    assert rep["confusion"] == [] and len(rep["by_combo"]) == 16


def test_the_stored_shipped_answers_are_scored_and_exact_answers_are_right(tmp_path, capsys):
    results = json.loads((REPO / "assets" / "eval" / "results.json").read_text())
    rows = [json.loads(x) for x in (REPO / "assets" / "data" / "eval.jsonl").read_text().splitlines()]
    answers = results["answers"][results["shipped"]]
    rep = score_answers(rows, answers)
    assert rep["rows"] == len(answers) == 64
    for a, r, s in zip(answers, rows, rep["answers"]):
        if a.strip().lower() == r["output"].strip().lower():
            assert s["right"]                                  # an exact answer is never marked wrong
    assert rep["overall"]["rows_right"] < 64                   # and the shipped model's errors are found
    main(["--results", str(REPO / "assets" / "eval" / "results.json"), "--out", str(tmp_path / "f.json")])
    assert "| **all** | 64 |" in capsys.readouterr().out
    assert json.loads((tmp_path / "f.json").read_text())["overall"] == rep["overall"]


def test_rows_a_stay_out_head_keeps_out_are_left_unscored(tmp_path, capsys, monkeypatch):
    """`--let-in M`: the rows M's head keeps out (answered as the base model answers) leave the score."""
    import torch

    import atmoe
    import atmoe.train.stay_out as so
    from demo.facts import main
    monkeypatch.setattr(atmoe.ATMoE, "load", lambda path, device="auto": "the head's model")
    monkeypatch.setattr(so, "kept_out", lambda m, rows: torch.tensor([i < 10 for i in range(len(rows))]))
    main(["--results", str(REPO / "assets" / "eval" / "results.json"), "--let-in", "m.json"])
    out = capsys.readouterr().out
    assert "10 of 64 rows kept out by m.json's stay-out head: not scored" in out and "| **all** | 54 |" in out


def test_the_routing_join_reads_each_knowledge_rows_gate_on_a_tiny_demo(tmp_path):
    """`--routing`: every row that asks for a knowledge expert gets its knowledge gate and the asked expert's
    weight, as the model's own trace gives them."""
    from atmoe import ATMoE
    from demo.facts import knowledge_routing
    from tiny_models import tiny_demo

    manifest = tiny_demo(tmp_path / "tiny", mode="sigmoid")
    rows = complex_rows(12, heldout=True)
    rep = score_answers(rows, [r["output"] for r in rows])
    table = knowledge_routing(rep, rows, str(manifest))
    asked = [i for i, r in enumerate(rows) if r["meta"]["combo"][1]]
    assert len(table.splitlines()) == 2 + len(asked) and "| right |" in table
    m = ATMoE.load(manifest, device="cpu")
    for i in asked:
        tr = m.route(rows[i]["instruction"], input=rows[i]["input"])
        expert = rows[i]["meta"]["combo"][1]
        assert rep["answers"][i]["knowledge_gate"] == pytest.approx(
            float(tr.group_weights[:, tr.groups.index("knowledge")].max()), abs=1e-5)
        assert rep["answers"][i]["asked_weight"] == pytest.approx(
            float(tr.expert_weights[:, tr.experts.index(expert)].mean()), abs=1e-5)
    assert all("knowledge_gate" not in rep["answers"][i] for i in range(len(rows)) if i not in asked)
