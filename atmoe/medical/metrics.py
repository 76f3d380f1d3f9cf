"""Automatic scorers for the synthetic medical suite.

Each ``score_<expert>(prediction, example)`` returns a float in ``[0, 1]``, or ``None``
when the example has nothing to score for that expert (e.g. no medications). Scorers read
the structured truth from ``example["meta"]`` (written by the generator) and never parse
the note. :func:`score_example` applies every scorer named in ``example["experts"]``.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from atmoe.medical.facts import ABBREVIATIONS, DRUGS, JARGON, LABS

_LEVEL_RE = re.compile(r"\b(EMERGENT|URGENT|ROUTINE)\b")
_FLAG_RE = re.compile(r"\b(low|normal|high)\b", re.IGNORECASE)
_FORBIDDEN = [re.compile(r"(?<![\w/])" + re.escape(t) + r"(?![\w/])") for t in [*ABBREVIATIONS, *(lab.abbrev for lab in LABS.values())]]
_FORBIDDEN += [re.compile(r"(?<!\w)" + re.escape(t) + r"(?!\w)", re.IGNORECASE) for t in JARGON]


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _lines(prediction: str) -> list[str]:
    return [line.strip() for line in prediction.splitlines() if line.strip()]


def _word_in(word: str, text: str) -> bool:
    return re.search(r"(?<!\w)" + re.escape(word.lower()) + r"(?!\w)", text.lower()) is not None


def _f1(predicted: set[Any], expected: set[Any]) -> float:
    if not predicted and not expected:
        return 1.0
    hits = len(predicted & expected)
    if hits == 0:
        return 0.0
    precision, recall = hits / len(predicted), hits / len(expected)
    return 2 * precision * recall / (precision + recall)


def parse_json_meds(prediction: str) -> list[dict[str, Any]] | None:
    """The JSON medication list in ``prediction`` (first ``[`` to last ``]``), or None if invalid."""
    start, end = prediction.find("["), prediction.rfind("]")
    if start < 0 or end < start:
        return None
    try:
        items = json.loads(prediction[start:end + 1])
    except json.JSONDecodeError:
        return None
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        return None
    return items


def _bullet_meds(prediction: str) -> list[dict[str, str]]:
    names = sorted(DRUGS, key=len, reverse=True)  # longest first: "insulin glargine" before shorter names
    out = []
    for line in _lines(prediction):
        body = line.removeprefix("-").strip()
        drug = next((d for d in names if body.lower().startswith(d)), None)
        if drug is not None:
            out.append({"drug": drug, "dose": body[len(drug):].split(":")[0].strip()})
    return out


def score_extract_meds(prediction: str, example: dict[str, Any]) -> float | None:
    """F1 of predicted vs expected (drug, dose) pairs; 0.0 if a JSON answer is not valid JSON."""
    meta = example["meta"]
    if meta["json_meds"]:
        items = parse_json_meds(prediction)
        if items is None:
            return 0.0
    else:
        items = _bullet_meds(prediction)
    predicted = {(_norm(str(i.get("drug", ""))), _norm(str(i.get("dose", "")))) for i in items}
    expected = {(_norm(m["drug"]), _norm(m["dose"])) for m in meta["meds"]}
    return _f1(predicted, expected)


def score_triage(prediction: str, example: dict[str, Any]) -> float:
    """1.0 if the first triage level named in the prediction is the right one."""
    match = _LEVEL_RE.search(prediction)
    return float(match is not None and match.group(1) == example["meta"]["triage"])


def score_summarize(prediction: str, example: dict[str, Any]) -> float:
    """Recall of the summary fields (age, sex, complaint, key finding); any accepted wording counts."""
    fields = example["meta"]["summary_fields"]
    first = _lines(prediction)[0] if _lines(prediction) else ""
    found = [any(_word_in(alt, first) for alt in alts) for alts in fields.values()]
    return sum(found) / len(found)


def score_drug_classes(prediction: str, example: dict[str, Any]) -> float | None:
    """Fraction of medications whose class is stated (on its line, or in its JSON entry)."""
    meds = example["meta"]["meds"]
    if not meds:
        return None
    items = parse_json_meds(prediction) if example["meta"]["json_meds"] else None
    correct = 0
    for med in meds:
        if items is not None:
            texts = [str(i.get("class", "")) for i in items if _norm(str(i.get("drug", ""))) == med["drug"]]
        else:
            texts = [line for line in _lines(prediction) if _word_in(med["drug"], line)]
        correct += any(_word_in(med["class"], t) for t in texts)
    return correct / len(meds)


def score_lab_interpretation(prediction: str, example: dict[str, Any]) -> float | None:
    """Fraction of labs whose line gives the right low / normal / high flag."""
    labs = example["meta"]["labs"]
    if not labs:
        return None
    correct = 0
    for lab in labs:
        # The first flag word after the lab's name, on the first line that has one: a summary
        # line saying "low calcium" names the flag before the lab and is skipped.
        flags = [m.group(1).lower() for line in _lines(prediction) if _word_in(lab["name"], line)
                 for m in [_FLAG_RE.search(line[line.lower().find(lab["name"]):])] if m]
        correct += bool(flags) and flags[0] == lab["flag"]
    return correct / len(labs)


def forbidden_terms(text: str) -> list[str]:
    """Table abbreviations, lab abbreviations and jargon terms found in ``text``."""
    return [m.group(0) for pattern in _FORBIDDEN for m in pattern.finditer(text)]


def score_plain_language(prediction: str, example: dict[str, Any]) -> float:
    """Fraction of non-empty lines free of abbreviations and jargon (0.0 for an empty answer)."""
    lines = _lines(prediction)
    return sum(not forbidden_terms(line) for line in lines) / len(lines) if lines else 0.0


def score_bullet_points(prediction: str, example: dict[str, Any]) -> float:
    """Fraction of non-empty lines that start with ``- `` (0.0 for an empty answer)."""
    lines = [line for line in prediction.splitlines() if line.strip()]
    return sum(line.startswith("- ") for line in lines) / len(lines) if lines else 0.0


SCORERS: dict[str, Callable[[str, dict[str, Any]], float | None]] = {
    "summarize": score_summarize,
    "extract_meds": score_extract_meds,
    "triage": score_triage,
    "drug_classes": score_drug_classes,
    "lab_interpretation": score_lab_interpretation,
    "plain_language": score_plain_language,
    "bullet_points": score_bullet_points,
}


def score_example(prediction: str, example: dict[str, Any]) -> dict[str, float]:
    """``{expert: score}`` for every expert the example needs (scorers returning None are left out)."""
    scores = {}
    for name in example["experts"]:
        if name not in SCORERS:
            raise ValueError(f"no scorer for expert {name!r}")
        value = SCORERS[name](prediction, example)
        if value is not None:
            scores[name] = float(value)
    return scores
