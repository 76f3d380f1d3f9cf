"""The counterfactual check of word attribution (`atmoe.analysis.counterfactual`) on a tiny model: the word deleted
is the argmax of `Explanation.by_word` for the group with the highest layer-mean gate, the weights after deletion are
`m.route` of the instruction without that word, the random word is never the top word, and the rate and its Wilson
interval are computed right."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from tiny_models import tiny_demo

from atmoe import ATMoE
from atmoe.analysis.counterfactual import COLUMNS, counterfactual, delete_word, summarize
from atmoe.cli import main

ROWS = [("List the vital signs. Flag each as low, normal or high.", "72 yo M. Vitals: HR 135, SpO2 88."),
        ("Use bullet points and plain words for the lab results.", "Labs: Na 128, K 4.1."),
        ("Give the reference range next to each value.", ""),
        ("Which labs are abnormal?", "Labs: Hb 9.1, WBC 14.")]


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, one_torch_thread) -> str:
    return str(tiny_demo(tmp_path_factory.mktemp("counterfactual")))


@pytest.fixture(scope="module")
def m(manifest) -> ATMoE:
    return ATMoE.load(manifest, device="cpu")


@pytest.fixture(scope="module")
def result(m):
    return counterfactual(m, ROWS, seed=3)


def _layer_mean(m: ATMoE, instruction: str, input: str):
    return m.route(instruction, input=input).group_weights.mean(0)


def test_delete_word_removes_one_word_and_keeps_every_other_character():
    text = "List  the vital\nsigns."
    assert delete_word(text, 0) == "the vital\nsigns."
    assert delete_word(text, 1) == "List  vital\nsigns."
    assert delete_word(text, 2) == "List  the signs."
    assert delete_word(text, 3) == "List  the vital"
    assert delete_word("alone", 0) == ""
    with pytest.raises(ValueError):
        delete_word(text, 4)


def test_the_group_is_the_highest_layer_mean_gate_and_the_word_is_the_argmax_of_by_word(m, result):
    frame, _ = result
    assert list(frame.columns) == COLUMNS and list(frame.row) == [0, 1, 2, 3]
    for r in frame.itertuples():
        instruction, input = ROWS[r.row]
        alpha = _layer_mean(m, instruction, input)
        assert r.group == m.router.config.layout.groups[int(np.argmax(alpha))]
        assert r.weight == pytest.approx(float(alpha.max()), abs=1e-6)
        words = m.explain(instruction, input).by_word(f"group:{r.group}")
        assert list(words.text) == instruction.split()
        assert r.top_word == int(words.contribution.idxmax())
        assert r.top_text == words.text[r.top_word]
        assert r.top_contribution == pytest.approx(words.contribution.max())
        assert r.random_contribution == pytest.approx(words.contribution[r.random_word])


def test_an_argmin_choice_would_fail(m, result):
    """The top word has the largest contribution, strictly above the smallest: choosing by argmin is caught."""
    frame, _ = result
    for r in frame.itertuples():
        words = m.explain(*ROWS[r.row]).by_word(f"group:{r.group}").contribution
        assert words.max() > words.min()
        assert r.top_contribution > words.min()
        assert r.top_contribution >= r.random_contribution


def test_the_weights_after_deletion_are_route_of_the_instruction_without_the_word(m, result):
    frame, _ = result
    groups = list(m.router.config.layout.groups)
    for r in frame.itertuples():
        instruction, input = ROWS[r.row]
        g = groups.index(r.group)
        for word, weight, drop in ((r.top_word, r.top_weight, r.drop_top),
                                   (r.random_word, r.random_weight, r.drop_random)):
            expected = float(_layer_mean(m, delete_word(instruction, word), input)[g])
            assert weight == pytest.approx(expected, abs=1e-5)
            assert drop == pytest.approx(r.weight - expected, abs=1e-5)
        assert r.top_wins == (r.drop_top > r.drop_random)


def test_the_random_word_is_never_the_top_word_and_is_seeded(m):
    rows = [ROWS[3]] * 12   # 4 words: the random word is one of the 3 others
    frame, _ = counterfactual(m, rows, seed=0)
    assert (frame.random_word != frame.top_word).all()
    assert frame.top_word.nunique() == 1
    assert set(frame.random_word) == set(range(4)) - {frame.top_word[0]}   # all three drawn (seed 0)
    again, _ = counterfactual(m, rows, seed=0)
    pd.testing.assert_frame_equal(frame, again)
    other, _ = counterfactual(m, rows, seed=1)
    assert list(other.random_word) != list(frame.random_word)


def test_rows_of_one_word_are_left_out(m):
    frame, summary = counterfactual(m, [("Bullets.", ""), ROWS[2]], seed=0)
    assert list(frame.row) == [1] and summary["rows"] == 1


def test_rate_and_wilson_interval_on_a_hand_made_frame():
    drop_top = [0.3, 0.2, 0.1, 0.5, 0.4, 0.1, 0.2, 0.0, -0.1, 0.1]
    drop_random = [0.1, 0.1, 0.0, 0.2, 0.3, 0.0, 0.1, 0.1, 0.0, 0.1]   # 7 wins; the last row is a tie: no win
    s = summarize(pd.DataFrame({"drop_top": drop_top, "drop_random": drop_random}))
    assert (s["rows"], s["wins"], s["rate"]) == (10, 7, 0.7)
    assert s["interval"] == pytest.approx((0.3968, 0.8922), abs=1e-4)   # Wilson 95 % for 7/10
    assert s["mean_drop_top"] == pytest.approx(0.18) and s["mean_drop_random"] == pytest.approx(0.1)
    assert summarize(pd.DataFrame({"drop_top": [], "drop_random": []}))["rows"] == 0


def test_cli_prints_the_rate_and_writes_one_line_per_row(manifest, tmp_path, capsys):
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps({"instruction": i, "input": x}) + "\n" for i, x in ROWS))
    out = tmp_path / "cf.csv"
    assert main(["counterfactual", "--manifest", manifest, "--dataset", str(data), "--device", "cpu",
                 "--limit", "3", "--seed", "3", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "95% Wilson" in printed and "/3 rows" in printed
    assert len(pd.read_csv(out)) == 3
