"""Compare two checkouts of atmoe on the same tiny demo: logits, routing weights and greedy tokens.

    python -m bench.compare_engines OLD_CHECKOUT NEW_CHECKOUT [--pooling attention --mode sigmoid]

Each checkout runs in its own process (its own `atmoe`), on a tiny demo built once by the NEW checkout's
`tests/tiny_models.py`; the result is the max |Δ| per call and whether the greedy tokens agree. Used to check that a
rewrite of the engine keeps its answers (docs/performance.md).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

_RUN = r"""
import json, sys
root, demo, out = sys.argv[1:4]
sys.path[:0] = [root, root + "/tests"]
from atmoe import ATMoE, Overrides
m = ATMoE.load(demo, device="cpu")
res = {}
for name, ov in (("none", None), ("overrides", Overrides(groups={"style": 0.2}, experts={"labs": 0.7}, layers=(1, 2))),
                 ("disabled", Overrides(disabled=["bullets"]))):
    for granularity in ("sequence", "token"):
        s = m.score("List the vital signs. T 38.2 HR 110", overrides=ov, granularity=granularity)
        res[f"{name}/{granularity}/logits"] = s.logits.tolist()
        res[f"{name}/{granularity}/weights"] = s.trace.effective_weights.tolist()
res["tokens"] = m.generate("List the lab results.", max_new_tokens=8).token_ids
json.dump(res, open(out, "w"))
"""


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("old")
    p.add_argument("new")
    p.add_argument("--pooling", default="mean", choices=["mean", "last", "attention"])
    p.add_argument("--mode", default="softmax", choices=["softmax", "sigmoid", "flat"])
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        sys.path[:0] = [a.new, f"{a.new}/tests"]
        from tiny_models import tiny_demo
        demo = tiny_demo(Path(tmp) / "demo", mode=a.mode, pooling=a.pooling)
        results = []
        for root in (a.old, a.new):
            out = Path(tmp) / f"{len(results)}.json"
            subprocess.run([sys.executable, "-c", _RUN, root, str(demo), str(out)], check=True,
                           stderr=subprocess.DEVNULL)
            results.append(json.loads(out.read_text()))
    old, new = results
    for key in old:
        if key == "tokens":
            print(f"{key}: {'same' if old[key] == new[key] else 'DIFFERENT'}")
        else:
            x, y = np.asarray(old[key]), np.asarray(new[key])
            print(f"{key}: max |Δ| {np.abs(x - y).max():.2e} (max |value| {np.abs(x).max():.2f})")


if __name__ == "__main__":
    main()
