"""Build stage `abstain`: stage 2 again, with requests that need no expert mixed into its data (issue 24).

    python -m demo.build --stages abstain [--work runs/demo]      (docs/abstention.md: time, and what comes next)

    1. requests   <suite>/abstain_requests.jsonl (`suite.abstention_rows`: training families only), written if missing
    2. answers    <suite>/abstain_answers.jsonl: each everyday request with the base model's own greedy answer
                  (every expert disabled), so the loss on it asks the routed model to answer as the base does; an
                  answer still running after `abstain_answer_tokens` keeps only its routing label (`"output": null`:
                  a cut answer would teach the model to stop where it was cut). Written batch by batch and resumed.
                  The clinical requests keep their answer: the note's lines, copied.
    3. data       <suite>/coadapt_abstain.jsonl: coadapt.jsonl + those rows, shuffled (seeded)
    4. training   `config.ABSTAIN` in <work>/coadapted_abstain: from the stage-1 experts and router, as the shipped
                  co-adaptation (`routers.build_coadapted`), `abstain_steps` steps; the Trainer resumes it

Every row of steps 1–3 is labelled `experts: []`, which the router's label loss reads as "every gate closed".
Nothing here touches the shipped assets: the new model is measured (`python -m demo.abstention --manifest
<work>/coadapted_abstain/experts.json`) and the table rerun before it may replace `assets/coadapted`.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

from atmoe.load.files import atomic_write_bytes

from .config import ABSTAIN, BuildConfig, train_bf16
from .suite import write_abstention_requests


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


def mixed_data(suite: Path, seed: int = 0) -> tuple[Path, dict[str, int]]:
    """Step 3: coadapt.jsonl plus the requests that need no expert; returns the file and what went in."""
    answered = {r["instruction"]: r for r in _read(suite / "abstain_answers.jsonl")}
    everyday, outside, cut = [], [], 0
    for r in _read(suite / "abstain_requests.jsonl"):
        if not r["meta"].get("family"):
            outside.append(r)
        elif r["instruction"] in answered:
            a = answered[r["instruction"]]
            if a["meta"].get("finish") == "eos" and a["output"].strip():
                everyday.append(a)
            else:                       # too long to keep whole: the routing label only, no LM loss
                everyday.append({**a, "output": None})
                cut += 1
    rows = _read(suite / "coadapt.jsonl") + everyday + outside
    random.Random(f"atmoe-demo:{seed}:coadapt_abstain").shuffle(rows)
    path = suite / "coadapt_abstain.jsonl"
    atomic_write_bytes(path, _jsonl(rows))
    return path, {"rows": len(rows), "everyday": len(everyday), "outside": len(outside), "labels_only": cut}


def build_abstain(cfg: BuildConfig, suite: Path, out: Path) -> None:

    from atmoe.train.router import RouterTrainConfig, train_router

    folder = ABSTAIN.path(cfg)
    if (folder / "experts.json").exists() and not cfg.force:
        print(f"{ABSTAIN.name}: exists, skipped")
        return
    requests = suite / "abstain_requests.jsonl"
    if len(_read(requests)) != cfg.abstain_everyday + cfg.abstain_outside:
        write_abstention_requests(suite, 0, cfg.abstain_everyday, cfg.abstain_outside)
    base_answers(cfg, suite, out)
    data, counts = mixed_data(suite)
    print(f"abstain: {data} holds {counts['rows']} rows: + {counts['everyday']} everyday (base answers; "
          f"{counts['labels_only']} still running at {cfg.abstain_answer_tokens} tokens keep their routing label "
          f"only) + {counts['outside']} clinical requests outside the skills")
    train_router(RouterTrainConfig(
        manifest=str(out / "experts.json"), data=str(data), base=cfg.base, mode=ABSTAIN.mode, pooling=ABSTAIN.pooling,
        init_router=str(out / ABSTAIN.init), train_experts=True, experts_out=str(folder), steps=cfg.abstain_steps,
        batch_size=cfg.router_batch, lr=cfg.coadapt_lr, expert_lr=cfg.coadapt_expert_lr, max_length=320,
        bf16=train_bf16(), checkpoints=str(Path(cfg.work) / "checkpoints" / ABSTAIN.name)))
    print(f"{ABSTAIN.name}: written to {folder}; measure it with python -m demo.abstention --manifest "
          f"{folder / 'experts.json'}")
