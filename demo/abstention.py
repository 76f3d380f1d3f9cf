"""Does the router stay out of what it has no skill for, and does an answer never invent a value?

    python -m demo.abstention [--manifest M] [--everyday-n 120] [--same-n 24] [--outside-n 12] [--inskill-n 64]

Four measurements, on held-out requests only (`demo/everyday.py`: families never used in training):

    stays out      everyday requests: share whose every group gate is ≤ 0.3 on every layer (a routing pass, no
                   generation), with the highest gate per domain
    do no harm     on the first `same_n` of them: share whose greedy answer is token-identical to the base model's
                   (every expert disabled), over `max_new_tokens`
    never invented clinical requests outside the six skills (medications, allergies, diagnoses), the note in the
                   instruction box and in the input box: share of greedy answers with no number absent from the note
                   (`invented_values`); the same on in-skill held-out rows (assets/data/eval.jsonl), where the
                   reference ranges are allowed on rows that ask for them
    needed gates   in-skill held-out rows: recall of needed groups (gate > 0.5 on some layer, as `gate_hits`)

Writes a JSON report (every answer, every invented value) and prints the summary.
"""

from __future__ import annotations

import argparse
import json
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from atmoe.grounding import unsupported_measurements, unsupported_values
from atmoe.load.files import atomic_write_json
from atmoe.trace import STAY_OUT   # a gate at most this on every layer: the group stays out

from .config import REPO, SHIPPED_MANIFEST
from .everyday import everyday_rows, outside_rows
from .suite import MEASURES

# The request of issue 24 that invented "systolic blood pressure 120 / blood sugar 120 / creatinine 120", both boxes.
_ISSUE_REQUEST = "Explain this patient's medications in plain words, as a bulleted list."
_ISSUE_NOTE = "Note: 58-year-old man on metformin 500 mg twice daily and lisinopril 10 mg daily."
ISSUE_EXAMPLE = [{"instruction": f"{_ISSUE_REQUEST}\n{_ISSUE_NOTE}", "input": "", "experts": []},
                 {"instruction": _ISSUE_REQUEST, "input": _ISSUE_NOTE, "experts": []}]

NEEDED = 0.5       # a needed group's gate opens above this on some layer (`evaluate.gate_hits`)

@dataclass(frozen=True)
class ValueCheck:
    """One answer against its source: `invented` lists the values it writes that the source does not hold, and the
    measurements it writes a value for that the source does not name; `degenerate` names an answer that says nothing
    of its own ("empty", "echo" of the source, "repeated" line); `mentioned`, the measurements it names without a
    value that the source does not name ("metformin lowers blood sugar"): no invention, listed apart."""

    invented: tuple[str, ...]
    degenerate: str | None
    mentioned: tuple[str, ...] = ()

    @property
    def ok(self) -> bool:   # incomplete is allowed, invented is not
        return not self.invented


def _lines(text: str) -> list[str]:
    return [" ".join(x.lower().split()) for x in text.splitlines() if x.strip()]


def name_patterns(m: Any) -> tuple[re.Pattern[str], re.Pattern[str]]:
    """How a measurement is named: its abbreviation as written (case matters: "T", "K", "Ca"), its lay name in any
    case (shared with the facts check, `demo/facts.py`)."""
    return re.compile(rf"(?<![\w]){re.escape(m.abbrev)}(?![\w])"), re.compile(rf"\b{re.escape(m.lay)}\b", re.I)


def measurements(text: str) -> list[str]:
    """The suite's measurements `text` names (by abbreviation or lay name), as lay names."""
    return [m.lay for m in MEASURES.values() if any(p.search(text) for p in name_patterns(m))]


def invented_values(answer: str, source: str, allowed: tuple[str, ...] = ()) -> ValueCheck:
    """The values of `answer` absent from `source` (the note and instruction as the user gave them) and from
    `allowed` (knowledge the request asks for, e.g. reference ranges); then the measurements it writes a value for
    that the source does not name ("creatinine 10" where the note has no creatinine: a note's number under an
    invented name; `atmoe.grounding.unsupported_measurements`, the rule grounded decoding enforces), as lay
    names. A measurement named without a value is `mentioned`, not invented."""
    named = set(measurements(source))
    with_value = [m.lay for m in MEASURES.values() if unsupported_measurements(answer, [(m.abbrev, m.lay)], source)]
    mentioned = tuple(n for n in measurements(answer) if n not in named and n not in with_value)
    invented = tuple(dict.fromkeys([*unsupported_values(answer, source, " ".join(allowed)), *with_value]))
    lines = _lines(answer)
    flat = " ".join(" ".join(answer.split()).lower().split())
    if not lines:
        degenerate = "empty"
    elif flat in " ".join(source.lower().split()):
        degenerate = "echo"
    elif len(lines) >= 3 and len(set(lines)) <= len(lines) / 2:
        degenerate = "repeated"
    else:
        degenerate = None
    return ValueCheck(invented, degenerate, mentioned)


def range_numbers(note: str) -> tuple[str, ...]:
    """The reference ranges of the suite's measurements that `note` holds: what the `ranges` expert may add."""
    return tuple(v for a, m in MEASURES.items() if re.search(rf"\b{a}\b", note) for v in (m.fmt(m.low), m.fmt(m.high)))


def check_row(answer: str, row: dict[str, Any]) -> ValueCheck:
    source = f"{row['instruction']}\n{row['input']}"
    allowed = range_numbers(source) if "ranges" in row.get("experts", []) else ()
    return invented_values(answer, source, allowed)


# ---------------------------------------------------------------- measurements on a model
def stays_out(m: Any, rows: list[dict[str, Any]], batch_size: int = 16) -> dict[str, Any]:
    """Routing only: per row the highest group gate over layers; share with every gate ≤ STAY_OUT."""
    highest = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        for tr in m.route_batch([r["instruction"] for r in chunk], inputs=[r["input"] for r in chunk]):
            highest.append(tr.highest_group_weights)           # [G]: each group's highest gate over layers
    top = np.array(highest)                                    # [N, G]
    closed = top.max(1) <= STAY_OUT
    domains: dict[str, list[int]] = {}
    for i, r in enumerate(rows):
        domains.setdefault(r["meta"]["domain"], []).append(i)
    return {"n": len(rows), "threshold": STAY_OUT, "share_closed": float(closed.mean()),
            "highest_gate": {g: float(top[:, j].max()) for j, g in enumerate(m.groups)},
            "mean_highest_gate": {g: float(top[:, j].mean()) for j, g in enumerate(m.groups)},
            "by_domain": {d: {"n": len(ix), "share_closed": float(closed[ix].mean()),
                              "highest_gate": float(top[ix].max())} for d, ix in sorted(domains.items())},
            "rows": [{"instruction": r["instruction"], "family": r["meta"]["family"],
                      "highest": dict(zip(m.groups, map(float, t)))} for r, t in zip(rows, top)]}


def _generate(m: Any, rows: list[dict[str, Any]], max_new_tokens: int, overrides: Any = None,
              batch_size: int = 8, grounded: bool = False) -> list[Any]:
    out = []
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        out += m.generate_batch([r["instruction"] for r in chunk], inputs=[r["input"] for r in chunk],
                                max_new_tokens=max_new_tokens, overrides=overrides, grounded=grounded)
    return out


def same_as_base(m: Any, rows: list[dict[str, Any]], max_new_tokens: int, grounded: bool = False) -> dict[str, Any]:
    """Greedy answers routed vs with every expert disabled (both `grounded` or not): share token-identical over
    `max_new_tokens`."""
    from atmoe.overrides import Overrides

    routed = _generate(m, rows, max_new_tokens, grounded=grounded)
    base = _generate(m, rows, max_new_tokens, Overrides(disabled=m.experts), grounded=grounded)
    same = [a.token_ids == b.token_ids for a, b in zip(routed, base)]
    return {"n": len(rows), "max_new_tokens": max_new_tokens, "share_identical": float(np.mean(same)),
            "rows": [{"instruction": r["instruction"], "identical": s, "routed": a.text, "base": b.text}
                     for r, s, a, b in zip(rows, same, routed, base)]}


def never_invented(rows: list[dict[str, Any]], answers: list[str]) -> dict[str, Any]:
    checks = [check_row(a, r) for a, r in zip(answers, rows)]
    degenerate: dict[str, int] = {}
    for c in checks:
        if c.degenerate:
            degenerate[c.degenerate] = degenerate.get(c.degenerate, 0) + 1
    return {"n": len(rows), "share_ok": float(np.mean([c.ok for c in checks])),
            "with_invented": sum(not c.ok for c in checks), "degenerate": degenerate,
            "with_mentioned": sum(bool(c.mentioned) for c in checks),
            "rows": [{"instruction": r["instruction"], "input": r["input"], "answer": a,
                      "invented": list(c.invented), "mentioned": list(c.mentioned), "degenerate": c.degenerate}
                     for r, a, c in zip(rows, answers, checks)]}


def routed_and_base(m: Any, rows: list[dict[str, Any]], max_new_tokens: int, grounded: bool = False
                    ) -> tuple[dict[str, Any], dict[str, Any]]:
    """`never_invented` of the routed answers and of the base model's (every expert disabled) on the same rows: a
    value the base model invents too is not the routing's doing, and a closed routing answers exactly as the base."""
    from atmoe.overrides import Overrides

    routed = _generate(m, rows, max_new_tokens, grounded=grounded)
    base = _generate(m, rows, max_new_tokens, Overrides(disabled=m.experts), grounded=grounded)
    out = never_invented(rows, [g.text for g in routed])
    out["same_as_base"] = sum(a.token_ids == b.token_ids for a, b in zip(routed, base))
    return out, never_invented(rows, [g.text for g in base])


def kept_rows(m: Any, rows: list[dict[str, Any]]) -> list[bool]:
    """Which of `rows` ({"instruction", "input", ...}) the router's stay-out head keeps out (none without a head)."""
    from atmoe.train.data import Example
    from atmoe.train.stay_out import kept_out

    return kept_out(m, [Example(r["instruction"], r["input"], None, []) for r in rows]).tolist()


def kept_out_share(m: Any, rows: list[dict[str, Any]]) -> float | None:
    """The share of `rows` the router's stay-out head keeps out (None without a head)."""
    if not m.router.config.stay_out:
        return None
    kept = kept_rows(m, rows)
    return sum(kept) / len(kept) if kept else float("nan")


def needed_recall(m: Any, rows: list[dict[str, Any]], batch_size: int = 16) -> dict[str, Any]:
    hits = total = 0
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        for tr, r in zip(m.route_batch([x["instruction"] for x in chunk], inputs=[x["input"] for x in chunk]),
                         chunk):
            top = tr.highest_group_weights
            for g in {tr.layout.group_of(e) for e in r["experts"]}:
                total += 1
                hits += bool(top[tr.groups.index(g)] > NEEDED)
    return {"n_rows": len(rows), "needed_groups": total, "recall": hits / total if total else None}


@dataclass
class AbstentionConfig:
    """What `python -m demo.abstention` measures, and on how many rows."""

    manifest: str = str(REPO / SHIPPED_MANIFEST)
    everyday_n: int = 120          # held-out everyday requests, routing only
    same_n: int = 24               # of them, answered twice (routed, base)
    outside_n: int = 12            # clinical requests outside the skills, per box (instruction, input)
    inskill_n: int = 64            # held-out in-skill rows (assets/data/eval.jsonl)
    max_new_tokens: int = 48       # do-no-harm comparison
    answer_tokens: int = 80        # clinical answers
    inskill_answers: str = ""      # a results.json whose shipped system's answers stand in for generating them
    out: str = "runs/abstention/report.json"
    device: str = "auto"
    gate_floor: float = -1.0       # the router's gate floor for this measurement (RouterConfig.gate_floor); < 0: its own
    grounded: bool = False         # every answer decoded grounded (GenerationSettings.grounded), the base's too

    def __post_init__(self) -> None:
        for k in ("everyday_n", "inskill_n", "max_new_tokens", "answer_tokens"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        if self.outside_n < 0:
            raise ValueError(f"outside_n must be >= 0 (0: skip), got {self.outside_n}")
        if not self.gate_floor < 1:
            raise ValueError(f"gate_floor must be < 1 (a gate at or below it reads as 0), got {self.gate_floor}")
        if not 0 <= self.same_n <= self.everyday_n:
            raise ValueError(f"same_n must be in [0, everyday_n], got {self.same_n}")
        if self.grounded and self.inskill_answers:
            raise ValueError("grounded answers are generated: drop inskill_answers (its stored answers are not grounded)")


def measure(cfg: AbstentionConfig) -> dict[str, Any]:
    from atmoe.model import ATMoE

    from .evaluate import read_rows

    t0 = time.perf_counter()
    m = ATMoE.load(cfg.manifest, device=cfg.device, gate_floor=cfg.gate_floor if cfg.gate_floor >= 0 else None)
    everyday = everyday_rows("heldout", cfg.everyday_n)
    report: dict[str, Any] = {"config": {k: v for k, v in vars(cfg).items() if k not in ("out", "device")}}
    report["config"]["gate_floor"] = m.router.config.gate_floor
    report["config"]["manifest"] = str(Path(cfg.manifest).resolve().relative_to(REPO)) \
        if Path(cfg.manifest).resolve().is_relative_to(REPO) else Path(cfg.manifest).name
    report["stays_out"] = stays_out(m, everyday)
    report["stays_out"]["kept_out_by_head"] = kept_out_share(m, everyday)
    report["same_as_base"] = same_as_base(m, everyday[:cfg.same_n], cfg.max_new_tokens, cfg.grounded) \
        if cfg.same_n else None
    report["outside"], report["outside_base"] = {}, {}
    for where in ("instruction", "input") if cfg.outside_n else ():
        rows = outside_rows("heldout", cfg.outside_n, where=where)
        report["outside"][where], report["outside_base"][where] = routed_and_base(m, rows, cfg.answer_tokens,
                                                                                  cfg.grounded)
        report["outside"][where]["kept_out_by_head"] = kept_out_share(m, rows)
    report["issue_example"], report["issue_example_base"] = routed_and_base(m, ISSUE_EXAMPLE, cfg.answer_tokens,
                                                                            cfg.grounded)
    inskill = read_rows(REPO / "assets" / "data" / "eval.jsonl")[:cfg.inskill_n]
    if cfg.inskill_answers:   # the stored table's answers of its shipped system (the build checks they regenerate)
        table = json.loads(Path(cfg.inskill_answers).read_text(encoding="utf-8"))
        answers = table["answers"][table["shipped"]][:cfg.inskill_n]
        report["inskill_source"] = f"{Path(cfg.inskill_answers).name}: {table['shipped']}, max_new_tokens " \
                                   f"{table['max_new_tokens']}"
    else:
        answers = [g.text for g in _generate(m, inskill, cfg.answer_tokens, grounded=cfg.grounded)]
        report["inskill_source"] = f"generated, max_new_tokens {cfg.answer_tokens}"
    report["inskill"] = never_invented(inskill, answers)
    report["needed"] = needed_recall(m, inskill)
    report["needed"]["kept_out_by_head"] = kept_out_share(m, inskill)
    report["seconds"] = round(time.perf_counter() - t0, 1)
    return report


def rescore(report: dict[str, Any]) -> dict[str, Any]:
    """The never-invented sections again, from the answers a report stored (no model): for a changed check."""
    from .evaluate import read_rows

    def again(part: dict[str, Any]) -> dict[str, Any]:
        rows = [{**r, "experts": []} for r in part["rows"]]
        return {**part, **never_invented(rows, [r["answer"] for r in part["rows"]])}

    for key in ("outside", "outside_base"):
        report[key] = {where: again(part) for where, part in report.get(key, {}).items()}
    for key in ("issue_example", "issue_example_base"):
        if key in report:
            report[key] = again(report[key])
    inskill = read_rows(REPO / "assets" / "data" / "eval.jsonl")[:report["inskill"]["n"]]
    report["inskill"] = never_invented(inskill, [r["answer"] for r in report["inskill"]["rows"]])
    return report


def summary(report: dict[str, Any]) -> str:
    s, lines = report["stays_out"], []
    lines.append(f"stays out: {s['share_closed']:.3f} of {s['n']} held-out everyday requests keep every gate "
                 f"<= {s['threshold']} on every layer; highest gate per group {_fmt(s['highest_gate'])}, "
                 f"mean of each row's highest {_fmt(s['mean_highest_gate'])}")
    lines += [f"    {d}: {v['share_closed']:.2f} closed of {v['n']}, highest gate {v['highest_gate']:.2f}"
              for d, v in s["by_domain"].items()]
    head = {k: p["kept_out_by_head"] for k, p in (("everyday", s), ("in-skill", report["needed"]),
                                                  *report["outside"].items()) if p.get("kept_out_by_head") is not None}
    if head:
        lines.append("kept out by the stay-out head: " + ", ".join(f"{k} {v:.3f}" for k, v in head.items()))
    if report["same_as_base"]:
        b = report["same_as_base"]
        lines.append(f"do no harm: {b['share_identical']:.3f} of {b['n']} greedy answers token-identical to the base "
                     f"model's over {b['max_new_tokens']} tokens")
    for where, o in report["outside"].items():
        lines.append(f"outside the skills, note in the {where} box: {o['share_ok']:.3f} of {o['n']} answers invent "
                     f"no value ({o['with_invented']} invent; degenerate {o['degenerate'] or 'none'}; "
                     f"{o.get('with_mentioned', 0)} name a measurement the note lacks without a value)")
        if where in report.get("outside_base", {}):
            b = report["outside_base"][where]
            lines.append(f"    the base model (every expert disabled) on them: {b['share_ok']:.3f} invent no value "
                         f"({b['with_invented']} invent); routed answers token-identical to its: "
                         f"{o.get('same_as_base', '?')} of {o['n']}")
    for row in report["issue_example"]["rows"]:
        where = "input" if row["input"] else "instruction"
        lines.append(f"issue example, note in the {where} box: {row['answer']!r} invented {row['invented'] or 'none'}")
    i = report["inskill"]
    lines.append(f"in-skill held-out rows ({report['inskill_source']}): {i['share_ok']:.3f} of {i['n']} answers "
                 f"invent no value ({i['with_invented']} invent; degenerate {i['degenerate'] or 'none'})")
    n = report["needed"]
    lines.append(f"needed-group recall on in-skill held-out rows: {n['recall']:.3f} of {n['needed_groups']} groups")
    lines.append(f"({report['seconds']:.0f} s)")
    return "\n".join(lines)


def _fmt(d: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.2f}" for k, v in d.items())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    d = AbstentionConfig()
    for k, v in vars(d).items():
        if isinstance(v, bool):
            p.add_argument("--" + k.replace("_", "-"), action="store_true")
        else:
            p.add_argument("--" + k.replace("_", "-"), type=type(v), default=v)
    p.add_argument("--rescore", default="", help="a report: score its stored answers again (no model), write --out")
    a = vars(p.parse_args(argv))
    again = a.pop("rescore")
    try:
        cfg = AbstentionConfig(**a)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    report = rescore(json.loads(Path(again).read_text(encoding="utf-8"))) if again else measure(cfg)
    out = atomic_write_json(Path(cfg.out), report)
    print(summary(report))
    print(f"report: {out}")


if __name__ == "__main__":
    main()
