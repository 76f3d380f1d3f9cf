"""Are the facts of every answer line right? The facts check of issue 24, part 2.

    python -m demo.facts --results assets/eval/results.json [--system S] [--rows assets/data/eval.jsonl]
                         [--out runs/facts/shipped.json] [--coverage coadapt.jsonl] [--routing MANIFEST]
                         [--let-in MANIFEST]

Scores the answers a results file stored for one system (default: its shipped one), no model needed (`--routing`
loads one to relate the errors to the routing; `--coverage` counts a training file's lines). Each answer
line is read as the suite writes it (`demo/suite.py`: `[- ]name value[: flag][ (normal lo-hi)]`, the name an
abbreviation or a lay name) and checked against the row's NOTE, not against its reference:

    value    the line names one measurement the note holds, of the section the request asked for (labs or vitals), with
             the note's value. Otherwise, first that applies: "unrecognised" (names none, or several), "duplicate" (named
             on an earlier line), "cross-read" (a measurement of the other section, or, under another name, a value
             the note holds for one of them: "hemoglobin 96" from SpO2 96, whatever the order of the note's lines),
             "not in note", "wrong value".
    flag     rows that ask for flags, lines naming a measurement the note holds: the flag is the suite's flag for the
             note's value ("wrong flag", "missing flag"); a flag on a row that did not ask for one: "unasked flag".
    range    rows that ask for ranges, recognised lines: the bracket holds the suite's range of the named measurement
             ("wrong range", "missing range", "unasked range").
    missing  measurements of the asked section that the note holds and no line names: incomplete, counted apart
             from wrong, never in the accuracies.

Accuracies are over lines: value over every non-empty line, flag and range over the lines where they are judged.
A degenerate answer is named as `abstention.invented_values` names it ("empty", "echo", "repeated"); what each
scores is pinned in `tests/test_demo_facts.py`.
"""

from __future__ import annotations

import argparse
import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from atmoe.grounding import canonical, numbers

from .abstention import check_row, kept_rows, name_patterns
from .suite import MEASURES, TASK_KIND

_BULLET = re.compile(r"^\s*[-*•]\s*")
_FLAG = re.compile(r":\s*([A-Za-z]+)")
_BRACKET = re.compile(r"\(([^)]*)\)")
_PATTERNS = {a: name_patterns(m) for a, m in MEASURES.items()}


def note_values(text: str) -> dict[str, str]:
    """{abbreviation: value as written} for every suite measurement `text` writes as "<abbrev> <number>"."""
    found = {}
    for a, (abbrev, _) in _PATTERNS.items():
        hit = re.search(abbrev.pattern + r"\s+(\d+(?:\.\d+)?)", text)
        if hit:
            found[a] = hit.group(1)
    return found


def parse_line(text: str) -> tuple[str | None, str | None, str | None, tuple[str, ...] | None]:
    """(the measurement it names, its value, its flag word, the numbers of its bracket) of one answer line; None
    where the line has none (a line naming several measurements names none)."""
    body = _BULLET.sub("", text)
    hits = [(h.start(), -(h.end() - h.start()), h.end(), a) for a, pats in _PATTERNS.items() for p in pats
            if (h := p.search(body))]
    _, _, end, abbrev = min(hits) if hits else (0, 0, 0, None)   # the first name; the longest where two start there
    rest = body[end:]
    before = rest.split("(", 1)[0]
    values, flag, bracket = numbers(before), _FLAG.search(before), _BRACKET.search(rest)
    if len({h[3] for h in hits}) > 1:                 # a line of several facts ("Vitals: RR 16, HR 76") is none
        abbrev = None
    return (abbrev, values[0] if values else None, flag.group(1).lower() if flag else None,
            tuple(numbers(bracket.group(1))) if bracket else None)


@dataclass(frozen=True)
class LineCheck:
    """One answer line's verdicts: `value` "ok" or its error kind; `flag` and `range` "ok", an error kind, or None
    (not judged)."""

    text: str
    measure: str | None
    value: str
    flag: str | None
    range: str | None

    @property
    def errors(self) -> list[str]:
        return [k for k in (self.value, self.flag, self.range) if k not in (None, "ok")]


@dataclass(frozen=True)
class RowCheck:
    combo: tuple[str | None, str | None, str | None]
    lines: tuple[LineCheck, ...]
    missing: tuple[str, ...]           # asked measurements the note holds that no line names
    expected: int                      # asked measurements the note holds: the reference's lines
    degenerate: str | None

    @property
    def right(self) -> bool:           # every line right and nothing missing
        return not self.missing and bool(self.lines) and not any(c.errors for c in self.lines)


def row_combo(row: dict[str, Any]) -> tuple[str | None, str | None, str | None]:
    combo = row.get("meta", {}).get("combo")
    if combo:
        return tuple(combo)  # type: ignore[return-value]
    experts = row.get("experts", [])
    pick = [next((e for e in experts if e in names), None)
            for names in (("labs", "vitals"), ("flags", "ranges"), ("bullets", "plain"))]
    return pick[0], pick[1], pick[2]


def check_answer(answer: str, row: dict[str, Any]) -> RowCheck:
    """Every line of `answer` against the note of `row` (the input box and the instruction as given)."""
    combo = row_combo(row)
    task, knowledge, _ = combo
    note = note_values(f"{row['instruction']}\n{row['input']}")
    asked = {TASK_KIND[task]} if task else {"lab", "vital"}
    other = {canonical(v) for a, v in note.items() if MEASURES[a].kind not in asked}
    seen: set[str] = set()
    checks = []
    for text in (x.strip() for x in answer.splitlines()):
        if not text:
            continue
        a, value, flag, bracket = parse_line(text)
        if a is None:
            checks.append(LineCheck(text, None, "unrecognised", None, None))   # no suffix judged on no fact
            continue
        m, held = MEASURES[a], note.get(a)
        if a in seen:
            verdict = "duplicate"
        elif m.kind not in asked:
            verdict = "cross-read"
        elif held is not None and value is not None and canonical(value) == canonical(held):
            verdict = "ok"
        elif value is not None and canonical(value) in other:
            verdict = "cross-read"
        else:
            verdict = "not in note" if held is None else "wrong value"
        seen.add(a)
        judged = verdict != "duplicate"
        if knowledge == "flags":
            f = (None if not judged or held is None else "missing flag" if flag is None
                 else "ok" if flag == m.flag(held) else "wrong flag")
        else:
            f = "unasked flag" if flag else None
        if knowledge == "ranges":
            r = (None if not judged else "missing range" if bracket is None
                 else "ok" if [canonical(v) for v in bracket] == [canonical(str(m.low)), canonical(str(m.high))]
                 else "wrong range")
        else:
            r = "unasked range" if bracket is not None else None
        checks.append(LineCheck(text, a, verdict, f, r))
    missing = tuple(a for a in note if MEASURES[a].kind in asked and a not in seen)
    expected = sum(MEASURES[a].kind in asked for a in note)
    return RowCheck(combo, tuple(checks), missing, expected, check_row(answer, row).degenerate)


# ---------------------------------------------------------------- over many rows
def _combo_name(combo: tuple[str | None, ...]) -> str:
    return " + ".join(e for e in combo if e)


def _tally(checks: list[RowCheck]) -> dict[str, Any]:
    lines = [c for rc in checks for c in rc.lines]
    flags = [c.flag for c in lines if c.flag in ("ok", "wrong flag", "missing flag")]
    ranges = [c.range for c in lines if c.range in ("ok", "wrong range", "missing range")]

    def share(ok: int, n: int) -> float | None:
        return ok / n if n else None
    return {"rows": len(checks), "rows_right": sum(rc.right for rc in checks), "lines": len(lines),
            "value_ok": sum(c.value == "ok" for c in lines), "value_acc": share(sum(c.value == "ok" for c in lines),
                                                                                len(lines)),
            "flag_lines": len(flags), "flag_acc": share(flags.count("ok"), len(flags)),
            "range_lines": len(ranges), "range_acc": share(ranges.count("ok"), len(ranges)),
            "unasked": sum(c.flag == "unasked flag" or c.range == "unasked range" for c in lines),
            "cross_reads": sum(c.value == "cross-read" for c in lines),
            "missing": sum(len(rc.missing) for rc in checks), "expected": sum(rc.expected for rc in checks)}


def score_answers(rows: list[dict[str, Any]], answers: list[str]) -> dict[str, Any]:
    """The facts report of `answers` (aligned with `rows`): per composition, per task and knowledge expert, overall;
    the confusion (measurement × error kind × style expert); every row's verdicts."""
    if len(rows) != len(answers):
        raise ValueError(f"{len(answers)} answers for {len(rows)} rows")
    checks = [check_answer(a, r) for a, r in zip(answers, rows)]
    combos = sorted({rc.combo for rc in checks}, key=lambda c: tuple(e or "" for e in c))
    confusion: Counter[tuple[str, str, str]] = Counter()
    for rc in checks:
        style = rc.combo[2] or "none"
        for c in rc.lines:
            confusion.update((c.measure or "?", kind, style) for kind in c.errors)
        confusion.update((a, "missing line", style) for a in rc.missing)
    return {
        "rows": len(rows),
        "by_combo": {_combo_name(c): _tally([rc for rc in checks if rc.combo == c]) for c in combos},
        "by_expert": {e: _tally([rc for rc in checks if e in rc.combo])
                      for e in ("labs", "vitals", "flags", "ranges", "bullets", "plain")
                      if any(e in rc.combo for rc in checks)},
        "overall": _tally(checks),
        "confusion": [{"measure": a, "kind": k, "style": s, "n": n}
                      for (a, k, s), n in sorted(confusion.items(), key=lambda kv: (-kv[1], kv[0]))],
        "degenerate": dict(Counter(rc.degenerate for rc in checks if rc.degenerate)),
        "answers": [{"answer": a, "combo": _combo_name(rc.combo), "right": rc.right, "missing": list(rc.missing),
                     "degenerate": rc.degenerate,
                     "lines": [{"text": c.text, "measure": c.measure, "errors": c.errors} for c in rc.lines]}
                    for a, rc in zip(answers, checks)],
    }


def coverage(rows: list[dict[str, Any]]) -> Counter[tuple[str, str, str]]:
    """How often each measurement is a reference line under each (knowledge, style) in training `rows`."""
    counts: Counter[tuple[str, str, str]] = Counter()
    for row in rows:
        task, knowledge, style = row_combo(row)
        if not row.get("experts"):
            continue
        note = note_values(row["input"])
        asked = {TASK_KIND[task]} if task else {"lab", "vital"}
        counts.update((a, knowledge or "none", style or "none") for a in note if MEASURES[a].kind in asked)
    return counts


def _pct(x: float | None) -> str:
    return "–" if x is None else f"{x:.3f}"


def markdown(report: dict[str, Any], top: int = 20) -> str:
    head = ("| composition | rows | fully right | lines | value | flag | range | unasked suffix | cross-read | "
            "missing / expected |\n|---|---|---|---|---|---|---|---|---|---|")

    def row(name: str, t: dict[str, Any]) -> str:
        return (f"| {name} | {t['rows']} | {t['rows_right']} | {t['lines']} | {_pct(t['value_acc'])} | "
                f"{_pct(t['flag_acc'])} ({t['flag_lines']}) | {_pct(t['range_acc'])} ({t['range_lines']}) | "
                f"{t['unasked']} | {t['cross_reads']} | {t['missing']} / {t['expected']} |")
    out = [head, *(row(k, t) for k, t in report["by_combo"].items()),
           *(row(f"**any with {k}**", t) for k, t in report["by_expert"].items()), row("**all**", report["overall"])]
    by_style: Counter[tuple[str, str]] = Counter()
    for c in report["confusion"]:
        by_style[(c["kind"], c["style"])] += c["n"]
    styles = ("none", "bullets", "plain")
    out += ["", "| error | style none | bullets | plain |", "|---|---|---|---|"]
    out += [f"| {k} | " + " | ".join(str(by_style[(k, s)]) for s in styles) + " |"
            for k in sorted({k for k, _ in by_style})]
    out += ["", "| measurement | error | style | lines |", "|---|---|---|---|"]
    out += [f"| {c['measure']} | {c['kind']} | {c['style']} | {c['n']} |" for c in report["confusion"][:top]]
    if len(report["confusion"]) > top:
        out.append(f"| … {len(report['confusion']) - top} more | | | |")
    out += ["", f"cross-reads: {report['overall']['cross_reads']}; degenerate answers: "
                f"{report['degenerate'] or 'none'}"]
    return "\n".join(out)


def coverage_markdown(counts: Counter[tuple[str, str, str]]) -> str:
    cols = [(k, s) for k in ("none", "flags", "ranges") for s in ("none", "bullets", "plain")]
    out = ["| measurement | " + " | ".join(f"{k}/{s}" for k, s in cols) + " |", "|---|" + "---|" * len(cols)]
    out += [f"| {a} | " + " | ".join(str(counts[(a, k, s)]) for k, s in cols) + " |" for a in MEASURES]
    return "\n".join(out)


def knowledge_routing(report: dict[str, Any], rows: list[dict[str, Any]], manifest: str) -> str:
    """Routes the rows that ask for a knowledge expert (routing only, no generation), adds to each of their answers
    the knowledge group's highest gate over layers and the asked expert's layer-mean weight, and lists them."""
    from atmoe.model import ATMoE

    m = ATMoE.load(manifest, device="cpu")
    ix = [i for i, r in enumerate(rows) if row_combo(r)[1]]
    traces = [t for s in range(0, len(ix), 8) for t in m.route_batch(
        [rows[i]["instruction"] for i in ix[s:s + 8]], inputs=[rows[i]["input"] for i in ix[s:s + 8]])]
    out = ["| composition | knowledge gate (max over layers) | asked expert's weight (layer mean) | errors |",
           "|---|---|---|---|"]
    for i, tr in sorted(zip(ix, traces), key=lambda p: p[1].group_weights[:, p[1].groups.index("knowledge")].max()):
        ans, asked = report["answers"][i], row_combo(rows[i])[1]
        ans["knowledge_gate"] = float(tr.group_weights[:, tr.groups.index("knowledge")].max())
        ans["asked_weight"] = float(tr.expert_weights[:, tr.experts.index(asked)].mean())
        errs = sorted({e for line in ans["lines"] for e in line["errors"]} | ({"missing line"} if ans["missing"]
                                                                               else set()))
        out.append(f"| {ans['combo']} | {ans['knowledge_gate']:.2f} | {ans['asked_weight']:.2f} | "
                   f"{', '.join(errs) or 'right'} |")
    return "\n".join(out)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in Path(path).read_text(encoding="utf-8").splitlines() if x.strip()]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--results", required=True, help="a results.json of `python -m demo.eval`")
    p.add_argument("--system", default="", help="whose answers (default: the file's shipped system)")
    p.add_argument("--rows", default="assets/data/eval.jsonl", help="the rows the answers are aligned with")
    p.add_argument("--out", default="", help="write the full report (every line's verdicts) here")
    p.add_argument("--coverage", default="", help="a training file: count each measurement per knowledge/style")
    p.add_argument("--routing", default="", help="a manifest: add the routing of each row asking for knowledge")
    p.add_argument("--let-in", default="", metavar="MANIFEST",
                   help="score only the rows this model's stay-out head lets in (the others answer as the base model)")
    a = p.parse_args(argv)
    table = json.loads(Path(a.results).read_text(encoding="utf-8"))
    system = a.system or table["shipped"]
    if system not in table["answers"]:
        raise SystemExit(f"error: no answers for {system!r}; the file has {sorted(table['answers'])}")
    rows = read_jsonl(a.rows)[:len(table["answers"][system])]
    answers = table["answers"][system]
    if a.let_in:
        from atmoe import ATMoE

        out = kept_rows(ATMoE.load(a.let_in, device="cpu"), rows)
        print(f"{sum(out)} of {len(rows)} rows kept out by {a.let_in}'s stay-out head: not scored")
        rows, answers = [r for r, k in zip(rows, out) if not k], [t for t, k in zip(answers, out) if not k]
    report = {"system": system, "results": str(a.results), **score_answers(rows, answers)}
    print(f"## {system}: {report['rows']} rows\n\n{markdown(report)}")
    if a.coverage:
        print(f"\n## reference lines per measurement × knowledge/style in {a.coverage}\n")
        print(coverage_markdown(coverage(read_jsonl(a.coverage))))
    if a.routing:
        print(f"\n## routing of the rows that ask for a knowledge expert ({a.routing})\n")
        print(knowledge_routing(report, rows, a.routing))
    if a.out:
        Path(a.out).parent.mkdir(parents=True, exist_ok=True)
        Path(a.out).write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
        print(f"\nreport: {a.out}")


if __name__ == "__main__":
    main()
