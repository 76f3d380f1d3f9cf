"""The synthetic medical suite: determinism, held-out splits, composition and scorers."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from atmoe.medical import GROUPS, EXPERT_DESCRIPTIONS, HELDOUT_COMBOS, TRAIN_COMBOS, score_example, write_suite
from atmoe.medical.cases import Case, case_meta, compose, lab_flag, note, sample_case, triage
from atmoe.medical.facts import ABBREVIATIONS, DRUGS, JARGON, LABS
from atmoe.medical.generator import KNOWLEDGE_CLAUSES, STYLE_CLAUSES, TASK_PHRASES
from atmoe.medical.metrics import SCORERS, forbidden_terms

ALL_EXPERTS = [n for names in GROUPS.values() for n in names]


def _read(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def suite(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    return write_suite(tmp_path_factory.mktemp("suite"), seed=0, n_expert=60, n_router=150, n_eval=60)


def test_constants() -> None:
    assert GROUPS == {"task": ["summarize", "extract_meds", "triage"], "knowledge": ["drug_classes", "lab_interpretation"],
                      "style": ["plain_language", "bullet_points"]}
    assert set(EXPERT_DESCRIPTIONS) == set(ALL_EXPERTS) == set(SCORERS)
    assert len(DRUGS) >= 20 and len(LABS) >= 10 and len(ABBREVIATIONS) >= 25 and len(JARGON) >= 20


def test_same_seed_same_bytes_other_seed_differs(tmp_path: Path, suite: dict[str, Path]) -> None:
    again = write_suite(tmp_path / "a", seed=0, n_expert=60, n_router=150, n_eval=60)
    other = write_suite(tmp_path / "b", seed=1, n_expert=60, n_router=150, n_eval=60)
    assert set(again) == set(suite) == {f"expert:{n}" for n in ALL_EXPERTS} | {"router_train", "eval"}
    for key in suite:
        assert again[key].read_bytes() == suite[key].read_bytes(), key
        assert other[key].read_bytes() != suite[key].read_bytes(), key
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]  # atomic writes leave no temp files


def test_rows_are_well_formed(suite: dict[str, Path]) -> None:
    for key, path in suite.items():
        for row in _read(path):
            assert {"instruction", "input", "output", "experts", "meta"} <= set(row)
            assert row["output"] and row["input"] and row["instruction"]
            if key.startswith("expert:"):
                assert row["experts"] == [key.removeprefix("expert:")]
            else:
                task = [e for e in row["experts"] if e in GROUPS["task"]]
                assert len(task) == 1 and row["experts"][0] == task[0]
                assert row["experts"] == [e for e in ALL_EXPERTS if e in row["experts"]]  # GROUPS order


def _combo(row: dict) -> tuple:
    e = row["experts"]
    return (e[0], tuple(x for x in e if x in GROUPS["knowledge"]), tuple(x for x in e if x in GROUPS["style"]))


def test_eval_wording_and_combos_never_seen_in_training(suite: dict[str, Path]) -> None:
    train = [r for k, p in suite.items() if k != "eval" for r in _read(p)]
    evals = _read(suite["eval"])
    train_instructions = {r["instruction"] for r in train}
    heldout_phrases = [p for table in (TASK_PHRASES, KNOWLEDGE_CLAUSES, STYLE_CLAUSES) for _, held in table.values() for p in held]
    for row in evals:
        assert row["instruction"] not in train_instructions
        assert _combo(row) in HELDOUT_COMBOS
    for phrase in heldout_phrases:
        assert not any(phrase in i for i in train_instructions), phrase
    router_combos = {_combo(r) for r in _read(suite["router_train"])}
    assert router_combos == set(TRAIN_COMBOS)  # every training combo appears
    assert not router_combos & set(HELDOUT_COMBOS)
    assert {_combo(r) for r in evals} == set(HELDOUT_COMBOS)
    assert {e for c in HELDOUT_COMBOS for e in (c[0], *c[1], *c[2])} == set(ALL_EXPERTS)


def test_generator_outputs_score_perfectly(suite: dict[str, Path]) -> None:
    for path in suite.values():
        for row in _read(path):
            scores = score_example(row["output"], row)
            assert scores and all(v == 1.0 for v in scores.values()), (row["output"], scores)
            assert set(scores) <= set(row["experts"])


def test_plain_vocabulary_is_clean_and_notes_are_not() -> None:
    plain_words = [*ABBREVIATIONS.values(), *JARGON.values(), *LABS] + [
        w for d in DRUGS.values() for w in (d.drug_class, d.purpose)] + list(DRUGS)
    assert [w for w in plain_words if forbidden_terms(w)] == []
    rng = random.Random(0)
    assert all(forbidden_terms(note(sample_case(rng))) for _ in range(50))


def _case(**changes: object) -> Case:
    base = dict(age=70, sex="F", complaint="SOB", history=("HTN",), hr=80, sbp=120, dbp=80, rr=16, spo2=97, temp=37.0,
                meds=(("metformin", "500 mg PO BID"), ("lisinopril", "10 mg PO daily")),
                labs=(("potassium", 5.6), ("sodium", 138.0)))
    return Case(**{**base, **changes})  # type: ignore[arg-type]


@pytest.mark.parametrize("changes, level", [
    ({"spo2": 89}, "EMERGENT"), ({"spo2": 90}, "ROUTINE"), ({"sbp": 85}, "EMERGENT"), ({"hr": 131}, "EMERGENT"),
    ({"hr": 130}, "URGENT"), ({"hr": 110}, "ROUTINE"), ({"temp": 38.5}, "URGENT"), ({"temp": 38.4}, "ROUTINE"),
    ({"rr": 25}, "URGENT"), ({"rr": 24}, "ROUTINE"), ({"spo2": 85, "temp": 39.0}, "EMERGENT"),
])
def test_triage_rules(changes: dict, level: str) -> None:
    assert triage(_case(**changes))[0] == level


def test_lab_flags_use_inclusive_reference_range() -> None:
    assert [lab_flag("potassium", v) for v in (3.4, 3.5, 5.0, 5.1)] == ["low", "normal", "normal", "high"]


def _example(experts: list[str], case: Case | None = None) -> dict:
    case = case or _case(spo2=86)
    knowledge = tuple(e for e in experts if e in GROUPS["knowledge"])
    style = tuple(e for e in experts if e in GROUPS["style"])
    task = experts[0] if experts[0] in GROUPS["task"] else None
    return {"experts": experts, "meta": case_meta(case, task, knowledge, style)}


def test_composition_example_from_the_brief() -> None:
    answer = compose(_case(), "extract_meds", ("drug_classes",), ("bullet_points",))
    assert answer == ("- metformin 500 mg PO BID: biguanide, lowers blood sugar\n"
                      "- lisinopril 10 mg PO daily: ACE inhibitor, lowers blood pressure")
    plain = compose(_case(), "extract_meds", (), ("plain_language",))
    assert json.loads(plain)[0] == {"drug": "metformin", "dose": "500 mg by mouth twice a day"}


def test_scorers_right_and_wrong_answers() -> None:
    ex = _example(["extract_meds"])
    right = '[{"drug": "metformin", "dose": "500 mg PO BID"}, {"drug": "lisinopril", "dose": "10 mg PO daily"}]'
    assert score_example(right, ex) == {"extract_meds": 1.0}
    assert score_example('[{"drug": "metformin", "dose": "500 mg PO BID"}]', ex)["extract_meds"] == pytest.approx(2 / 3)
    assert score_example('[{"drug": "metformin", "dose": "500 mg PO BID"', ex)["extract_meds"] == 0.0  # invalid JSON

    ex = _example(["triage"])
    assert score_example("EMERGENT: SpO2 86%, below 90%", ex) == {"triage": 1.0}
    assert score_example("URGENT: SpO2 86%", ex) == {"triage": 0.0}
    assert score_example("unclear", ex) == {"triage": 0.0}

    ex = _example(["summarize"])
    assert score_example("70-year-old female with SOB; key finding: SpO2 86%", ex) == {"summarize": 1.0}
    assert score_example("70-year-old male with SOB; key finding: SpO2 86%", ex) == {"summarize": 0.75}
    assert score_example("An adult with a cough.", ex) == {"summarize": 0.0}

    ex = _example(["drug_classes"])
    assert score_example("metformin: biguanide, lowers blood sugar\nlisinopril: ACE inhibitor", ex)["drug_classes"] == 1.0
    assert score_example("metformin: statin\nlisinopril: ACE inhibitor", ex)["drug_classes"] == 0.5

    ex = _example(["lab_interpretation"])
    assert score_example("potassium 5.6 mmol/L: high\nsodium 138 mmol/L: normal", ex)["lab_interpretation"] == 1.0
    assert score_example("potassium 5.6 mmol/L: normal\nsodium 138 mmol/L: normal", ex)["lab_interpretation"] == 0.5
    assert score_example("labs look fine", ex)["lab_interpretation"] == 0.0

    ex = _example(["plain_language"])
    assert score_example("A 70-year-old woman came in with shortness of breath.", ex) == {"plain_language": 1.0}
    assert score_example("70 yo F c/o SOB.\nShe has high blood pressure.", ex) == {"plain_language": 0.5}
    assert score_example("Patient has dyspnea.", ex) == {"plain_language": 0.0}

    ex = _example(["bullet_points"])
    assert score_example("- a\n- b\n\n", ex) == {"bullet_points": 1.0}
    assert score_example("- a\nb", ex) == {"bullet_points": 0.5}
    assert score_example("* a", ex) == {"bullet_points": 0.0}


def test_scorers_for_composed_answers() -> None:
    ex = _example(["extract_meds", "drug_classes", "bullet_points"])
    good = "- metformin 500 mg PO BID: biguanide, lowers blood sugar\n- lisinopril 10 mg PO daily: ACE inhibitor, x"
    assert score_example(good, ex) == {"extract_meds": 1.0, "drug_classes": 1.0, "bullet_points": 1.0}
    ex = _example(["extract_meds", "drug_classes"])
    swapped = ('[{"drug": "metformin", "dose": "500 mg PO BID", "class": "ACE inhibitor"}, '
               '{"drug": "lisinopril", "dose": "10 mg PO daily", "class": "biguanide"}]')
    assert score_example(swapped, ex) == {"extract_meds": 1.0, "drug_classes": 0.0}


def test_lab_scorer_skips_summary_line_that_names_the_flag_first() -> None:
    ex = _example(["summarize", "lab_interpretation"], _case(labs=(("calcium", 6.7),)))
    answer = "70-year-old female with SOB; key finding: low calcium (6.7 mg/dL)\ncalcium 6.7 mg/dL: low"
    assert score_example(answer, ex)["lab_interpretation"] == 1.0
    wrong = "70-year-old female with SOB; key finding: low calcium (6.7 mg/dL)\ncalcium 6.7 mg/dL: high"
    assert score_example(wrong, ex)["lab_interpretation"] == 0.0
