"""The demo's routers: the grouped-sigmoid router and its two ablations, trained alike on one data file; then the
co-adapted experts and their router (`build_coadapted`); then each co-adapted router alone on an outside writer's
wordings (`build_reroute`).

Equal steps, batch, learning rate and data for every router, so the evaluation table compares normalisations only:
    grouped_sigmoid  independent gate per group (an expert can run at the weight it was trained at), softmax within
    grouped_softmax  the paper's shared budget over groups (k needed groups get 1/k each), softmax within
    flat_router      one softmax over all experts (no groups)
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any

from atmoe.load.base import base_signature, load_base
from atmoe.load.files import atomic_write_bytes, atomic_write_json
from atmoe.load.manifest import ExpertEntry, GroupEntry, Manifest

from .config import COADAPTED, ROUTERS, SHIPPED, Coadapted, train_bf16
from .portable import portable_path
from .suite import EXPERT_DESCRIPTIONS, EXPERT_VALUES, GROUPS


def write_manifest(cfg: Any, out: Path) -> Path:
    """assets/experts.json: base, groups, experts, and the shipped router once it exists."""
    path = out / "experts.json"
    model, _ = load_base(cfg.base, device="cpu")
    manifest = Manifest([GroupEntry(g, [ExpertEntry(n, f"experts/{n}", description=EXPERT_DESCRIPTIONS[n],
                                                    values=EXPERT_VALUES.get(n))
                                        for n in names]) for g, names in GROUPS.items()],
                        base_model=cfg.base, base_signature=base_signature(model),
                        description="Clinical demo: 6 LoRA experts (task, knowledge, style) on "
                                    f"{portable_path(cfg.base) if cfg.base else 'SmolLM2-135M-Instruct'}", root=out)
    if (out / ROUTERS[0][2]).exists():
        manifest.router = ROUTERS[0][2]
    return manifest.save(path)


def build_routers(cfg: Any, suite: Path, out: Path) -> None:

    from atmoe.train.router import RouterTrainConfig, train_router

    manifest = write_manifest(cfg, out)
    for i, (name, mode, rel) in enumerate(ROUTERS):
        if (out / rel).exists() and not cfg.force:
            print(f"router {name}: exists, skipped")
            continue
        train_router(RouterTrainConfig(
            manifest=str(manifest), data=str(suite / "router_train.jsonl"), out=str(out / rel), base=cfg.base,
            mode=mode, steps=cfg.router_steps, batch_size=cfg.router_batch, lr=cfg.router_lr, max_length=320,
            bf16=train_bf16(), checkpoints=str(Path(cfg.work) / "checkpoints" / f"router-{name}"),
            update_manifest=i == 0))
        print(f"router {name}: written to {out / rel}")


def build_coadapted(cfg: Any, suite: Path, out: Path) -> None:
    """Stage 2, each variant of `config.COADAPTED`: from the stage-1 experts and router, experts and router train
    together on the training combinations in wider wordings (`coadapt.jsonl`; LM loss on the composed answers + the
    same label loss). Writes the variant's folder (experts, router, manifest)."""

    from atmoe.train.router import RouterTrainConfig, train_router

    data = suite / "coadapt.jsonl"
    for v in COADAPTED:
        folder = v.path(cfg)
        if (folder / "experts.json").exists() and not cfg.force:
            print(f"{v.name}: exists, skipped")
            continue
        (folder / REROUTED).unlink(missing_ok=True)       # a new co-adapted router is not rerouted yet
        rerouted(cfg, v).unlink(missing_ok=True)
        train_router(RouterTrainConfig(
            manifest=str(out / "experts.json"), data=str(data), base=cfg.base, mode=v.mode, pooling=v.pooling,
            init_router=str(out / v.init), train_experts=True, experts_out=str(folder), steps=cfg.coadapt_steps,
            batch_size=cfg.router_batch, lr=cfg.coadapt_lr, expert_lr=cfg.coadapt_expert_lr, max_length=320,
            bf16=train_bf16(), checkpoints=str(Path(cfg.work) / "checkpoints" / v.name)))
        print(f"{v.name}: written to {folder}")


REROUTED = "reroute.json"     # in a co-adapted folder: its router is the rerouted one (steps, rows, the router's hash)


def rerouted(cfg: Any, v: Coadapted = SHIPPED) -> Path:
    """Where the reroute stage trains variant `v`'s router, before it is swapped into the variant's folder."""
    return Path(cfg.work) / "reroute" / v.name / "router.safetensors"


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def build_reroute(cfg: Any, suite: Path, out: Path) -> None:
    """Each co-adapted router trained again alone (experts and stay-out head frozen, as they are) on `writer.jsonl`:
    stage 2's wordings plus an outside writer's (`suite.WRITER_PHRASES`), so it reads a request in words the project
    did not write (docs/facts.md, v8). The flat ablation is rerouted alike, so shipped − flat still compares groups
    alone. Trained into the work folder, then swapped in atomically and recorded in `reroute.json`; a rerun skips
    it, and one cut before the record swaps in what was trained."""
    from atmoe.train.router import RouterTrainConfig, train_router

    for v in COADAPTED:
        folder = v.path(cfg)
        router, stamp, log = folder / "router.safetensors", folder / REROUTED, folder / "router.log.jsonl"
        if stamp.exists():
            print(f"reroute: {router} is rerouted already, skipped (the coadapt stage's next run makes a new one)")
            continue
        if not (folder / "experts.json").exists():
            raise ValueError(f"reroute: {v.name} is not co-adapted yet ({folder / 'experts.json'} is missing): "
                             "add the 'coadapt' stage")
        trained = rerouted(cfg, v)
        if not trained.exists():
            train_router(RouterTrainConfig(
                manifest=str(folder / "experts.json"), data=str(suite / "writer.jsonl"), out=str(trained),
                base=cfg.base, mode=v.mode, pooling=v.pooling, init_router=str(router), steps=cfg.reroute_steps,
                batch_size=cfg.router_batch, lr=cfg.reroute_lr, max_length=320, bf16=train_bf16(),
                checkpoints=str(Path(cfg.work) / "checkpoints" / f"reroute-{v.name}"), update_manifest=False))
        if log.exists() and not (folder / "coadapt.log.jsonl").exists():
            os.replace(log, folder / "coadapt.log.jsonl")                  # stage 2's loss log, kept
        atomic_write_bytes(log, trained.with_suffix(".log.jsonl").read_bytes())
        atomic_write_bytes(router, trained.read_bytes())
        atomic_write_json(stamp, {"data": "writer.jsonl", "steps": cfg.reroute_steps, "lr": cfg.reroute_lr,
                                  "batch_size": cfg.router_batch, "router_sha256": _sha256(router)})
        print(f"reroute: {router} trained on {suite / 'writer.jsonl'} ({cfg.reroute_steps} steps)")
