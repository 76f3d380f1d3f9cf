"""Build stage `abstain`: the shipped router learns to stay out, its experts untouched (issue 24).

    python -m demo.build --stages abstain [--work runs/demo]      (docs/abstention.md: time, figures, what ships)

    1. requests   <suite>/abstain_requests.jsonl (`suite.abstention_rows`: training families only), written if missing
    2. answers    <suite>/abstain_answers.jsonl: each everyday request with the base model's own greedy answer
                  (every expert disabled), written batch by batch and resumed: the validation split below reads them
    3. data       <suite>/router_abstain.jsonl: `abstain_skill_rows` rows of coadapt.jsonl (composed answers: LM loss
                  and routing labels, so the gates stay where the frozen experts were co-adapted to work) + every
                  training request that needs no expert as a *routing-only* row (`"output": null`, `experts: []`:
                  every gate → 0, and no answer to copy: an expert that is closed has nothing to say there)
    4. training   `config.ABSTAIN` in <work>/router_abstain: a copy of the shipped folder whose router alone trains
                  (from the shipped router, experts frozen), `abstain_steps` steps; the Trainer resumes it
    5. floor      the gate floor (`RouterConfig.gate_floor`) chosen on a training-family validation split — everyday
                  requests held back from step 3 and fresh in-skill rows in training phrasings (`suite.complex_rows`,
                  another seed) — never on the held-out measurement; written into the router and to floor.json

The first try co-adapted the experts too, on clinical requests answered with copied note lines, and lost the skills
(docs/abstention.md); here the experts cannot move, so a composed answer changes only where the router does.
Nothing here touches the shipped assets: the candidate is measured (`python -m demo.abstention --manifest
<work>/router_abstain/experts.json`) before its router may replace `assets/coadapted/router.safetensors`.
"""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path
from typing import Any

import numpy as np

from atmoe.load.files import atomic_write_bytes, atomic_write_json

from .config import ABSTAIN, BuildConfig, SHIPPED, train_bf16
from .suite import complex_rows, write_abstention_requests

FLOORS = (0.0, 0.1, 0.2, 0.3, 0.4)   # the gate floors the validation split chooses among
VALIDATION_SEED = 7                  # fresh notes for the in-skill validation rows (the suite's are 0, the table's 0)


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()] if path.exists() else []


def _jsonl(rows: list[dict[str, Any]]) -> bytes:
    return "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows).encode()


def base_answers(cfg: BuildConfig, suite: Path, out: Path, batch_size: int = 16) -> Path:
    """Step 2: the base model's answer to every everyday request (resumable: done requests are kept)."""
    from atmoe.model import ATMoE
    from atmoe.overrides import Overrides

    requests = _read(suite / "abstain_requests.jsonl")
    target = suite / "abstain_answers.jsonl"
    # kept: answers that ended, and cut ones already given this budget (a larger budget answers those again)
    done = {r["instruction"]: r for r in _read(target)
            if r["meta"].get("finish") == "eos" or r["meta"].get("tokens", 0) >= cfg.abstain_answer_tokens}
    todo = [r for r in requests if r["meta"].get("family") and r["instruction"] not in done]
    if todo:
        m = ATMoE.load(out / "experts.json", base=cfg.base, device="auto")
        off = Overrides(disabled=m.experts)
        for s in range(0, len(todo), batch_size):
            chunk = todo[s:s + batch_size]
            gens = m.generate_batch([r["instruction"] for r in chunk], inputs=[r["input"] for r in chunk],
                                    max_new_tokens=cfg.abstain_answer_tokens, overrides=off)
            for r, g in zip(chunk, gens):
                done[r["instruction"]] = {**r, "output": g.text, "meta": {**r["meta"], "finish": g.finish_reason,
                                                                          "tokens": cfg.abstain_answer_tokens}}
            atomic_write_bytes(target, _jsonl(list(done.values())))
            print(f"abstain: base answers {min(s + batch_size, len(todo))}/{len(todo)}")
    return target


def split_requests(suite: Path, n_validation: int) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(training rows, validation rows) of the requests that need no expert: the last `n_validation` everyday
    requests are held back for choosing the floor; every training row is routing-only."""
    requests = _read(suite / "abstain_requests.jsonl")
    everyday = [r for r in requests if r["meta"].get("family")]
    validation = everyday[len(everyday) - n_validation:] if n_validation else []
    held = {r["instruction"] for r in validation}
    train = [{**r, "output": None, "experts": []} for r in requests if r["instruction"] not in held]
    return train, validation


def router_data(cfg: BuildConfig, suite: Path, seed: int = 0) -> tuple[Path, dict[str, int]]:
    """Step 3: in-skill rows of coadapt.jsonl + the training requests that need no expert, routing-only."""
    skill = _read(suite / "coadapt.jsonl")[:cfg.abstain_skill_rows]
    train, _ = split_requests(suite, cfg.abstain_validation)
    rows = skill + train
    random.Random(f"atmoe-demo:{seed}:router_abstain").shuffle(rows)
    path = suite / "router_abstain.jsonl"
    atomic_write_bytes(path, _jsonl(rows))
    return path, {"rows": len(rows), "skill": len(skill), "none": len(train),
                  "outside": sum(1 for r in train if not r["meta"].get("family"))}


def choose_floor(m: Any, validation: list[dict[str, Any]], n_skill: int) -> dict[str, Any]:
    """Step 5. For each floor in FLOORS: the share of validation everyday requests whose every gate is at or below
    it on every layer (their answer is then the base model's, token for token: `tests/test_gate_floor.py`), and the
    share of fresh in-skill rows answered fully right (`decide.fully_right`). The floor with the highest sum wins,
    the lower on a tie: both bars weigh the same, and a floor higher than it needs cuts gates for nothing."""
    from dataclasses import replace

    from .decide import fully_right

    floor0 = m.router.config.gate_floor
    m.router.config = replace(m.router.config, gate_floor=0.0)
    traces = m.route_batch([r["instruction"] for r in validation], inputs=[r["input"] for r in validation])
    highest = np.array([max(t.highest_group_weights) for t in traces])
    skill = complex_rows(n_skill, seed=VALIDATION_SEED, wide=True)
    skill = [r for r in skill if r["experts"]]           # the suite's off-topic rows are the everyday split's job
    table = []
    for f in FLOORS:
        m.router.config = replace(m.router.config, gate_floor=f)
        table.append({"floor": f, "closed": float((highest <= f).mean()),
                      "fully_right": float(fully_right(m, skill, "shipped").mean())})
    m.router.config = replace(m.router.config, gate_floor=floor0)
    best = max(table, key=lambda t: (round(t["closed"] + t["fully_right"], 6), -t["floor"]))
    return {"floor": best["floor"], "table": table, "n_everyday": len(validation), "n_skill": len(skill),
            "rule": "max closed + fully_right on the training-family validation split, lower floor on a tie"}


def build_abstain(cfg: BuildConfig, suite: Path, out: Path) -> None:
    from dataclasses import replace

    from atmoe.model import ATMoE
    from atmoe.router import save_router
    from atmoe.train.router import RouterTrainConfig, train_router

    folder = ABSTAIN.path(cfg)
    if (folder / "floor.json").exists() and not cfg.force:
        print(f"{ABSTAIN.name}: exists, skipped")
        return
    requests = suite / "abstain_requests.jsonl"
    if len(_read(requests)) != cfg.abstain_everyday + cfg.abstain_outside:
        write_abstention_requests(suite, 0, cfg.abstain_everyday, cfg.abstain_outside)
    base_answers(cfg, suite, out)
    data, counts = router_data(cfg, suite)
    print(f"abstain: {data} holds {counts['rows']} rows: {counts['skill']} in-skill + {counts['none']} that need no "
          f"expert ({counts['outside']} clinical outside the skills), routing-only")
    if not (folder / "experts.json").exists() or cfg.force:   # the shipped folder, copied: only its router trains
        shutil.rmtree(folder, ignore_errors=True)
        shutil.copytree(SHIPPED.path(cfg), folder)
    train_router(RouterTrainConfig(
        manifest=str(folder / "experts.json"), data=str(data), base=cfg.base, mode=ABSTAIN.mode,
        pooling=ABSTAIN.pooling, init_router=str(Path(cfg.out) / ABSTAIN.init), out=str(folder / "router.safetensors"),
        steps=cfg.abstain_steps, batch_size=cfg.router_batch, lr=cfg.coadapt_lr, max_length=320, bf16=train_bf16(),
        checkpoints=str(Path(cfg.work) / "checkpoints" / ABSTAIN.name), update_manifest=False))
    m = ATMoE.load(folder / "experts.json", base=cfg.base, device="auto")
    _, validation = split_requests(suite, cfg.abstain_validation)
    chosen = choose_floor(m, validation, cfg.abstain_validation_skill)
    m.router.config = replace(m.router.config, gate_floor=chosen["floor"])
    save_router(m.router, folder / "router.safetensors")
    atomic_write_json(folder / "floor.json", chosen)
    for t in chosen["table"]:
        print(f"abstain: floor {t['floor']:.1f}: closed {t['closed']:.3f}, fully right {t['fully_right']:.3f}")
    print(f"{ABSTAIN.name}: written to {folder} (gate floor {chosen['floor']}); measure it with python -m "
          f"demo.abstention --manifest {folder / 'experts.json'}")
