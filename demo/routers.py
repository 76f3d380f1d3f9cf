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
import json
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
        for stale in (folder / REROUTED, folder / COVERED, rerouted(cfg, v), covered(cfg, v) / "experts.json"):
            stale.unlink(missing_ok=True)               # new co-adapted experts and router: not rerouted, not covered
        train_router(RouterTrainConfig(
            manifest=str(out / "experts.json"), data=str(data), base=cfg.base, mode=v.mode, pooling=v.pooling,
            init_router=str(out / v.init), train_experts=True, experts_out=str(folder), steps=cfg.coadapt_steps,
            batch_size=cfg.router_batch, lr=cfg.coadapt_lr, expert_lr=cfg.coadapt_expert_lr, max_length=320,
            bf16=train_bf16(), checkpoints=str(Path(cfg.work) / "checkpoints" / v.name)))
        print(f"{v.name}: written to {folder}")


REROUTED = "reroute.json"     # in a co-adapted folder: its router is the rerouted one (steps, rows, the router's hash)
COVERED = "cover.json"        # in a co-adapted folder: its experts are the covered ones (steps, rows, their hashes)


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


def covered(cfg: Any, v: Coadapted = SHIPPED) -> Path:
    """Where the cover stage trains variant `v`'s experts, before they are swapped into the variant's folder."""
    return Path(cfg.work) / "cover" / v.name


def build_cover(cfg: Any, suite: Path, out: Path) -> None:
    """Each rerouted variant's experts trained once more, alone (the router frozen as rerouted), on
    `cover.jsonl`: every combination, the two that stages 1-2 held out included. Those two measured how the
    composition generalises to combinations never trained (docs/evaluation.md); a clinical tool must have their
    facts right too, and what they got wrong was coverage: no training line ever flagged a lab under its lay name or
    put a range on a bulleted vital sign (docs/facts.md, v9). The flat ablation is covered alike. Trained into the
    work folder, then each expert's weights swapped in atomically and the whole recorded in `cover.json`; a rerun
    skips it, and one cut before the record swaps in what was trained."""
    from atmoe.train.router import RouterTrainConfig, train_router

    for v in COADAPTED:
        folder = v.path(cfg)
        stamp, trained = folder / COVERED, covered(cfg, v)
        if stamp.exists():
            print(f"cover: {folder} is covered already, skipped (the coadapt stage's next run makes new experts)")
            continue
        if not (folder / REROUTED).exists():
            raise ValueError(f"cover: {v.name} is not rerouted yet ({folder / REROUTED} is missing): "
                             "add the 'reroute' stage")
        if not (trained / "experts.json").exists():
            train_router(RouterTrainConfig(
                manifest=str(folder / "experts.json"), data=str(suite / "cover.jsonl"), base=cfg.base, mode=v.mode,
                pooling=v.pooling, init_router=str(folder / "router.safetensors"), train_experts=True,
                experts_out=str(trained), freeze_router=True, train_only=tuple(cfg.cover_experts),
                steps=cfg.cover_steps, batch_size=cfg.router_batch,
                expert_lr=cfg.coadapt_expert_lr, max_length=320, bf16=train_bf16(),
                checkpoints=str(Path(cfg.work) / "checkpoints" / f"cover-{v.name}"), update_manifest=False))
        hashes = {}
        for expert in sorted(p.name for p in (trained / "experts").iterdir()):
            weights = trained / "experts" / expert / "adapter_model.safetensors"
            record = json.loads((folder / "experts" / expert / "atmoe_expert.json").read_text(encoding="utf-8"))
            trained_record = json.loads((weights.parent / "atmoe_expert.json").read_text(encoding="utf-8"))
            record["covered"] = trained_record["coadapted"]
            atomic_write_bytes(folder / "experts" / expert / "adapter_model.safetensors", weights.read_bytes())
            atomic_write_json(folder / "experts" / expert / "atmoe_expert.json", record)
            hashes[expert] = _sha256(weights)
        atomic_write_json(stamp, {"data": "cover.jsonl", "steps": cfg.cover_steps, "expert_lr": cfg.coadapt_expert_lr,
                                  "batch_size": cfg.router_batch, "router": "frozen",
                                  "trained": list(cfg.cover_experts) or "all", "experts_sha256": hashes})
        print(f"cover: {folder}'s experts trained on {suite / 'cover.jsonl'} ({cfg.cover_steps} steps)")
