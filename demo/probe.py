"""Where in depth must each group act for independent experts to compose? A sweep of hand-set layer profiles.

For every held-out row, the labelled experts run at weight 1 (sigmoid gates, one expert per group) on a layer range
per group, everything else off; the answers are scored like the evaluation. The first row of the table is the
layer-constant oracle (every labelled expert on every layer: what a global-weight merge can express).

    python -m demo.probe --manifest assets/experts.json --n 8 --profiles 10:20,15:24,5:15,20:25

This is a measurement of the experts, not a system: it shows whether a per-layer router has something to find.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from atmoe.model import ATMoE
from atmoe.router import GroupedRouter

from .config import STAGE1_MANIFEST
from .metrics import score


def fixed_router(m: ATMoE, experts: list[str], first_layer: dict[str, int]) -> GroupedRouter:
    """A hand-set sigmoid router: each labelled expert's group is on (gate 1) from `first_layer[group]` to the top
    and off below; the labelled expert takes its whole group (β = 1); other groups are off."""
    router = m.new_router(mode="sigmoid")
    on, off = 30.0, -30.0   # sigmoid(±30): 1 and 0 to float precision
    with torch.no_grad():
        router.group_bias.fill_(off)
        router.expert_bias.fill_(off)
        for e in experts:
            g = m.groups.index(m.expert_groups[e])
            router.group_bias[first_layer.get(m.expert_groups[e], 0):, g] = on
            router.expert_bias[:, m.experts.index(e)] = on
    router.trained = True
    return router


def probe(m: ATMoE, rows: list[dict[str, Any]], starts: list[dict[str, int]]) -> list[dict[str, Any]]:
    out = []
    longest = max(len(m.tokenizer(r["output"])["input_ids"]) for r in rows)
    for first in tqdm(starts, desc="layer profiles"):
        f1 = []
        for r in rows:
            gen = m.generate(r["instruction"], input=r["input"], max_new_tokens=longest + 16,
                             router=fixed_router(m, r["experts"], first), merge=True)
            f1.append(score(gen.text, r)["f1"])
        out.append({"first_layer": first, "f1": float(np.mean(f1)), "n": len(rows)})
        print(json.dumps(out[-1]))
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manifest", default=STAGE1_MANIFEST)
    p.add_argument("--data", default="assets/data/eval.jsonl")
    p.add_argument("--n", type=int, default=24, help="rows needing all three groups")
    p.add_argument("--profiles", default=None, help="K:S,... first layer of knowledge and of style (task: all layers); "
                                                   "default: a grid over thirds")
    p.add_argument("--out", default=None, help="write the table as JSON here")
    a = p.parse_args(argv)
    m = ATMoE.load(a.manifest, device="cpu")
    rows = [json.loads(x) for x in Path(a.data).read_text().splitlines() if x.strip()]
    rows = [r for r in rows if len({m.expert_groups[e] for e in r["experts"]}) == len(m.groups)][: a.n]
    L = m.num_layers
    grid = ([tuple(int(x) for x in p.split(":")) for p in a.profiles.split(",")] if a.profiles else
            list(itertools.product([0, L // 3, L // 2, 2 * L // 3], [L // 3, L // 2, 2 * L // 3, 5 * L // 6])))
    starts = [{}] + [{"knowledge": k, "style": s} for k, s in grid]
    table = probe(m, rows, starts)
    if a.out:
        from atmoe.load.files import atomic_write_json
        atomic_write_json(a.out, table)


if __name__ == "__main__":
    main()
