"""Whose failure is it, the router's or the experts'? Each held-out row that needs a skill, asked three ways: as
written; with that skill's wording replaced by a training one; and as written but routed, every layer, exactly as
the replaced text is (`atmoe.overrides.replay`). If the third is right where the first is not, the experts could
answer the held-out wording and only the router misread it (docs/facts.md).

    python -m demo.transplant [--manifest assets/coadapted/experts.json] [--skill ranges]
                              [--to "Add the normal range to each."] [--n 576] [--wordings heldout|fresh|blind]
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np

from atmoe.load.files import atomic_write_json
from atmoe.model import ATMoE
from atmoe.overrides import replay
from atmoe.tokens import encode_text

from .config import SHIPPED_MANIFEST
from .decide import _check, end_tokens, fully_right, held_out_rows
from .suite import PHRASES, WORDINGS, heldout_phrases


def transplant(manifest: str, skill: str, to: str, n: int, wordings: str = "heldout", device: str = "auto"
               ) -> dict[str, Any]:
    t0 = time.perf_counter()
    m = ATMoE.load(manifest, device=device)
    asked = heldout_phrases(wordings)[skill]
    rows = [r for r in held_out_rows(n, wordings) if skill in r["experts"]]
    swapped = []
    for r in rows:
        text = r["instruction"]
        for p in asked:
            text = text.replace(p, to)
        swapped.append({**r, "instruction": text})
    traces = m.route_batch([r["instruction"] for r in swapped], inputs=[r["input"] for r in swapped])
    eos = end_tokens(m)
    replayed = [bool(_check(m, [r], [encode_text(m.tokenizer, r["output"])], m.router, replay(t, m.layout), eos)[0])
                for r, t in zip(rows, traces)]     # one row a call: each has its own overrides
    cols = {"as asked": fully_right(m, rows, "shipped"),
            "training wording in the text": fully_right(m, swapped, "shipped"),
            "as asked, routed as the training wording": replayed}
    per = {p: {k: int(np.array(v)[[i for i, r in enumerate(rows) if p in r["instruction"]]].sum())
               for k, v in cols.items()} | {"n": sum(p in r["instruction"] for r in rows)} for p in asked}
    return {"manifest": manifest, "skill": skill, "to": to, "n": len(rows), "wordings": wordings,
            "fully_right": {k: int(sum(v)) for k, v in cols.items()}, "per_wording": per,
            "rows": {k: [int(x) for x in v] for k, v in cols.items()}, "seconds": round(time.perf_counter() - t0, 1)}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manifest", default=SHIPPED_MANIFEST)
    p.add_argument("--skill", default="ranges", choices=sorted(PHRASES))
    p.add_argument("--to", default="", help="the training wording routed instead (default: the skill's first)")
    p.add_argument("--n", type=int, default=576, help="decide's rows (only those needing the skill are asked)")
    p.add_argument("--wordings", choices=WORDINGS, default="heldout")
    p.add_argument("--out", default="runs/transplant/report.json")
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    try:
        if a.n < 1:
            raise ValueError(f"--n must be >= 1, got {a.n}")
        report = transplant(a.manifest, a.skill, a.to or PHRASES[a.skill][0][0], a.n, a.wordings, a.device)
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    atomic_write_json(Path(a.out), report)
    print(f"{report['n']} held-out rows needing {a.skill} ({a.wordings} wordings), fully right, "
          f"{report['seconds']:.0f} s")
    for k, v in report["fully_right"].items():
        print(f"  {k}: {v}")
    for w, c in report["per_wording"].items():
        print(f"  {json.dumps(w)}: " + ", ".join(f"{k} {v}" for k, v in c.items()))


if __name__ == "__main__":
    main()
