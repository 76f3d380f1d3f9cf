"""The never-invented check: every value an answer writes must be in the note (or be knowledge the row asks for)."""

from __future__ import annotations

import json

import pytest

from atmoe.grounding import numbers
from demo.abstention import AbstentionConfig, check_row, invented_values, range_numbers
from demo.suite import answer, complex_rows

NOTE = "Note: 58-year-old man on metformin 500 mg twice daily and lisinopril 10 mg daily."


def test_the_issue_example_is_caught_and_the_right_answer_passes():
    invented = invented_values("systolic blood pressure 120\nblood sugar 120\ncreatinine 120", NOTE)
    assert invented.invented == ("120", "creatinine", "blood sugar", "systolic blood pressure") and not invented.ok
    right = invented_values("- Metformin 500 mg twice daily\n- Lisinopril 10 mg daily", NOTE)
    assert right.ok and right.degenerate is None


@pytest.mark.parametrize("answer, degenerate, ok", [
    ("", "empty", True),                                   # says nothing: incomplete, not invented
    ("  \n ", "empty", True),
    (NOTE, "echo", True),                                  # the note back: nothing invented, nothing added
    (NOTE.lower(), "echo", True),
    ("120\n120\n120\n120", "repeated", False),             # a constant that is not in the note
    ("metformin 500 mg\nmetformin 500 mg\nmetformin 500 mg", "repeated", True),
    ("creatinine 10\nblood sugar 120\ncreatinine 10", None, False),
])
def test_degenerate_answers_are_named_and_scored(answer, degenerate, ok):
    check = invented_values(answer, NOTE)
    assert (check.degenerate, check.ok) == (degenerate, ok)


def test_a_note_number_under_a_measurement_the_note_lacks_is_invented():
    assert invented_values("sodium 10", NOTE).invented == ("sodium",)         # 10 is lisinopril's dose
    assert invented_values("Sodium: 10", NOTE).invented == ("sodium",)
    assert invented_values("Na was 10", NOTE).invented == ("sodium",)
    assert invented_values("oxygen level 88", "Vitals: SpO2 88.").ok          # a lay name for the note's SpO2
    assert invented_values("Take it at 8 pm.", NOTE).invented == ("8",)


def test_a_measurement_named_without_a_value_is_a_mention_not_an_invention():
    """"Metformin 500 mg: lowers blood sugar" explains a drug; it measures nothing. Listed apart, not invented."""
    check = invented_values("- Metformin 500 mg twice daily: lowers blood sugar\n- Lisinopril 10 mg daily", NOTE)
    assert check.ok and check.mentioned == ("blood sugar",)
    check = invented_values("blood sugar 10, and the sodium is fine", NOTE)     # one with a value, one without
    assert check.invented == ("blood sugar",) and check.mentioned == ("sodium",)
    assert invented_values("Na 128: low", "Labs: Na 128.").mentioned == ()    # the note names it


def test_values_are_read_as_written_not_inside_words_or_list_markers():
    assert numbers("SpO2 96, B12 low, HR 118/80, Hb 1.2-1.7") == ["96", "118", "80", "1.2", "1.7"]
    assert numbers("1. metformin 500 mg\n2) lisinopril 10 mg") == ["500", "10"]
    assert invented_values("Hb 10.0", "Hb 10").ok                   # the same value
    assert invented_values("Hb 10.1", "Hb 10").invented == ("10.1",)   # a shifted value is invented
    assert invented_values("age 85", "85 yo F").ok


def test_reference_ranges_are_allowed_only_on_rows_that_ask_for_them():
    row = next(r for r in complex_rows(40, heldout=True) if "ranges" in r["experts"])
    assert check_row(row["output"], row).ok                          # the reference answer invents nothing
    no_ranges = {**row, "experts": [e for e in row["experts"] if e != "ranges"]}
    assert not check_row(row["output"], no_ranges).ok                # the same lines, unasked: invented
    assert range_numbers("Labs: Na 128, K 4.1.") == ("135", "145", "3.5", "5.0")   # only the note's measurements


def test_every_reference_answer_of_the_held_out_rows_passes_and_a_mangled_range_fails():
    rows = complex_rows(64, heldout=True)
    assert all(check_row(r["output"], r).ok for r in rows)
    row = next(r for r in rows if "ranges" in r["experts"] and "Hb " in r["input"] and "Cr " not in r["input"])
    mangled = row["output"].replace("(normal 12.0-17.0)", "(normal 1.2-1.7)")   # Cr's upper limit, out of place
    assert mangled != row["output"] and check_row(mangled, row).invented == ("1.2", "1.7")


def test_settings_are_checked():
    with pytest.raises(ValueError, match="same_n"):
        AbstentionConfig(everyday_n=10, same_n=11)
    with pytest.raises(ValueError, match="outside_n"):
        AbstentionConfig(outside_n=-1)
    with pytest.raises(ValueError, match="grounded answers are generated"):
        AbstentionConfig(grounded=True, inskill_answers="assets/eval/results.json")
    assert answer  # the suite's composition rule is what the reference answers above come from


def test_the_harness_runs_end_to_end_on_a_tiny_demo(tmp_path):
    """Every measurement on a tiny model: counts as asked, the stays-out share is what each row's routing says."""
    import numpy as np

    from atmoe import ATMoE
    from demo.abstention import measure, summary
    from demo.everyday import everyday_rows
    from tiny_models import tiny_demo

    manifest = tiny_demo(tmp_path / "tiny", mode="sigmoid")
    cfg = AbstentionConfig(manifest=str(manifest), everyday_n=6, same_n=3, outside_n=2, inskill_n=3,
                           max_new_tokens=4, answer_tokens=6, device="cpu")
    report = measure(cfg)
    assert report["stays_out"]["n"] == 6 and report["same_as_base"]["n"] == 3
    assert [report["outside"][w]["n"] for w in ("instruction", "input")] == [2, 2] and report["inskill"]["n"] == 3
    m = ATMoE.load(manifest, device="cpu")
    closed = [m.route(r["instruction"]).group_weights.max() <= 0.3 for r in everyday_rows("heldout", 6)]
    assert report["stays_out"]["share_closed"] == pytest.approx(np.mean(closed))
    for row in report["same_as_base"]["rows"]:
        assert row["identical"] <= (row["routed"] == row["base"])   # identical tokens give identical text
    assert "stays out" in summary(report) and report["needed"]["needed_groups"] > 0
    for w in ("instruction", "input"):     # the base model on the same rows: whose invention it is
        assert report["outside_base"][w]["n"] == 2 and 0 <= report["outside"][w]["same_as_base"] <= 2
    assert report["issue_example_base"]["n"] == 2 and "the base model (every expert disabled)" in summary(report)
    from demo.abstention import rescore
    again = rescore(json.loads(json.dumps(report)))
    assert again["outside_base"] == report["outside_base"] and again["outside"] == report["outside"]
