"""Build stage `abstain`: the shipped router gets a stay-out head (issue 24), its gates and experts untouched.

    python -m demo.build --stages abstain [--work runs/demo]      (docs/abstention.md: figures, and what ships)

    1. requests    <suite>/abstain_requests.jsonl (`suite.abstention_rows`: training families only), written if missing
    2. data        <suite>/stay_out.jsonl: the stage-1 router's rows (`router_train.jsonl`: the experts' own
                   phrasings, labelled with the experts they need; its off-topic rows `experts: []`) + every request
                   of step 1 but the validation ones, `experts: []`
                   <suite>/stay_out_validation.jsonl: `abstain_validation` everyday requests held back from step 2,
                   and `abstain_validation_skill` in-skill rows of coadapt.jsonl worded only with the router's wider
                   phrasings (`suite.ROUTER_PHRASES`), which step 2 never shows the head: a shift of wording like
                   the held-out one, from training data only
    3. head        `atmoe.train.stay_out` on the shipped model: only the head's two tensors train; its threshold is
                   the one that gets most validation rows right. Written, with a copy of the shipped folder, into
                   <work>/stay_out/ (`config.ABSTAIN`)

The held-out families and phrasings never enter steps 2–3: they measure the result (`python -m demo.abstention
--manifest <work>/stay_out/experts.json`). Two earlier tries trained staying out into the gates themselves and lost
composition (docs/abstention.md); the head leaves the gates as shipped. Nothing here writes into `assets/`.
"""

from __future__ import annotations

import json
import random
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from atmoe.load.files import atomic_write_bytes, atomic_write_json

from .config import ABSTAIN, SHIPPED, BuildConfig
from .suite import ROUTER_PHRASES, write_abstention_requests


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()] if path.exists() else []


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def router_worded(instruction: str) -> bool:
    """Whether every sentence of a stage-2 instruction is one of the router's wider phrasings (none of the experts'
    own, which the head trains on)."""
    rest = instruction
    for p in sorted({p for ps in ROUTER_PHRASES.values() for p in ps}, key=len, reverse=True):
        rest = rest.replace(p, " ")
    return not rest.strip()


def head_data(cfg: BuildConfig, suite: Path, seed: int = 0) -> tuple[Path, Path, dict[str, int]]:
    """Step 2: (training rows, validation rows, counts). Every row is routing-only (`"output": null`)."""
    requests = _read(suite / "abstain_requests.jsonl")
    everyday = [r for r in requests if r["meta"].get("family")]
    kept = everyday[len(everyday) - cfg.abstain_validation:] if cfg.abstain_validation else []
    held = {r["instruction"] for r in kept}
    skill = _read(suite / "router_train.jsonl")
    train = [{**r, "output": None} for r in skill + [r for r in requests if r["instruction"] not in held]]
    random.Random(f"atmoe-demo:{seed}:stay_out").shuffle(train)
    shifted = [r for r in _read(suite / "coadapt.jsonl") if r["experts"] and router_worded(r["instruction"])]
    validation = [{**r, "output": None} for r in kept]
    validation += [{**r, "output": None} for r in shifted[:cfg.abstain_validation_skill]]
    paths = suite / "stay_out.jsonl", suite / "stay_out_validation.jsonl"
    atomic_write_bytes(paths[0], _jsonl(train))
    atomic_write_bytes(paths[1], _jsonl(validation))
    return *paths, {"train": len(train), "out": sum(not r["experts"] for r in train), "validation": len(validation)}


def build_abstain(cfg: BuildConfig, suite: Path, out: Path) -> None:
    from atmoe.model import ATMoE
    from atmoe.router import save_router
    from atmoe.train.data import load_jsonl
    from atmoe.train.stay_out import choose_threshold, threshold_table, train_head

    folder = ABSTAIN.path(cfg)
    if (folder / "stay_out.json").exists() and not cfg.force:
        print(f"{ABSTAIN.name}: exists, skipped")
        return
    requests = suite / "abstain_requests.jsonl"
    if len(_read(requests)) != cfg.abstain_everyday + cfg.abstain_outside:
        write_abstention_requests(suite, 0, cfg.abstain_everyday, cfg.abstain_outside)
    train, validation, counts = head_data(cfg, suite)
    print(f"abstain: {train} holds {counts['train']} rows ({counts['out']} need no expert); {validation} "
          f"{counts['validation']}")
    shutil.rmtree(folder, ignore_errors=True)
    shutil.copytree(SHIPPED.path(cfg), folder)          # the shipped experts and gates, as they are
    m = ATMoE.load(folder / "experts.json", base=cfg.base, device="auto")
    router = train_head(m, load_jsonl(train), steps=cfg.abstain_steps)
    table = threshold_table(m, router, load_jsonl(validation))
    router.config = replace(router.config, stay_out_threshold=choose_threshold(table))
    save_router(router, folder / "router.safetensors")
    atomic_write_json(folder / "stay_out.json", {"threshold": router.config.stay_out_threshold, "table": table,
                                                 "steps": cfg.abstain_steps, **counts})
    for t in table:
        print(f"abstain: threshold {t['threshold']}: validation kept out {t['kept_out']:.3f}, engaged "
              f"{t['engaged']:.3f}")
    print(f"{ABSTAIN.name}: written to {folder} (threshold {router.config.stay_out_threshold}); measure it with "
          f"python -m demo.abstention --manifest {folder / 'experts.json'}")
