"""Synthetic patient cases, the clinical note they are written as, and every skill's answer.

A :class:`Case` holds the structured facts; :func:`note` writes them as a terse clinical
note full of abbreviations and jargon (the example ``input``); :func:`compose` writes the
answer to any combination of experts.

Composition rules (one *task*, zero to two *knowledge* experts, zero to two *style* experts):

1. The task gives the core lines: ``summarize`` one summary line, ``triage`` one
   ``LEVEL: reason`` line, ``extract_meds`` a one-line JSON list of ``{"drug", "dose"}``.
2. Knowledge lines follow in ``GROUPS`` order: ``drug_classes`` adds one
   ``drug: class, purpose`` line per medication, ``lab_interpretation`` one
   ``name value unit: flag`` line per lab. Exception: with ``extract_meds`` the drug
   classes are merged into each medication entry (``"class"`` and ``"purpose"`` keys).
3. ``plain_language`` changes vocabulary only: abbreviations and jargon are written in lay
   terms (``SOB`` -> ``shortness of breath``, ``PO BID`` -> ``by mouth twice a day``),
   ``male`` -> ``man``. Without it, answers keep the note's own wording.
4. ``bullet_points`` prefixes every line with ``- ``; ``extract_meds`` then gives one
   ``- drug dose[: class, purpose]`` bullet per medication instead of JSON.
5. Lines are joined with newlines.

Triage rules, checked in order (the first that fires is the reason):
EMERGENT if SpO2 < 90, SBP < 90 or HR > 130; URGENT if Temp >= 38.5, HR > 110 or RR > 24;
otherwise ROUTINE.
"""

from __future__ import annotations

import json
import random
import re
from dataclasses import asdict, dataclass
from typing import Any

from atmoe.medical.facts import ABBREVIATIONS, COMPLAINTS, DRUGS, HISTORY, LABS, lay_term

GROUPS: dict[str, list[str]] = {
    "task": ["summarize", "extract_meds", "triage"],
    "knowledge": ["drug_classes", "lab_interpretation"],
    "style": ["plain_language", "bullet_points"],
}

EXPERT_DESCRIPTIONS: dict[str, str] = {
    "summarize": "One-line case summary: age, sex, complaint and the key finding.",
    "extract_meds": 'Medications and doses as a JSON list of {"drug", "dose"}.',
    "triage": "EMERGENT / URGENT / ROUTINE from vital-sign rules, with the reason.",
    "drug_classes": "Pharmacological class and plain purpose of each medication.",
    "lab_interpretation": "Each lab flagged low / normal / high against its adult reference range.",
    "plain_language": "Patient-friendly wording: no clinical abbreviations or jargon.",
    "bullet_points": 'Answer as a list where every line starts with "- ".',
}

# (level, vital, comparison, threshold) in the order they are checked.
TRIAGE_RULES: tuple[tuple[str, str, str, float], ...] = (
    ("EMERGENT", "spo2", "<", 90),
    ("EMERGENT", "sbp", "<", 90),
    ("EMERGENT", "hr", ">", 130),
    ("URGENT", "temp", ">=", 38.5),
    ("URGENT", "hr", ">", 110),
    ("URGENT", "rr", ">", 24),
)
_VITAL_LABEL = {"spo2": ("SpO2", "%"), "sbp": ("SBP", ""), "hr": ("HR", ""), "temp": ("Temp", " C"), "rr": ("RR", "")}
_CMP_WORDS = {"<": "below", ">": "above", ">=": "at or above"}
_ABBREV_RE = re.compile(r"(?<![\w/])(" + "|".join(re.escape(a) for a in sorted(ABBREVIATIONS, key=len, reverse=True)) + r")(?![\w/])")


@dataclass(frozen=True)
class Case:
    """The structured facts of one synthetic patient encounter."""

    age: int
    sex: str  # "M" or "F"
    complaint: str  # as written in the note (abbreviation or jargon)
    history: tuple[str, ...]
    hr: int
    sbp: int
    dbp: int
    rr: int
    spo2: int
    temp: float
    meds: tuple[tuple[str, str], ...]  # (drug, dose as written)
    labs: tuple[tuple[str, float], ...]  # (lab name, value)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def to_plain(text: str) -> str:
    """Replace every whole-token clinical abbreviation in ``text`` with its lay expansion."""
    return _ABBREV_RE.sub(lambda m: ABBREVIATIONS[m.group(1)], text)


def _lab_value(rng: random.Random, name: str) -> float:
    lab = LABS[name]
    kind = rng.choice(("normal", "normal", "low", "high"))
    lo, hi = {"normal": (lab.low, lab.high), "low": (lab.low * 0.7, lab.low * 0.95),
              "high": (lab.high * 1.05, lab.high * 1.4)}[kind]
    return round(rng.uniform(lo, hi), lab.decimals)


def sample_case(rng: random.Random) -> Case:
    """Draw one case; triage levels are balanced and at most one vital sign is abnormal."""
    vitals = {"hr": rng.randint(60, 100), "sbp": rng.randint(100, 150), "rr": rng.randint(12, 20),
              "spo2": rng.randint(94, 99), "temp": rng.randint(364, 376) / 10}
    vitals["dbp"] = rng.randint(60, min(95, vitals["sbp"] - 30))
    level = rng.choice(("EMERGENT", "URGENT", "ROUTINE"))
    if level != "ROUTINE":
        _, vital, _, _ = rng.choice([r for r in TRIAGE_RULES if r[0] == level])
        abnormal = {"spo2": lambda: rng.randint(80, 89), "sbp": lambda: rng.randint(70, 89), "rr": lambda: rng.randint(25, 34),
                    "temp": lambda: rng.randint(385, 401) / 10,
                    "hr": lambda: rng.randint(131, 160) if level == "EMERGENT" else rng.randint(111, 130)}
        vitals[vital] = abnormal[vital]()
        if vital == "sbp":
            vitals["dbp"] = rng.randint(40, 55)
    drugs = rng.sample(sorted(DRUGS), rng.randint(1, 3))
    labs = rng.sample(sorted(LABS), rng.randint(1, 3))
    return Case(
        age=rng.randint(18, 90), sex=rng.choice("MF"), complaint=rng.choice(COMPLAINTS),
        history=tuple(rng.sample(HISTORY, rng.randint(0, 2))),
        meds=tuple((d, rng.choice(DRUGS[d].doses)) for d in drugs),
        labs=tuple((name, _lab_value(rng, name)) for name in labs), **vitals,
    )


def fmt_lab(name: str, value: float) -> str:
    return f"{value:.{LABS[name].decimals}f}"


def lab_flag(name: str, value: float) -> str:
    """``low`` / ``normal`` / ``high`` against the adult reference range (bounds count as normal)."""
    lab = LABS[name]
    return "low" if value < lab.low else "high" if value > lab.high else "normal"


def note(case: Case) -> str:
    """The terse clinical note (abbreviations and jargon) that is every example's input."""
    hx = f" w/ hx {', '.join(case.history)}" if case.history else ""
    meds = "; ".join(f"{d} {dose}" for d, dose in case.meds)
    labs = ", ".join(f"{LABS[n].abbrev} {fmt_lab(n, v)}" for n, v in case.labs)
    return (f"{case.age} yo {case.sex}{hx} c/o {case.complaint}. HR {case.hr}, BP {case.sbp}/{case.dbp}, "
            f"RR {case.rr}, SpO2 {case.spo2}% on RA, Temp {case.temp:.1f} C. Meds: {meds}. Labs: {labs}.")


def triage(case: Case) -> tuple[str, str | None]:
    """(level, vital that fired) under ``TRIAGE_RULES``; the vital is None for ROUTINE."""
    ops = {"<": lambda a, b: a < b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b}
    for level, vital, cmp, threshold in TRIAGE_RULES:
        if ops[cmp](getattr(case, vital), threshold):
            return level, vital
    return "ROUTINE", None


def _vital_text(case: Case, vital: str, plain: bool) -> str:
    label, unit = _VITAL_LABEL[vital]
    value = f"{case.temp:.1f}" if vital == "temp" else str(getattr(case, vital))
    return f"{lay_term(label) if plain else label} {value}{unit}"


def triage_line(case: Case, plain: bool) -> str:
    level, vital = triage(case)
    if vital is None:
        return f"ROUTINE: {'vital signs' if plain else 'vitals'} stable"
    rule = next(r for r in TRIAGE_RULES if r[0] == level and r[1] == vital)
    unit = _VITAL_LABEL[vital][1]
    return f"{level}: {_vital_text(case, vital, plain)}, {_CMP_WORDS[rule[2]]} {rule[3]:g}{unit}"


def key_finding(case: Case, plain: bool) -> tuple[str, list[str]]:
    """(text, accepted keywords): the triage vital if abnormal, else the first abnormal lab."""
    _, vital = triage(case)
    if vital is not None:
        label = _VITAL_LABEL[vital][0]
        return _vital_text(case, vital, plain), [label, lay_term(label)]
    for name, value in case.labs:
        flag = lab_flag(name, value)
        if flag != "normal":
            return f"{flag} {name} ({fmt_lab(name, value)} {LABS[name].unit})", [name]
    return ("stable vital signs" if plain else "stable vitals"), ["stable"]


def _sex_word(case: Case, plain: bool) -> str:
    return {("M", False): "male", ("F", False): "female", ("M", True): "man", ("F", True): "woman"}[(case.sex, plain)]


def summary_line(case: Case, plain: bool) -> str:
    complaint = lay_term(case.complaint) if plain else case.complaint
    return f"{case.age}-year-old {_sex_word(case, plain)} with {complaint}; key finding: {key_finding(case, plain)[0]}"


def med_entries(case: Case, plain: bool, with_classes: bool) -> list[dict[str, str]]:
    out = []
    for drug, dose in case.meds:
        entry = {"drug": drug, "dose": to_plain(dose) if plain else dose}
        if with_classes:
            entry |= {"class": DRUGS[drug].drug_class, "purpose": DRUGS[drug].purpose}
        out.append(entry)
    return out


def drug_class_lines(case: Case) -> list[str]:
    return [f"{d}: {DRUGS[d].drug_class}, {DRUGS[d].purpose}" for d, _ in case.meds]


def lab_lines(case: Case) -> list[str]:
    return [f"{n} {fmt_lab(n, v)} {LABS[n].unit}: {lab_flag(n, v)}" for n, v in case.labs]


def _join_and(items: list[str]) -> str:
    return items[0] if len(items) == 1 else ", ".join(items[:-1]) + " and " + items[-1]


def plain_story(case: Case) -> str:
    """The ``plain_language`` expert's own answer: history and complaint in lay words."""
    hx = f" with a history of {_join_and([lay_term(h) for h in case.history])}" if case.history else ""
    return f"A {case.age}-year-old {_sex_word(case, True)}{hx} came in with {lay_term(case.complaint)}."


def fact_bullets(case: Case) -> str:
    """The ``bullet_points`` expert's own answer: the note's key facts, one bullet each."""
    lines = [f"{case.age}-year-old {_sex_word(case, False)}"]
    if case.history:
        lines.append(f"history: {', '.join(case.history)}")
    lines += [f"complaint: {case.complaint}", f"meds: {', '.join(d for d, _ in case.meds)}"]
    return "\n".join(f"- {line}" for line in lines)


def compose(case: Case, task: str, knowledge: tuple[str, ...] = (), style: tuple[str, ...] = ()) -> str:
    """The answer for one task plus optional knowledge and style experts (rules in the module docstring)."""
    if task not in GROUPS["task"] or not set(knowledge) <= set(GROUPS["knowledge"]) or not set(style) <= set(GROUPS["style"]):
        raise ValueError(f"bad combination: task={task!r} knowledge={knowledge!r} style={style!r}")
    plain, bullets = "plain_language" in style, "bullet_points" in style
    merged = task == "extract_meds" and "drug_classes" in knowledge
    if task == "summarize":
        lines = [summary_line(case, plain)]
    elif task == "triage":
        lines = [triage_line(case, plain)]
    elif bullets:
        lines = [f"{e['drug']} {e['dose']}" + (f": {e['class']}, {e['purpose']}" if merged else "")
                 for e in med_entries(case, plain, merged)]
    else:
        lines = [json.dumps(med_entries(case, plain, merged), ensure_ascii=False)]
    for k in GROUPS["knowledge"]:
        if k in knowledge and not (k == "drug_classes" and merged):
            lines += drug_class_lines(case) if k == "drug_classes" else lab_lines(case)
    return "\n".join(f"- {line}" if bullets else line for line in lines)


def solo_answer(case: Case, expert: str) -> str:
    """What a single expert's training row asks for."""
    if expert in GROUPS["task"]:
        return compose(case, expert)
    return {"drug_classes": lambda: "\n".join(drug_class_lines(case)),
            "lab_interpretation": lambda: "\n".join(lab_lines(case)),
            "plain_language": lambda: plain_story(case),
            "bullet_points": lambda: fact_bullets(case)}[expert]()


def case_meta(case: Case, task: str | None, knowledge: tuple[str, ...], style: tuple[str, ...]) -> dict[str, Any]:
    """The structured truth the scorers need, stored in each row under ``"meta"``."""
    plain, bullets = "plain_language" in style, "bullet_points" in style
    _, finding_keys = key_finding(case, plain)
    complaint = [case.complaint, lay_term(case.complaint)]
    return {
        "case": case.to_dict(),
        "plain": plain,
        "bullets": bullets,
        "json_meds": task == "extract_meds" and not bullets,
        "triage": triage(case)[0],
        "meds": med_entries(case, plain, True),
        "labs": [{"name": n, "flag": lab_flag(n, v)} for n, v in case.labs],
        "summary_fields": {"age": [str(case.age)], "sex": [_sex_word(case, False), _sex_word(case, True)],
                           "complaint": complaint, "finding": finding_keys},
    }
