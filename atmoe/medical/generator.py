"""Deterministic synthetic medical instruction suite: expert, router and held-out eval splits.

* ``experts/<name>.jsonl`` — one skill per file, several paraphrased instructions each.
* ``router_train.jsonl`` — *complex* instructions: one task plus optional knowledge and
  style needs, answered by :func:`atmoe.medical.cases.compose`, labelled with the experts
  they need.
* ``eval.jsonl`` — complex instructions built only from held-out phrasings and only for
  ``HELDOUT_COMBOS``: neither the wording nor the skill combination occurs in training.

Every row is ``{"instruction", "input", "output", "experts", "meta"}``; ``meta`` carries the
structured truth for :mod:`atmoe.medical.metrics`. Same seed, same bytes.
"""

from __future__ import annotations

import itertools
import json
import os
import random
import tempfile
from pathlib import Path
from typing import Any

from atmoe.medical.cases import GROUPS, Case, case_meta, compose, note, sample_case, solo_answer

Combo = tuple[str, tuple[str, ...], tuple[str, ...]]  # (task, knowledge experts, style experts)

# Single-skill instructions for each expert's own training set.
EXPERT_INSTRUCTIONS: dict[str, tuple[str, ...]] = {
    "summarize": ("Summarize this case in one line.", "Give a one-line summary of this patient.",
                  "Write a brief case summary.", "Summarize the note: age, sex, complaint and key finding."),
    "extract_meds": ("List the medications and doses as JSON.", "Extract each medication with its dose as a JSON list.",
                     "Return the patient's medications as JSON with drug and dose.", "What is this patient taking? Answer in JSON."),
    "triage": ("Triage this patient.", "Assign a triage level (EMERGENT, URGENT or ROUTINE) and give the reason.",
               "How urgently does this patient need care?", "Give the triage level and the vital sign behind it."),
    "drug_classes": ("What class is each medication and what is it for?", "Give the drug class and purpose of each medication.",
                     "Explain what each of the patient's medicines is for.", "Name the class of every drug in the note."),
    "lab_interpretation": ("Interpret the lab results.", "Flag each lab as low, normal or high.",
                           "Check each lab value against its reference range.", "Are the labs normal?"),
    "plain_language": ("Explain the patient's history and complaint in plain language.",
                       "Rewrite the history and complaint so a patient can understand it.",
                       "Describe why this patient came in, in everyday words.", "Tell the story of this visit simply."),
    "bullet_points": ("List the key facts of this note as bullet points.", "Give the main facts as a bulleted list.",
                      "Break the note down into short bullet points.", "Bullet the important facts."),
}

# Phrase pieces for complex instructions: (training phrasings, held-out eval phrasings).
TASK_PHRASES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "summarize": (("Summarize this case in one line", "Give a one-line summary of this patient", "Write a brief summary of the case"),
                  ("Sum up this patient's presentation briefly", "Condense the encounter into a single sentence")),
    "extract_meds": (("List the patient's medications and doses", "Extract every medication with its dose", "Write out the medication list"),
                     ("Pull out the drugs and their doses from the note", "Itemize what the patient currently takes")),
    "triage": (("Triage this patient", "Assign a triage level to this patient", "Decide how urgently this patient needs care"),
               ("Determine the triage category for this case", "Rate the acuity of this presentation")),
}
KNOWLEDGE_CLAUSES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "drug_classes": (("with what each medication is for", "including each drug's class and purpose"),
                     ("noting the drug class and use of every medicine",)),
    "lab_interpretation": (("and flag each lab as low, normal or high", "and interpret the lab results"),
                           ("and say whether each lab value is in range",)),
}
STYLE_CLAUSES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "plain_language": (("in plain language", "using words a patient would understand"),
                       ("without any medical jargon or abbreviations",)),
    "bullet_points": (("as bullet points", "formatted as a bulleted list"),
                      ("with one dash-prefixed line per item",)),
}


def _subsets(names: list[str]) -> list[tuple[str, ...]]:
    return [c for r in range(len(names) + 1) for c in itertools.combinations(names, r)]


ALL_COMBOS: tuple[Combo, ...] = tuple(
    (t, k, s) for t in GROUPS["task"] for k in _subsets(GROUPS["knowledge"]) for s in _subsets(GROUPS["style"]))
# Never used for training; chosen so every expert appears in at least one.
HELDOUT_COMBOS: tuple[Combo, ...] = (
    ("summarize", ("drug_classes",), ()),
    ("summarize", ("lab_interpretation",), ("bullet_points",)),
    ("summarize", ("drug_classes", "lab_interpretation"), ("plain_language",)),
    ("extract_meds", ("lab_interpretation",), ("plain_language",)),
    ("extract_meds", (), ("plain_language", "bullet_points")),
    ("extract_meds", ("drug_classes", "lab_interpretation"), ("bullet_points",)),
    ("triage", ("drug_classes",), ("bullet_points",)),
    ("triage", ("lab_interpretation",), ("plain_language", "bullet_points")),
    ("triage", ("drug_classes", "lab_interpretation"), ()),
)
TRAIN_COMBOS: tuple[Combo, ...] = tuple(c for c in ALL_COMBOS if c not in HELDOUT_COMBOS)


def combo_experts(combo: Combo) -> list[str]:
    """Expert labels of a combination, in ``GROUPS`` order."""
    task, knowledge, style = combo
    return [task, *knowledge, *style]


def complex_instruction(combo: Combo, rng: random.Random, heldout: bool) -> str:
    """Instruction for ``combo`` from training phrasings, or only held-out ones when ``heldout``."""
    pick = 1 if heldout else 0
    task, knowledge, style = combo
    parts = [rng.choice(TASK_PHRASES[task][pick])] + [rng.choice(KNOWLEDGE_CLAUSES[k][pick]) for k in knowledge]
    text = " ".join(parts)
    if style:
        text += ", " + ", ".join(rng.choice(STYLE_CLAUSES[s][pick]) for s in style)
    return text + "."


def _row(instruction: str, case: Case, output: str, experts: list[str], meta: dict[str, Any]) -> dict[str, Any]:
    return {"instruction": instruction, "input": note(case), "output": output, "experts": experts, "meta": meta}


def expert_rows(name: str, n: int, seed: int = 0) -> list[dict[str, Any]]:
    """``n`` single-skill rows for expert ``name``."""
    if name not in EXPERT_INSTRUCTIONS:
        raise ValueError(f"unknown expert {name!r}; expected one of {sorted(EXPERT_INSTRUCTIONS)}")
    rng = random.Random(f"atmoe-medical:{seed}:expert:{name}")
    rows = []
    for _ in range(n):
        case = sample_case(rng)
        meta = case_meta(case, name if name in GROUPS["task"] else None, (), (name,) if name in GROUPS["style"] else ())
        rows.append(_row(rng.choice(EXPERT_INSTRUCTIONS[name]), case, solo_answer(case, name), [name], meta))
    return rows


def complex_rows(n: int, seed: int = 0, heldout: bool = False) -> list[dict[str, Any]]:
    """``n`` complex rows: router training (``heldout=False``) or held-out eval (``heldout=True``)."""
    rng = random.Random(f"atmoe-medical:{seed}:{'eval' if heldout else 'router'}")
    combos = HELDOUT_COMBOS if heldout else TRAIN_COMBOS
    rows = []
    for i in range(n):
        combo = combos[i % len(combos)] if i < len(combos) else rng.choice(combos)  # every combo at least once
        case = sample_case(rng)
        rows.append(_row(complex_instruction(combo, rng, heldout), case, compose(case, *combo), combo_experts(combo),
                         case_meta(case, *combo)))
    rng.shuffle(rows)
    return rows


def _write_jsonl(path: Path, rows: list[dict[str, Any]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as f:
            for row in rows:
                f.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_suite(out_dir: str | os.PathLike[str], seed: int = 0, n_expert: int = 400, n_router: int = 800,
                n_eval: int = 180) -> dict[str, Path]:
    """Write ``experts/<name>.jsonl``, ``router_train.jsonl`` and ``eval.jsonl`` under ``out_dir``.

    Each file is written atomically (temp file + ``os.replace``). Returns ``{split: path}``
    with keys ``expert:<name>``, ``router_train`` and ``eval``.
    """
    for label, n in (("n_expert", n_expert), ("n_router", n_router), ("n_eval", n_eval)):
        if n < 1:
            raise ValueError(f"{label} must be >= 1, got {n}")
    out = Path(out_dir)
    written: dict[str, Path] = {}
    for name in EXPERT_INSTRUCTIONS:
        written[f"expert:{name}"] = out / "experts" / f"{name}.jsonl"
        _write_jsonl(written[f"expert:{name}"], expert_rows(name, n_expert, seed))
    written["router_train"] = out / "router_train.jsonl"
    _write_jsonl(written["router_train"], complex_rows(n_router, seed, heldout=False))
    written["eval"] = out / "eval.jsonl"
    _write_jsonl(written["eval"], complex_rows(n_eval, seed, heldout=True))
    return written
