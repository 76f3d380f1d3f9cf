"""The evaluation table: every system generates answers to the held-out complex instructions, scored by rules.

Systems (names as in results.json):
    base             no expert (every expert disabled)
    expert:<name>    one expert at full weight on every layer
    uniform_merge    every expert at weight 1/E on every layer (an untrained flat router)
    flat_router      a trained router with one softmax over all experts (no groups)
    grouped_softmax  AT-MoE: groups share a softmax budget, softmax within groups
    grouped_sigmoid  AT-MoE: independent group gates, softmax within groups
    oracle           the labelled experts at full weight (sigmoid semantics), the rest off

Selection accuracy (routers only): over every (example, needed group), does the expert with the highest
layer-averaged within-group weight match the label?
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from .io import atomic_write_bytes, atomic_write_json
from .medical import score_example
from .model import ATMoE
from .overrides import Overrides
from .router import GroupedRouter, load_router


@dataclass
class System:
    name: str
    router: GroupedRouter
    overrides: Any = None          # Overrides, or a function example → Overrides
    is_router: bool = False


def systems(m: ATMoE, routers: dict[str, GroupedRouter]) -> Iterator[System]:
    sigmoid = m.new_router(mode="sigmoid")
    yield System("base", m.router, Overrides(disabled=m.experts))
    for e in m.experts:
        g = m.expert_groups[e]
        yield System(f"expert:{e}", sigmoid, Overrides(groups={h: float(h == g) for h in m.groups}, experts={e: 1.0}))
    yield System("uniform_merge", m.new_router(mode="flat"))
    for name, router in routers.items():
        yield System(name, router, None, is_router=True)

    def oracle(ex: dict[str, Any]) -> Overrides:
        needed = set(ex["experts"])
        groups = {g: float(any(m.expert_groups[e] == g for e in needed)) for g in m.groups}
        # Within each needed group the labelled experts share the group evenly (β sums to 1).
        experts = {}
        for g in m.groups:
            members = [e for e in m.experts if m.expert_groups[e] == g]
            chosen = [e for e in members if e in needed]
            if chosen:
                experts.update({e: (1.0 / len(chosen) if e in chosen else 0.0) for e in members})
        return Overrides(groups=groups, experts=experts)

    yield System("oracle", sigmoid, oracle)


def selection_hits(m: ATMoE, trace: Any, ex: dict[str, Any]) -> tuple[int, int]:
    beta = trace.expert_weights.mean(0)
    hits = total = 0
    for g in m.groups:
        cols = [i for i, e in enumerate(m.experts) if m.expert_groups[e] == g]
        wanted = {m.experts[i] for i in cols} & set(ex["experts"])
        if wanted:
            total += 1
            hits += m.experts[cols[int(np.argmax(beta[cols]))]] in wanted
    return hits, total


def evaluate(m: ATMoE, rows: list[dict[str, Any]], routers: dict[str, GroupedRouter], *, max_new_tokens: int = 96,
             batch_size: int = 8, split: str = "eval") -> dict[str, Any]:
    results: dict[str, Any] = {"split": split, "n": len(rows), "max_new_tokens": max_new_tokens, "systems": {},
                               "examples": {}}
    all_systems = list(systems(m, routers))
    for sys in tqdm(all_systems, desc="systems"):
        per_metric: dict[str, list[float]] = {}
        hits = total = 0
        answers = []
        for start in tqdm(range(0, len(rows), batch_size), desc=sys.name, leave=False):
            chunk = rows[start:start + batch_size]
            groups: dict[str, list[int]] = {}  # rows sharing the same overrides generate together
            for i, ex in enumerate(chunk):
                ov = sys.overrides(ex) if callable(sys.overrides) else sys.overrides
                groups.setdefault(json.dumps(ov.to_dict() if ov else None, sort_keys=True), []).append(i)
            outs: dict[int, Any] = {}
            for key, idx in groups.items():
                ov = json.loads(key)
                gens = m.generate_batch([chunk[i]["instruction"] for i in idx], inputs=[chunk[i]["input"] for i in idx],
                                        max_new_tokens=max_new_tokens, router=sys.router,
                                        overrides=Overrides.from_dict(ov) if ov else None)
                outs.update(zip(idx, gens))
            for i, ex in enumerate(chunk):
                gen = outs[i]
                answers.append(gen.text)
                for k, v in score_example(gen.text, ex).items():
                    per_metric.setdefault(k, []).append(v)
                if sys.is_router:
                    h, t = selection_hits(m, gen.trace, ex)
                    hits, total = hits + h, total + t
        metrics = {k: float(np.mean(v)) for k, v in sorted(per_metric.items())}
        results["systems"][sys.name] = {
            "metrics": metrics, "mean": float(np.mean(list(metrics.values()))) if metrics else 0.0,
            "selection_accuracy": (hits / total if total else None) if sys.is_router else None}
        results["examples"][sys.name] = answers[:5]
    return results


def markdown_table(results: dict[str, Any]) -> str:
    metrics = sorted({k for s in results["systems"].values() for k in s["metrics"]})
    head = ["system", *metrics, "mean", "selection acc."]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in results["systems"].items():
        sel = s["selection_accuracy"]
        cells = [f"`{name}`", *(f"{s['metrics'][k]:.3f}" if k in s["metrics"] else "–" for k in metrics),
                 f"**{s['mean']:.3f}**", "–" if sel is None else f"{sel:.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return (f"Held-out split `{results['split']}`: n = {results['n']} complex instructions (wordings and skill "
            f"combinations unseen in training), greedy, ≤ {results['max_new_tokens']} new tokens.\n\n"
            + "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Score every system on the held-out split; write results.json + .md")
    p.add_argument("--manifest", default="assets/experts.json")
    p.add_argument("--data", default="assets/data/eval.jsonl")
    p.add_argument("--router", action="append", default=[], metavar="NAME=PATH",
                   help="extra routers, e.g. grouped_sigmoid=assets/routers/sigmoid.safetensors")
    p.add_argument("--n", type=int, default=40)
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--out", default="assets/eval")
    a = p.parse_args(argv)
    m = ATMoE.load(a.manifest)
    rows = [json.loads(line) for line in Path(a.data).read_text(encoding="utf-8").splitlines() if line.strip()]
    routers = {"grouped_softmax": m.router} if m.router.trained else {}
    for spec in a.router:
        name, _, path = spec.partition("=")
        routers[name] = load_router(path, expected=m.router.config).to(m.device)
    order = ["flat_router", "grouped_softmax", "grouped_sigmoid"]
    routers = dict(sorted(routers.items(), key=lambda kv: order.index(kv[0]) if kv[0] in order else 99))
    results = evaluate(m, rows[: a.n], routers, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size,
                       split=Path(a.data).name)
    out = Path(a.out)
    atomic_write_json(out / "results.json", results)
    atomic_write_bytes(out / "results.md", markdown_table(results).encode())
    print(markdown_table(results))


if __name__ == "__main__":
    main()
