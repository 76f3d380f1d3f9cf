"""Rebuild every shipped artifact of the demo from scratch, with fixed seeds (`make assets`).

    suite (seeded) → 7 LoRA experts (PEFT, fp16) → manifest → routers (grouped softmax, grouped sigmoid, flat)
    → evaluation table (assets/eval/results.{json,md})

Sized for 2 CPU cores (short sequences, few steps); a GPU is used automatically when present. Each stage skips work
whose output already exists unless `--force`, so an interrupted run resumes where it stopped.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from .base import DEFAULT_BASE, base_signature, load_base
from .manifest import ExpertEntry, GroupEntry, Manifest
from .medical import EXPERT_DESCRIPTIONS, GROUPS, write_suite

ROUTERS = {"grouped_softmax": ("softmax", "router.safetensors"),
           "grouped_sigmoid": ("sigmoid", "routers/sigmoid.safetensors"),
           "flat_router": ("flat", "routers/flat.safetensors")}


def build(out: Path, work: Path, *, expert_steps: int, router_steps: int, eval_n: int, force: bool,
          only: set[str]) -> None:
    from .evaluate import main as eval_main
    from .train_expert import ExpertTrainConfig, train_expert
    from .train_router import RouterTrainConfig, train_router

    suite_dir = work / "suite"
    if force or not (suite_dir / "eval.jsonl").exists():
        write_suite(suite_dir, seed=0)
    (out / "data").mkdir(parents=True, exist_ok=True)
    shutil.copyfile(suite_dir / "eval.jsonl", out / "data" / "eval.jsonl")  # the held-out set ships (dashboard)

    if "experts" in only:
        for group, names in GROUPS.items():
            for name in names:
                target = out / "experts" / name
                if target.exists() and not force:
                    print(f"expert {name}: exists, skipped")
                    continue
                train_expert(ExpertTrainConfig(name=name, group=group, data=str(suite_dir / "experts" / f"{name}.jsonl"),
                                               out=str(target), steps=expert_steps, batch_size=4, lr=1.5e-3,
                                               logging_steps=5, save_steps=20, resume=True))

    model, _ = load_base(None, device="cpu")
    manifest = Manifest([GroupEntry(g, [ExpertEntry(n, f"experts/{n}", description=EXPERT_DESCRIPTIONS[n])
                                        for n in names]) for g, names in GROUPS.items()],
                        base_model=None, base_signature=base_signature(model),
                        description=f"Medical demo: 7 LoRA experts on {DEFAULT_BASE}", root=out)
    old = out / "experts.json"
    if old.exists():
        manifest.router = Manifest.load(old).router
    manifest.save(old)
    del model

    if "routers" in only:
        for name, (mode, rel) in ROUTERS.items():
            if (out / rel).exists() and not force:
                print(f"router {name}: exists, skipped")
                continue
            train_router(RouterTrainConfig(manifest=str(old), data=str(suite_dir / "router_train.jsonl"),
                                           out=str(out / rel), mode=mode, steps=router_steps, batch_size=8,
                                           lr=2e-2, max_length=320, update_manifest=(mode == "softmax")))
    if "eval" in only:
        eval_main(["--manifest", str(old), "--data", str(out / "data" / "eval.jsonl"), "--n", str(eval_n),
                   "--out", str(out / "eval"),
                   *[f"--router={n}={out / rel}" for n, (_, rel) in ROUTERS.items() if n != "grouped_softmax"]])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default=str(Path(__file__).resolve().parent.parent / "assets"))
    p.add_argument("--work", default="runs", help="folder for the generated training data and checkpoints")
    p.add_argument("--expert-steps", type=int, default=60)
    p.add_argument("--router-steps", type=int, default=40)
    p.add_argument("--eval-n", type=int, default=40)
    p.add_argument("--only", default="experts,routers,eval", help="stages to run (comma-separated)")
    p.add_argument("--force", action="store_true", help="rebuild outputs that already exist")
    a = p.parse_args(argv)
    build(Path(a.out), Path(a.work), expert_steps=a.expert_steps, router_steps=a.router_steps, eval_n=a.eval_n,
          force=a.force, only=set(a.only.split(",")))


if __name__ == "__main__":
    main()
