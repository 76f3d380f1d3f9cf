"""Steering by groups, the case where groups should matter (issue 24): on a request that needs three skills, switch
one group off and check that the answer is exactly the composition of the two skills left.

    python -m demo.steer [--manifest assets/coadapted/experts.json] [--n 576] [--out runs/steer/shipped.json]
    python -m demo.steer --manifest <flat model> --against runs/steer/shipped.json --out runs/steer/flat.json

A grouped router's gates are independent: with the style group off, the task and knowledge gates stay as the router
set them. A flat router's weights are one budget: with its style experts off, the task and knowledge experts share
the whole of it (`atmoe.overrides`), weights its co-adapted experts never ran at on such a request. Rows: the
three-skill rows of `demo.decide.held_out_rows(n)`; the reference is the suite's composition rule without the
switched-off skill; the score is `demo.decide`'s fully right (one forward per row).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from atmoe.load.files import atomic_write_json

from .decide import held_out_rows, paired, wording_ids
from .facts import parse_line
from .suite import GROUPS, WORDINGS, line

OFF = ("knowledge", "style")


def without(row: dict[str, Any], group: str) -> dict[str, Any]:
    """`row` with `group`'s skill taken out of what it asks for: the reference the two skills left compose."""
    combo = list(row["meta"]["combo"])
    combo[list(GROUPS).index(group)] = None
    items = [parse_line(x)[:2] for x in row["output"].splitlines()]
    if any(a is None or v is None for a, v in items):
        raise ValueError(f"a reference line of {row['output']!r} names no measurement and value")
    return {**row, "output": "\n".join(line(a, v, combo[1], combo[2]) for a, v in items),
            "experts": [e for e in row["experts"] if e not in GROUPS[group]], "meta": {"combo": combo}}


def steer(manifest: str, n: int, wordings: str = "heldout", device: str = "auto") -> dict[str, Any]:
    from atmoe.model import ATMoE

    from .decide import fully_right

    m = ATMoE.load(manifest, device=device)
    rows = [r for r in held_out_rows(n, wordings) if len(r["experts"]) == 3]
    right = {"all on": fully_right(m, rows, "shipped")}
    for g in OFF:
        right[f"off:{g}"] = fully_right(m, [without(r, g) for r in rows], f"off:{g}")
    return {"manifest": manifest, "n": n, "wordings": wordings, "rows_used": len(rows),
            "score": "fully right against the reference without the switched-off skill",
            "fully_right": {k: float(v.mean()) for k, v in right.items()},
            "rows": {k: v.astype(int).tolist() for k, v in right.items()}}


def check_same_rows(other: dict[str, Any], n: int, wordings: str, name: str) -> None:
    if not isinstance(other, dict) or (other.get("n"), other.get("wordings")) != (n, wordings) \
            or not isinstance(other.get("rows"), dict):
        got = (other.get("n"), other.get("wordings")) if isinstance(other, dict) else (None, None)
        raise ValueError(f"{name} is not a demo.steer report on the same rows (n {got[0]}, wordings {got[1]}; "
                         f"this run: n {n}, wordings {wordings})")


def against(report: dict[str, Any], other: dict[str, Any], name: str) -> dict[str, Any]:
    """Per system, `report` − `other` on the same rows, with the row and wording intervals."""
    check_same_rows(other, report["n"], report["wordings"], name)
    rows = [r for r in held_out_rows(report["n"], report["wordings"]) if len(r["experts"]) == 3]
    ids = wording_ids(rows, report["wordings"])
    return {k: paired(np.array(report["rows"][k]), np.array(other["rows"][k]), ids) for k in report["rows"]}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manifest", default="assets/coadapted/experts.json")
    p.add_argument("--n", type=int, default=576, help="decide's held-out rows; the three-skill half is used")
    p.add_argument("--wordings", choices=WORDINGS, default="heldout")
    p.add_argument("--against", default="", help="another model's report on the same rows: this one − it")
    p.add_argument("--out", default="runs/steer/shipped.json")
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    try:
        if a.n < 1:
            raise ValueError(f"--n must be >= 1, got {a.n}")
        other = json.loads(Path(a.against).read_text(encoding="utf-8")) if a.against else None
        if other is not None:
            check_same_rows(other, a.n, a.wordings, a.against)
        report = steer(a.manifest, a.n, a.wordings, a.device)
        if other is not None:
            report["minus_against"] = against(report, other, a.against)
            report["against"] = a.against
    except (ValueError, OSError, json.JSONDecodeError) as e:
        raise SystemExit(f"error: {e}") from None
    atomic_write_json(Path(a.out), report)
    print(f"{report['rows_used']} three-skill rows of {a.n} ({a.wordings} wordings), fully right:")
    for k, v in report["fully_right"].items():
        d = report.get("minus_against", {}).get(k)
        print(f"  {k}: {v:.3f}" + (f"   − against: {d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}], "
                                    f"wordings [{d['ci95_wordings'][0]:+.3f}, {d['ci95_wordings'][1]:+.3f}]"
                                    if d else ""))


if __name__ == "__main__":
    main()
