"""Steering by groups (`demo/steer.py`): the reference without a switched-off skill is the suite's own composition
of the skills left, and switching a group off disables exactly its experts."""

from __future__ import annotations

import json
import random

import pytest
from tiny_models import tiny_demo

from atmoe import ATMoE
from demo.decide import _overrides, fully_right
from demo.steer import main, without
from demo.suite import GROUPS, answer, sample_case


def test_the_reference_without_a_group_is_the_composition_of_the_skills_left():
    rng = random.Random(3)
    for _ in range(12):
        case = sample_case(rng)
        for task in GROUPS["task"]:
            for knowledge in GROUPS["knowledge"]:
                for style in GROUPS["style"]:
                    row = {"instruction": "", "input": "", "output": answer(case, task, knowledge, style),
                           "experts": [task, knowledge, style], "meta": {"combo": [task, knowledge, style]}}
                    assert without(row, "style")["output"] == answer(case, task, knowledge, None)
                    assert without(row, "knowledge")["output"] == answer(case, task, None, style)
                    assert without(row, "style")["experts"] == [task, knowledge]
    with pytest.raises(ValueError, match="names no measurement and value"):
        without({**row, "output": "nothing here"}, "style")


def test_switching_a_group_off_disables_its_experts_and_is_scored(tmp_path):
    m = ATMoE.load(tiny_demo(tmp_path / "m", trained=False), device="cpu")
    rows = [{"instruction": "List the labs.", "input": "Labs: Na 128.", "output": "Na 128", "experts": ["labs"]}] * 2
    router, overrides = _overrides(m, "off:style", rows)
    assert router is m.router and [o.disabled for o in overrides] == [("bullets", "plain")] * 2
    assert fully_right(m, rows, "off:style").shape == (2,)


def test_a_report_on_other_rows_is_refused_in_one_line_before_any_model_runs(tmp_path):
    bad = tmp_path / "other.json"
    bad.write_text(json.dumps({"n": 64, "wordings": "heldout", "rows": {}}))
    with pytest.raises(SystemExit, match=r"^error: .*other.json is not a demo.steer report on the same rows \(n 64, "
                                         r"wordings heldout; this run: n 576, wordings heldout\)$"):
        main(["--manifest", str(tmp_path / "missing.json"), "--against", str(bad)])
