"""Rebuild the shipped demo from scratch with fixed seeds (`make assets`), stage by stage, resumable.

    suite → experts (PEFT LoRA, each gated on fresh rows of its own skill) → manifest → routers
          → co-adaptation (experts and router trained together on composed answers)
          → reroute (the shipped router alone, on an outside writer's wordings too)
          → cover (the experts alone, on every combination: the two held out so far included) → evaluation
    abstain (only when named): the shipped router gets a stay-out head, gates and experts untouched (`abstain.py`)

Each stage skips outputs that already exist (an expert only once its gate passed), and the Trainer resumes an
interrupted expert or router from its last checkpoint, so rerunning the same command continues where it stopped.
`--quick` builds a miniature of the whole pipeline (a few steps, a few rows) for the tests; its gate is reported,
not enforced.
"""

from __future__ import annotations

import argparse
import json
import shutil
import time
from pathlib import Path
from typing import Any

from atmoe.load.files import atomic_write_json, read_json

from .config import ABSTAIN, STAGES, BuildConfig, train_bf16
from .abstain import build_abstain
from .evaluate import evaluate_demo
from .metrics import score
from .portable import base_identity, make_portable
from .routers import build_coadapted, build_cover, build_reroute, build_routers
from .suite import EXPERT_DESCRIPTIONS, GROUPS, write_suite

GATE = 0.90   # an expert alone must reach this mean line F1 on fresh rows of its own skill
# Optimiser steps per round (batch 8): copying lines and formats is quick, a range lookup or a threshold rule is not.
# An expert that misses its gate trains another round from where it stopped (new data order, half the learning
# rate), up to MAX_ROUNDS; then the build stops naming it.
EXPERT_STEPS = {"flags": 120, "ranges": 90, "plain": 80, "labs": 60, "vitals": 60, "bullets": 50}
MAX_ROUNDS = 3


def gate_expert(name: str, group: str, folder: Path, rows: list[dict[str, Any]], model: Any, tokenizer: Any
                ) -> dict[str, Any]:
    """Score expert `name` alone (weight 1 on every layer) on `rows`; returns {"f1", "exact", "n", "passed"}."""
    from atmoe.model import ATMoE

    m = ATMoE.from_experts(model, tokenizer, [(group, name, folder, "")])  # one expert: w = 1 everywhere
    scores = [score(g.text, r) for r, g in zip(rows, _generate(m, rows, None, None))]
    f1 = sum(s["f1"] for s in scores) / len(scores)
    exact = sum(s["exact"] for s in scores) / len(scores)
    return {"expert": name, "f1": f1, "exact": exact, "n": len(rows), "passed": f1 >= GATE, "threshold": GATE}


def _generate(m: Any, rows: list[dict[str, Any]], router: Any, overrides: Any, batch_size: int = 8) -> list[Any]:
    longest = max(len(m.tokenizer(r["output"])["input_ids"]) for r in rows)
    out = []
    for i in range(0, len(rows), batch_size):
        chunk = rows[i:i + batch_size]
        out += m.generate_batch([r["instruction"] for r in chunk], inputs=[r["input"] for r in chunk],
                                max_new_tokens=longest + 16, router=router, overrides=overrides)
    return out


def _load_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def build_experts(cfg: BuildConfig, suite: Path, out: Path) -> None:
    import torch

    from atmoe.load.base import load_base
    from atmoe.train.expert import ExpertTrainConfig, train_expert

    device = "auto" if torch.cuda.is_available() else "cpu"
    group_of = {e: g for g, names in GROUPS.items() for e in names}
    for name in EXPERT_STEPS:
        group = group_of[name]
        target, gate_file = out / "experts" / name, out / "experts" / name / "gate.json"
        result = read_json(gate_file, "gate result") if gate_file.exists() and not cfg.force else None
        if result is not None and result["passed"]:
            print(f"expert {name}: trained and gated, skipped")
            continue
        # rounds already trained: from the last gate, or 1 for an adapter that was trained but never gated
        trained = (target / "adapter_model.safetensors").exists() and not cfg.force
        rounds = result.get("rounds", 1) if result is not None else int(trained)
        while True:
            if result is not None and (result["passed"] or rounds >= MAX_ROUNDS or cfg.quick):
                break
            if result is not None or rounds == 0:   # the first round, or another after a missed gate
                rounds += 1
                t0 = time.perf_counter()
                model, tok = load_base(cfg.base, device=device)
                train_expert(ExpertTrainConfig(
                    name=name, group=group, data=str(suite / "experts" / f"{name}.jsonl"), out=str(target),
                    base=cfg.base, description=EXPERT_DESCRIPTIONS[name],
                    steps=max(1, round(EXPERT_STEPS[name] * cfg.expert_steps)), bf16=device == "cpu" and train_bf16(),
                    batch_size=cfg.expert_batch, lr=cfg.expert_lr / 2 ** (rounds - 1), seed=rounds - 1,
                    init_adapter=str(target) if rounds > 1 else None, logging_steps=10, save_steps=25,
                    checkpoint_dir=str(Path(cfg.work) / "checkpoints" / f"{name}-{rounds}"), resume=True),
                    model, tok)
                print(f"expert {name}: round {rounds} trained in {time.perf_counter() - t0:.0f} s")
            model, tok = load_base(cfg.base, device=device)
            result = gate_expert(name, group, target, _load_rows(suite / "gate" / f"{name}.jsonl")[: cfg.gate_n],
                                 model, tok)
            result["rounds"] = rounds
            atomic_write_json(gate_file, result)
            print(f"expert {name}: gate F1 {result['f1']:.3f} (exact {result['exact']:.2f}) on {result['n']} fresh "
                  f"rows after {rounds} round(s)")
        if not result["passed"] and not cfg.quick:
            raise SystemExit(f"expert '{name}' failed its gate after {rounds} round(s): F1 {result['f1']:.3f} < "
                             f"{GATE} on fresh rows of its own skill ({gate_file}). Train it longer "
                             "(--expert-steps) and rerun.")


def portable_assets(cfg: BuildConfig, *roots: Path) -> None:
    """The engine's writers record the base's local folder and absolute paths; the shipped files name the base by
    its portable identity instead (`portable.py`)."""
    from atmoe.load.base import base_signature, load_base

    model, _ = load_base(cfg.base, device="cpu")
    identity = base_identity(cfg.base, base_signature(model))
    for root in roots:
        changed = make_portable(root, identity) if Path(root).exists() else []
        if changed:
            print(f"portable: {len(changed)} file(s) under {root} now name the base by its identity, paths relative")


def build(cfg: BuildConfig) -> None:
    out, work = Path(cfg.out), Path(cfg.work)
    suite = work / "suite"
    if "suite" in cfg.stages and (cfg.force or not all((suite / f).exists()
                                                       for f in ("eval.jsonl", "coadapt.jsonl", "writer.jsonl",
                                                                 "cover.jsonl"))):
        write_suite(suite, seed=0, **cfg.suite_sizes)
    training = [s for s in ("experts", "routers", "coadapt", "reroute", "cover", "abstain") if s in cfg.stages]
    if (suite / "eval.jsonl").exists():
        (out / "data").mkdir(parents=True, exist_ok=True)
        for name in ("eval.jsonl", "off_topic.jsonl"):   # the held-out sets ship (dashboard examples, evaluation)
            shutil.copyfile(suite / name, out / "data" / name)
    elif training:   # the evaluation alone reads the shipped held-out rows (out/data)
        raise ValueError(f"stage(s) {', '.join(training)} train on the generated suite, which is not in {suite}: "
                         "add the 'suite' stage (seconds, fixed seed)")
    if "experts" in cfg.stages:
        build_experts(cfg, suite, out)
    if "routers" in cfg.stages:
        build_routers(cfg, suite, out)
    if "coadapt" in cfg.stages:
        build_coadapted(cfg, suite, out)
    if "reroute" in cfg.stages:
        build_reroute(cfg, suite, out)
    if "cover" in cfg.stages:
        build_cover(cfg, suite, out)
    if "abstain" in cfg.stages:
        build_abstain(cfg, suite, out)
    if training:
        portable_assets(cfg, out, ABSTAIN.path(cfg))
    if "eval" in cfg.stages:
        evaluate_demo(cfg, out)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    defaults = BuildConfig()
    p.add_argument("--out", default=defaults.out)
    p.add_argument("--work", default=defaults.work)
    p.add_argument("--base", default=None)
    p.add_argument("--expert-steps", type=float, default=defaults.expert_steps, help="scale of EXPERT_STEPS")
    for k in ("expert_batch", "router_steps", "router_batch", "coadapt_steps", "reroute_steps", "cover_steps", "eval_n",
              "gate_n", "abstain_everyday", "abstain_outside", "abstain_steps", "abstain_validation",
              "abstain_validation_skill"):
        p.add_argument("--" + k.replace("_", "-"), type=int, default=getattr(defaults, k))
    p.add_argument("--expert-lr", type=float, default=defaults.expert_lr)
    p.add_argument("--router-lr", type=float, default=defaults.router_lr)
    p.add_argument("--coadapt-lr", type=float, default=defaults.coadapt_lr)
    p.add_argument("--reroute-lr", type=float, default=defaults.reroute_lr)
    p.add_argument("--coadapt-expert-lr", type=float, default=defaults.coadapt_expert_lr)
    p.add_argument("--stages", default=",".join(defaults.stages), help="comma-separated: " + ",".join(STAGES))
    p.add_argument("--quick", action="store_true", help="a miniature build (tests)")
    p.add_argument("--force", action="store_true", help="rebuild outputs that already exist")
    a = vars(p.parse_args(argv))
    a["stages"] = tuple(s for s in a["stages"].split(",") if s)
    try:
        build(BuildConfig(**a))
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None


if __name__ == "__main__":
    main()
