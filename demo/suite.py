"""The demo's clinical task suite, built so that its skills compose line by line.

A case is a short clinical note with a lab line and a vitals line (random subsets, random order). Every answer is a
list of lines, one per measurement, and each group of experts owns one part of a line:

    line = [style prefix] + [name: abbreviation, or its lay name under `plain`] + " " + value + [knowledge suffix]

    task       which measurements:  labs → the lab values; vitals → the vital signs            ("Na 128")
    knowledge  a suffix per line:   flags → ": low|normal|high" (the value against its range)  ("Na 128: low")
                                    ranges → " (normal 135-145)"                               ("Na 128 (normal 135-145)")
    style      every line:          bullets → "- " prefix; plain → lay names                   ("- sodium 128: low")

A complex instruction asks for one task and at most one expert of each other group, as sentences in random order.
Alone, a knowledge or style expert works on every measurement of the note (its own skill, without a task's choice);
a task expert alone lists its measurements plainly. So the reference of any combination is its parts' answers
composed (`tests/test_demo_suite.py` rebuilds each from the solo answers). Abnormal values lie clearly outside their
range and normal ones well inside it, so the flags are a learnable rule.

Splits (every row {"instruction", "input", "output", "experts", "meta"}; same seed, same bytes):
    experts/<name>.jsonl  single-skill rows for each expert (training phrasings)
    router_train.jsonl    training combinations with training phrasings, plus off-topic questions (experts: [])
    coadapt.jsonl         the same, in wider wordings (training phrasings + ROUTER_PHRASES): stage 2's data
    writer.jsonl          the same, in wider wordings still (+ WRITER_PHRASES, an outside writer's): the
                          `reroute` stage's data (the shipped router alone)
    cover.jsonl           writer.jsonl's wordings over every combination, the held-out ones included (a third of
                          the rows): the `cover` stage's data (the experts alone, after the held-out combinations
                          measured how the composition generalises)
    eval.jsonl            held-out phrasings for every complex combination, incl. the held-out combinations
    gate/<name>.jsonl     fresh single-skill rows: an expert is trained when it passes these alone
    abstain_requests.jsonl  requests that need no expert (experts: []), from the *training* families of
                          `everyday.py` only: everyday requests and clinical requests outside the skills, the note
                          in either box; the `abstain` stage trains the stay-out head on them as routing-only rows
                          (their outputs are not read). The held-out families never reach a training file.
"""

from __future__ import annotations

import itertools
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atmoe.load.files import atomic_write_bytes

from .everyday import everyday_rows, outside_rows

GROUPS: dict[str, list[str]] = {
    "task": ["labs", "vitals"],
    "knowledge": ["flags", "ranges"],
    "style": ["bullets", "plain"],
}
EXPERT_DESCRIPTIONS: dict[str, str] = {
    "labs": "Lists the note's lab results, one per line.",
    "vitals": "Lists the note's vital signs, one per line.",
    "flags": 'Flags each value low / normal / high against its reference range ("Na 128: low").',
    "ranges": 'Adds the reference range to each value ("Na 128 (normal 135-145)").',
    "bullets": 'Formats every line as a dash bullet ("- ").',
    "plain": "Writes measurement names in plain words (Na → sodium, SpO2 → oxygen level).",
}


@dataclass(frozen=True)
class Measure:
    abbrev: str                         # as written in the note
    lay: str                            # plain-language name
    kind: str                           # "lab" | "vital"
    low: float                          # reference range
    high: float
    decimals: int
    too_low: tuple[float, float] | None   # where abnormal low values are drawn (clearly outside the range)
    too_high: tuple[float, float] | None

    def fmt(self, x: float) -> str:
        return f"{x:.{self.decimals}f}"

    @property
    def range_text(self) -> str:
        return f"{self.fmt(self.low)}-{self.fmt(self.high)}"

    def flag(self, value: str) -> str:
        x = float(value)
        return "low" if x < self.low else "high" if x > self.high else "normal"


MEASURES: dict[str, Measure] = {m.abbrev: m for m in (
    Measure("Na", "sodium", "lab", 135, 145, 0, (118, 128), (152, 162)),
    Measure("K", "potassium", "lab", 3.5, 5.0, 1, (2.4, 3.0), (5.8, 6.9)),
    Measure("Cr", "creatinine", "lab", 0.6, 1.2, 1, None, (2.0, 4.5)),
    Measure("Hb", "hemoglobin", "lab", 12, 17, 1, (6.0, 9.5), (19.0, 21.0)),
    Measure("WBC", "white cell count", "lab", 4, 11, 1, (1.0, 2.8), (15.0, 28.0)),
    Measure("Glu", "blood sugar", "lab", 70, 110, 0, (35, 55), (190, 380)),
    Measure("Plt", "platelets", "lab", 150, 400, 0, (20, 90), (550, 850)),
    Measure("Ca", "calcium", "lab", 8.5, 10.5, 1, (6.0, 7.6), (11.6, 13.5)),
    Measure("HR", "heart rate", "vital", 60, 100, 0, (32, 48), (118, 160)),
    Measure("SBP", "systolic blood pressure", "vital", 90, 140, 0, (62, 80), (165, 210)),
    Measure("RR", "breathing rate", "vital", 12, 20, 0, (5, 9), (26, 40)),
    Measure("SpO2", "oxygen level", "vital", 95, 100, 0, (72, 90), None),
    Measure("T", "temperature", "vital", 36.1, 37.5, 1, (33.0, 35.3), (38.5, 40.8)),
)}
TASK_KIND = {"labs": "lab", "vitals": "vital"}
COMPLAINTS = ("chest pain", "shortness of breath", "fever", "abdominal pain", "dizziness", "headache", "fatigue",
              "cough", "back pain", "confusion", "palpitations", "a fall", "vomiting", "leg swelling")


@dataclass(frozen=True)
class Case:
    age: int
    sex: str
    complaint: str
    labs: tuple[tuple[str, str], ...]     # (abbrev, value as written), in note order
    vitals: tuple[tuple[str, str], ...]
    vitals_first: bool

    @property
    def measurements(self) -> list[tuple[str, str]]:
        """Every measurement, in the order the note shows them."""
        return [*self.vitals, *self.labs] if self.vitals_first else [*self.labs, *self.vitals]


def _value(m: Measure, rng: random.Random) -> str:
    kinds = ["normal", "normal"] + (["low"] if m.too_low else []) + (["high"] if m.too_high else [])
    kind = rng.choice(kinds)
    if kind == "normal":  # the middle 80 % of the range: never at a boundary
        pad = 0.1 * (m.high - m.low)
        lo, hi = m.low + pad, m.high - pad
    else:
        lo, hi = m.too_low if kind == "low" else m.too_high
    return m.fmt(rng.uniform(lo, hi))


def sample_case(rng: random.Random) -> Case:
    def pick(kind: str, k: int) -> tuple[tuple[str, str], ...]:
        names = rng.sample([a for a, m in MEASURES.items() if m.kind == kind], k)
        return tuple((a, _value(MEASURES[a], rng)) for a in names)
    return Case(rng.randint(18, 95), rng.choice("MF"), rng.choice(COMPLAINTS), pick("lab", rng.randint(2, 4)),
                pick("vital", rng.randint(2, 4)), rng.random() < 0.5)


def note(case: Case) -> str:
    labs = "Labs: " + ", ".join(f"{a} {v}" for a, v in case.labs) + "."
    vitals = "Vitals: " + ", ".join(f"{a} {v}" for a, v in case.vitals) + "."
    body = [vitals, labs] if case.vitals_first else [labs, vitals]
    return "\n".join([f"{case.age} yo {case.sex} with {case.complaint}.", *body])


def line(abbrev: str, value: str, knowledge: str | None, style: str | None) -> str:
    """One answer line: the composition rule of the whole suite."""
    m = MEASURES[abbrev]
    text = f"{m.lay if style == 'plain' else abbrev} {value}"
    if knowledge == "flags":
        text += f": {m.flag(value)}"
    elif knowledge == "ranges":
        text += f" (normal {m.range_text})"
    return "- " + text if style == "bullets" else text


def answer(case: Case, task: str | None, knowledge: str | None = None, style: str | None = None) -> str:
    """The reference answer; `task` None means every measurement (a knowledge or style expert alone)."""
    items = [(a, v) for a, v in case.measurements if task is None or MEASURES[a].kind == TASK_KIND[task]]
    return "\n".join(line(a, v, knowledge, style) for a, v in items)


# The values an expert writes that no note holds: the reference ranges, each with the names of its measurement. The
# manifest declares them (`values`), so grounded decoding (`GenerationSettings(grounded=True)`) lets the ranges expert
# write a measurement's range on that measurement's line, and nothing else unheld ("heart rate 41 (normal 150-400)", the
# platelets' range after a heart rate, cannot be written).
EXPERT_VALUES: dict[str, list[dict[str, list[str]]]] = {
    "ranges": [{"names": [m.abbrev, m.lay], "values": [m.fmt(m.low), m.fmt(m.high)]} for m in MEASURES.values()]}


# ---------------------------------------------------------------- instructions
# (training phrasings, held-out phrasings). Sentences, so a complex instruction can put them in any order.
PHRASES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "labs": (("List the lab results.", "Write out the patient's labs.", "Give me the lab values.",
              "Show each lab result on its own line.", "Pull the lab values from the note.",
              "Report the laboratory results.", "What are the labs?", "Copy out the blood test results.",
              "Extract the lab results.", "Tell me the lab numbers.", "Which labs were drawn?",
              "Go over the lab panel."),
             ("Which blood work values were recorded?", "Walk me through the chemistry and blood count results.",
              "I need the laboratory numbers from this note.", "Summarise the bloods.")),
    "vitals": (("List the vital signs.", "Write out the patient's vitals.", "Give me the vital sign values.",
                "Show each vital sign on its own line.", "Pull the vitals from the note.", "Report the vital signs.",
                "What are the vitals?", "Copy out the bedside observations.", "Extract the vital signs.",
                "Tell me the vitals numbers.", "Which vitals were taken?", "Go over the vital signs."),
               ("Which observations were measured at the bedside?", "Walk me through the pulse, pressure and other obs.",
                "I need the vital sign readings from this note.", "Summarise the observations.")),
    "flags": (("Flag each as low, normal or high.", "Mark every value low, normal or high.",
               "Say whether each one is low, normal or high.", "Add a low/normal/high flag to each.",
               "Label each value as low, normal or high.", "Note if each result is low, normal or high.",
               "Tag each with low, normal or high.", "Indicate low, normal or high for each.",
               "Interpret each value as low, normal or high.", "Check each against its range and call it low, "
               "normal or high.", "Flag anything abnormal, and call the rest normal."),
              ("Tell me which ones are out of range, too low or too high, and which are fine.",
               "Is each value too low, fine, or too high?", "Judge every number: low, normal or high?",
               "Point out the abnormal readings (low or high) and say which are normal.")),
    "ranges": (("Add the normal range to each.", "Include each value's reference range.",
                "Give the normal range next to every value.", "Show the reference interval for each.",
                "Put the normal range after each value.", "Append the expected range to each line.",
                "Quote the normal limits beside each.", "Write each one with its reference range.",
                "Include what the normal range is for each.", "Add the normal values for comparison.",
                "State the reference range of each."),
               ("Next to each number, say what healthy values look like.", "Mention the usual healthy limits too.",
                "Give the reference values alongside.", "Show where normal lies for every reading.")),
    "bullets": (("Use bullet points.", "Format it as a bulleted list.", "Put a dash in front of each line.",
                 "Make it a bullet list.", "Answer in bullets.", "One bullet per item.",
                 "Write it as dash-prefixed bullets.", "Present them as bullet points.", "Bullet each line.",
                 "Use a list with bullets.", "Bulleted, please."),
                ("Lay it out as a dashed list.", "Start every line with a hyphen.",
                 "Give it as a list of bullets, please.", "Each entry should be a bullet.")),
    "plain": (("Use plain language.", "Write the names in everyday words.", "Avoid abbreviations.",
               "Spell out what each abbreviation means.", "Make it understandable for the patient.",
               "No medical shorthand.", "Use words a patient would understand.", "Write out the full names.",
               "Explain in lay terms.", "Keep it simple for a non-expert.", "Use layman's terms."),
              ("My grandmother will read this, so skip the jargon.", "Don't use clinical acronyms.",
               "Say it the way you'd tell a family member.", "Avoid medical abbreviations entirely.")),
}
# Stage 2 (co-adaptation) trains the router on wider wordings than the experts' own: these 20 per skill on top of the
# training phrasings. They share no word with the held-out phrasings that the training phrasings do not already use
# (`tests/test_demo_suite.py`), so the held-out wordings stay unseen. Stage 1 keeps the experts' phrasings only,
# so its experts, routers and results stay as built.
ROUTER_PHRASES: dict[str, tuple[str, ...]] = {
    "labs": ("Print the lab results, one per line.", "Which lab tests came back, and with what values?",
             "Go through the lab section.", "Give the blood test values only.", "What did the lab panel show?",
             "Type out each lab value.", "Show me the labs from the case.", "Just the lab results, please.",
             "Can you list the labs?", "Break out the laboratory values.", "Give the lab figures.",
             "Lab values, please.", "Write down the results that came from the lab.", "Enumerate the lab findings.",
             "Tell me what the blood tests showed.", "Pull out the lab numbers.", "Lab results only.",
             "Output the lab values.", "Focus on the labs.", "Only the lab results, nothing else."),
    "vitals": ("Print the vital signs, one per line.", "Which vital signs were checked, and what were they?",
               "Go through the vitals section.", "Give the vital sign values only.", "What did the vitals show?",
               "Type out each vital sign.", "Show me the vitals from the case.", "Just the vitals, please.",
               "Can you list the vital signs?", "Break out the vital sign values.", "Give the vitals figures.",
               "Vitals, please.", "Write down the bedside measurements.", "Enumerate the vital signs.",
               "Tell me what the vital signs showed.", "Pull out the vitals numbers.", "Vital signs only.",
               "Output the vital sign values.", "Focus on the vitals.",
               "Show the heart rate, temperature and the rest of the vitals."),
    "flags": ("Say for each if it is low, normal or high.", "Classify each value as low, normal or high.",
              "Give each a status: low, normal or high.", "Rate each result low, normal or high.",
              "Call out the abnormal values as low or high; the rest are normal.",
              "Mark the highs and lows, and the normal values.", "Add whether each one is high, low or normal.",
              "Compare each to its range: low, normal or high.", "Grade every value: low, normal or high.",
              "Put low, normal or high after each.", "Show which values are high or low, and which are normal.",
              "Flag each result.", "Tell me if each value is normal, low or high.",
              "Give a low/normal/high verdict for each.", "Which are high, which are low, which are normal?",
              "Assess each value as low, normal or high.", "Next to each, write low, normal or high.",
              "Note which results are abnormal (low or high).", "Interpret them: low, normal or high.",
              "Add a verdict to each: low, normal or high."),
    "ranges": ("Give the reference range for each value.", "Show each value's normal range.",
               "Add the normal interval after each.", "Write the range in brackets after each value.",
               "Include the normal limits.", "List the normal range as well.",
               "Put the reference range beside each value.",
               "Say what the normal range is for each one.", "With the normal range for each, please.",
               "Tack on the reference interval.", "Also give each normal range.", "Show the expected range for each.",
               "Each value needs its normal range.", "Include the reference range in brackets.",
               "Give the normal bounds for each.", "Cite the normal range of every value.",
               "Add the standard range to each.", "Follow each value with its normal range.",
               "Write the normal range beside every result.", "Quote the reference limits for each."),
    "bullets": ("Make each line a bullet.", "Bullet points, please.", "Format as bullets.", "Give a bullet list.",
                "Prefix every line with a dash.", "Show them as a bulleted list.", "Answer as a list of dash bullets.",
                "Put each item on a bullet.", "Bullet it.", "Present it as bullets.", "Use dashes as bullets.",
                "Write each line as a bullet.", "Format with bullet points.", "Dash bullets, please.",
                "Use a bullet for every line.", "Make a bulleted list of them.", "Bullets, one per line.",
                "Put it in bullet form.", "A bullet list is best.", "Write it as a dash list."),
    "plain": ("Use simple words.", "Write it for a patient to follow.", "Use lay names instead of abbreviations.",
              "Replace abbreviations with full words.", "Write each name out in full.", "No abbreviations, please.",
              "Use everyday language.", "Make it patient-friendly.", "Keep the wording simple.",
              "Explain the names in plain English.", "Avoid technical terms.",
              "Write for someone without medical training.", "Use non-technical names.",
              "Spell each name out in full.", "Plain words, please.",
              "Translate the abbreviations into everyday names.", "Write it for a layperson.",
              "Use the full, everyday names.", "Keep it free of shorthand.", "Anyone must understand it."),
}
# A second held-out set, written on 2026-12-07 before any router was trained or measured on it (issue 24): wordings a
# user might type, in no training, router or held-out phrasing (`tests/test_demo_suite.py`). The suite's held-out
# phrasings have been read while diagnosing failures (docs/facts.md); these have not, so they measure unseen wordings
# cleanly: `python -m demo.decide --wordings fresh`.
FRESH_PHRASES: dict[str, tuple[str, ...]] = {
    "labs": ("Can I see the blood results?", "What came back from the lab?", "Read out the lab work.",
             "Give me her bloods."),
    "vitals": ("What are her obs?", "Read out the bedside readings.",
               "Give me the heart rate, blood pressure and so on.", "How did the observations look?"),
    "flags": ("For every value, is it high, low or within normal?", "Mark each reading as normal or not (low/high).",
              "Tell me for each whether it's raised, lowered or normal.",
              "Interpret every result as high, low or okay."),
    "ranges": ("What should each of these normally be? Put it in brackets.",
               "Alongside each result, give the range a healthy adult would have.",
               "Include the normal reference for each result.", "And what's the usual range for each?"),
    "bullets": ("Use a dash at the start of each line.", "List format with bullets, please.", "Bullet-point it.",
                "Put them in a hyphenated list."),
    "plain": ("Write it so a patient can read it.", "No jargon, please.",
              "Expand the abbreviations into normal words.", "Explain it like I'm not a doctor."),
}


def _written(name: str) -> dict[str, tuple[str, ...]]:
    data = json.loads((Path(__file__).with_name("wordings") / f"{name}.json").read_text(encoding="utf-8"))
    return {e: tuple(data["phrases"][e]) for e in PHRASES}


# Wordings from writers outside the diagnosis (issue 24): helpers given only the skills' description, never the
# suite's phrasings, its held-out sets or its failures (`demo/wordings/*.json` record each one's brief). WRITER_PHRASES
# (60 per skill) are training wordings (`complex_rows(writer=True)`); BLIND_PHRASES, from a second writer asked to
# speak as six different users, are a third held-out set, less any sentence that is, or is inside, a training one.
WRITER_PHRASES = _written("writer")
BLIND_PHRASES = _written("blind")
WORDINGS = ("heldout", "fresh", "blind")   # which held-out wordings `complex_rows(heldout=True)` draws


def heldout_phrases(wordings: str = "heldout") -> dict[str, tuple[str, ...]]:
    """Each skill's held-out wordings: the suite's (`PHRASES[e][1]`), the fresh ones (`FRESH_PHRASES`) or the blind
    writer's (`BLIND_PHRASES`)."""
    if wordings not in WORDINGS:
        raise ValueError(f"wordings must be one of {WORDINGS}, got {wordings!r}")
    return {"fresh": FRESH_PHRASES, "blind": BLIND_PHRASES}.get(wordings) or {e: v[1] for e, v in PHRASES.items()}

# How a knowledge or style expert is asked alone: every measurement of the note.
ALL_PHRASES = ("List every lab and vital sign.", "Write out all the measurements.", "Go through all the numbers in "
               "the note.", "Give me every value in the note.", "Show all labs and vitals, one per line.",
               "Report every measurement.", "List all the results and observations.", "Copy out every number "
               "recorded.", "Extract all labs and vitals.", "What was measured? List everything.")

Combo = tuple[str, str | None, str | None]   # (task, knowledge or None, style or None)
ALL_COMBOS: tuple[Combo, ...] = tuple(itertools.product(GROUPS["task"], [None, *GROUPS["knowledge"]],
                                                        [None, *GROUPS["style"]]))
# Never trained on. Every pair inside them is (labs+flags, labs+plain, flags+plain in vitals+flags+plain, ...).
HELDOUT_COMBOS: tuple[Combo, ...] = (("labs", "flags", "plain"), ("vitals", "ranges", "bullets"))
TRAIN_COMBOS: tuple[Combo, ...] = tuple(c for c in ALL_COMBOS if c not in HELDOUT_COMBOS)
# The `cover` stage's cycle: every combination, the two held out of stages 1-2 four times each (a third of the rows)
COVER_COMBOS: tuple[Combo, ...] = TRAIN_COMBOS + HELDOUT_COMBOS * 4
EVAL_COMBOS: tuple[Combo, ...] = tuple(c for c in ALL_COMBOS if c[1] or c[2])   # complex: task + something


def combo_experts(combo: Combo) -> list[str]:
    return [e for e in combo if e]


def instruction(combo: Combo, rng: random.Random, heldout: bool, wide: bool = False, wordings: str = "heldout",
                writer: bool = False) -> str:
    """Each expert's sentence, in random order: held-out phrasings (`wordings`: which set), or training ones (`wide`:
    plus ROUTER_PHRASES; `writer`: plus WRITER_PHRASES)."""
    asked = heldout_phrases(wordings) if heldout else {
        e: PHRASES[e][0] + (ROUTER_PHRASES[e] if wide else ()) + (WRITER_PHRASES[e] if writer else ()) for e in PHRASES}
    sentences = [rng.choice(asked[e]) for e in combo_experts(combo)]
    rng.shuffle(sentences)
    return " ".join(sentences)


def solo_instruction(expert: str, rng: random.Random, heldout: bool = False) -> str:
    if expert in GROUPS["task"]:
        return rng.choice(PHRASES[expert][int(heldout)])
    sentences = [rng.choice(ALL_PHRASES), rng.choice(PHRASES[expert][int(heldout)])]
    rng.shuffle(sentences)
    return " ".join(sentences)


def _row(instr: str, case: Case, out: str, experts: list[str], combo: list[str | None]) -> dict[str, Any]:
    return {"instruction": instr, "input": note(case), "output": out, "experts": experts,
            "meta": {"combo": combo}}


def expert_rows(name: str, n: int, seed: int = 0, split: str = "train") -> list[dict[str, Any]]:
    """`n` single-skill rows for expert `name` (split "train" or "gate": different cases, same phrasings)."""
    group = next((g for g, names in GROUPS.items() if name in names), None)
    if group is None:
        raise ValueError(f"unknown expert {name!r}; expected one of {[e for v in GROUPS.values() for e in v]}")
    rng = random.Random(f"atmoe-demo:{seed}:{split}:{name}")
    combo: list[str | None] = [name if group == "task" else None, name if group == "knowledge" else None,
                               name if group == "style" else None]
    rows = []
    for _ in range(n):
        case = sample_case(rng)
        rows.append(_row(solo_instruction(name, rng), case, answer(case, *combo), [name], combo))
    return rows


OFF_TOPIC = {  # questions no expert should touch: (training wordings, held-out wordings) → answer template
    "capital": (("What is the capital of {c}?", "Name the capital city of {c}.", "Which city is the capital of {c}?"),
                ("Tell me {c}'s capital.",), "The capital of {c} is {a}."),
    "sum": (("What is {x} plus {y}?", "Add {x} and {y}.", "Compute {x} + {y}."),
            ("How much is {x} and {y} together?",), "{x} plus {y} is {s}."),
}
CAPITALS = {"France": "Paris", "Japan": "Tokyo", "Italy": "Rome", "Spain": "Madrid", "Germany": "Berlin",
            "Egypt": "Cairo", "Canada": "Ottawa", "Kenya": "Nairobi", "Peru": "Lima", "Norway": "Oslo",
            "Greece": "Athens", "Poland": "Warsaw"}


def off_topic_rows(n: int, rng: random.Random, heldout: bool) -> list[dict[str, Any]]:
    rows = []
    for _ in range(n):
        kind = rng.choice(sorted(OFF_TOPIC))
        train, held, template = OFF_TOPIC[kind]
        c = rng.choice(sorted(CAPITALS))
        x, y = rng.randint(2, 50), rng.randint(2, 50)
        fill = {"c": c, "a": CAPITALS[c], "x": x, "y": y, "s": x + y}
        rows.append({"instruction": rng.choice(held if heldout else train).format(**fill), "input": "",
                     "output": template.format(**fill), "experts": [], "meta": {"combo": [None, None, None]}})
    return rows


def complex_rows(n: int, seed: int = 0, heldout: bool = False, off_topic: float = 0.0, wide: bool = False,
                 wordings: str = "heldout", writer: bool = False, cover: bool = False) -> list[dict[str, Any]]:
    """`n` router rows (training combinations and phrasings; `wide`: plus ROUTER_PHRASES, other cases; `writer`:
    plus WRITER_PHRASES, other cases again; `cover`: writer wordings over every combination, a third of the rows
    the never-trained ones, other cases again) or held-out eval rows (`wordings`: which held-out set; every complex
    combination, each equally often)."""
    if heldout and (wide or writer or cover):
        raise ValueError("wide and writer wordings are training wordings; held-out rows use held-out phrasings only")
    if wordings not in WORDINGS or (wordings != "heldout" and not heldout):
        raise ValueError(f"wordings must be one of {WORDINGS} (other than heldout: held-out rows only), "
                         f"got {wordings!r}")
    kind = "eval" if heldout else "cover" if cover else "writer" if writer else "coadapt" if wide else "router"
    rng = random.Random(f"atmoe-demo:{seed}:{kind}")
    combos = EVAL_COMBOS if heldout else COVER_COMBOS if cover else TRAIN_COMBOS
    wide, writer = wide or cover, writer or cover
    n_off = round(n * off_topic)
    rows = []
    for i in range(n - n_off):
        combo = combos[i % len(combos)]
        case = sample_case(rng)
        rows.append(_row(instruction(combo, rng, heldout, wide, wordings, writer), case, answer(case, *combo),
                         combo_experts(combo), list(combo)))
    rows += off_topic_rows(n_off, rng, heldout)
    rng.shuffle(rows)
    return rows


def abstention_rows(n_everyday: int, n_outside: int, seed: int = 0) -> list[dict[str, Any]]:
    """Training rows that need no expert: `n_everyday` everyday requests and `n_outside` clinical requests outside
    the skills (half with the note in the instruction box, half in the input box), training families only."""
    half = n_outside // 2
    rows = (everyday_rows("train", n_everyday, seed) + outside_rows("train", n_outside - half, seed, where="input")
            + [{**r, "meta": {**r["meta"], "where": "instruction"}} for r in
               outside_rows("train", half, seed + 1, where="instruction")])
    random.Random(f"atmoe-demo:{seed}:abstain").shuffle(rows)
    return rows


def write_jsonl(path: Path, rows: list[dict[str, Any]]) -> Path:
    return atomic_write_bytes(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode())


def write_suite(out_dir: str | Path, seed: int = 0, n_expert: int = 1600, n_gate: int = 50, n_router: int = 1200,
                n_coadapt: int = 2400, n_writer: int = 2400, n_cover: int = 480, n_eval: int = 64,
                n_abstain_everyday: int = 480, n_abstain_outside: int = 160) -> dict[str, Path]:
    """Write every split under `out_dir` (each file atomically); returns {split: path}."""
    for label, n in (("n_expert", n_expert), ("n_gate", n_gate), ("n_router", n_router), ("n_coadapt", n_coadapt),
                     ("n_writer", n_writer), ("n_cover", n_cover), ("n_eval", n_eval),
                     ("n_abstain_everyday", n_abstain_everyday), ("n_abstain_outside", n_abstain_outside)):
        if n < 1:
            raise ValueError(f"{label} must be >= 1, got {n}")
    out = Path(out_dir)
    written = {}
    for names in GROUPS.values():
        for name in names:
            written[f"expert:{name}"] = write_jsonl(out / "experts" / f"{name}.jsonl",
                                                     expert_rows(name, n_expert, seed))
            written[f"gate:{name}"] = write_jsonl(out / "gate" / f"{name}.jsonl",
                                                   expert_rows(name, n_gate, seed, split="gate"))
    written["router_train"] = write_jsonl(out / "router_train.jsonl", complex_rows(n_router, seed, off_topic=0.1))
    written["coadapt"] = write_jsonl(out / "coadapt.jsonl", complex_rows(n_coadapt, seed, off_topic=0.1, wide=True))
    written["writer"] = write_jsonl(out / "writer.jsonl", complex_rows(n_writer, seed, off_topic=0.1, wide=True,
                                                                   writer=True))
    written["cover"] = write_jsonl(out / "cover.jsonl", complex_rows(n_cover, seed, cover=True))
    written["eval"] = write_jsonl(out / "eval.jsonl", complex_rows(n_eval, seed, heldout=True))
    written["off_topic"] = write_jsonl(out / "off_topic.jsonl", off_topic_rows(16, random.Random(seed), True))
    written["abstain_requests"] = write_abstention_requests(out, seed, n_abstain_everyday, n_abstain_outside)
    return written


def write_abstention_requests(out_dir: str | Path, seed: int = 0, n_everyday: int = 480, n_outside: int = 160
                              ) -> Path:
    """abstain_requests.jsonl alone (the `abstain` stage writes it into a suite built before it existed)."""
    return write_jsonl(Path(out_dir) / "abstain_requests.jsonl", abstention_rows(n_everyday, n_outside, seed))
