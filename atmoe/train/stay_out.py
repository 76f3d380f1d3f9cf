"""The router's stay-out head (`GroupedRouter.stay_out_scores`), trained alone: one decision per request, from the
embeddings of the tokens the router reads, whether any expert should run at all.

Why a head of its own: trained into the gates, staying out competes with composing. The gates must open on wordings
of a skill they never saw, and close on requests of no skill they never saw; one set of gates trained for both
closed needed groups and lost composition on held-out wordings (docs/abstention.md). The head leaves the gates as
trained: a request it keeps out is answered by the base model exactly, any other exactly as before.

    python -m atmoe.train.stay_out --manifest experts.json --data rows.jsonl [--validation val.jsonl] \
        [--steps 1000] [--out router.safetensors]

Rows are the training JSONL (`data.py`): `experts: []` should be kept out, a row naming experts engaged; unlabelled
rows are left out; outputs are not read. With `--validation`, the threshold is the one of `THRESHOLDS` that gets the
most validation rows right (kept out + engaged, each side's share weighing the same; the lower on a tie).
"""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

import torch
import torch.nn.functional as F

from ..model import ATMoE
from ..router import GroupedRouter, save_router
from .data import DataError, Example, load_jsonl

THRESHOLDS = (0.5, 0.6, 0.7, 0.8, 0.9, 0.95)


def with_head(router: GroupedRouter, threshold: float = 0.5, fresh: bool = False) -> GroupedRouter:
    """`router` with a stay-out head (new and untrained, or its own if it has one and not `fresh`), every other
    weight shared."""
    out = GroupedRouter(replace(router.config, stay_out=True, stay_out_threshold=threshold))
    state = router.state_dict()
    out.load_state_dict({k: v for k, v in state.items() if not (fresh and k.startswith("stay_"))}, strict=False)
    out.trained = router.trained
    return out.to(router.norm_weight.device)


def _labelled(examples: list[Example]) -> tuple[list[Example], torch.Tensor]:
    rows = [e for e in examples if e.experts is not None]
    return rows, torch.tensor([float(not e.experts) for e in rows])


def features(m: ATMoE, router: GroupedRouter, rows: list[Example], chunk: int = 64) -> torch.Tensor:
    """[N, D]: what the head reads of each row (`GroupedRouter.stay_out_features`), `chunk` rows at a time, so the
    padded embeddings of a whole training set are never held at once."""
    with torch.no_grad():
        return torch.cat([router.stay_out_features(*embed(m, rows[i:i + chunk])) for i in range(0, len(rows), chunk)]
                         or [torch.zeros(0, m.model.config.hidden_size, device=m.device)])


def embed(m: ATMoE, rows: list[Example]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded input embeddings [N, T, D] of each row's prompt and the mask [N, T] of the tokens the router
    reads (the instruction, or the whole prompt: `RouterConfig.reads`)."""
    encoded = [m._encode(r.instruction, r.input) for r in rows]
    T = max(len(e.ids) for e in encoded)
    ids = torch.zeros(len(rows), T, dtype=torch.long)
    mask = torch.zeros(len(rows), T)
    for i, e in enumerate(encoded):
        ids[i, :len(e.ids)] = torch.tensor(e.ids)
        a, b = e.instruction if m.router.config.reads == "instruction" else (0, len(e.ids))
        mask[i, a:b] = 1
    with torch.no_grad():
        return m.model.get_input_embeddings()(ids.to(m.device)).float(), mask.to(m.device)


def train_head(m: ATMoE, examples: list[Example], steps: int = 1000, lr: float = 0.01, batch_size: int = 64,
               seed: int = 0) -> GroupedRouter:
    """m's router with a stay-out head trained on `examples` (only the head's two tensors move). The loss weighs
    kept-out and engaged rows equally, whatever their counts. The head starts new even where m's router has one, so
    retraining a shipped head gives what a build from nothing gives."""
    rows, y = _labelled(examples)
    if not 0 < int(y.sum()) < len(rows):
        raise ValueError("the stay-out head needs rows labelled experts: [] and rows naming experts")
    router = with_head(m.router, fresh=True)
    x = features(m, router, rows)            # the pooling has no weights: read once, train the logistic read
    y = y.to(m.device)
    head = [router.stay_weight, router.stay_bias]
    router.requires_grad_(False)
    for p in head:
        p.requires_grad_(True)
    opt = torch.optim.Adam(head, lr=lr)
    pos_weight = (len(y) - y.sum()) / y.sum()                      # kept-out rows weigh as much as engaged ones
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(0, len(rows), (batch_size,), generator=g).to(m.device)
        p = router.stay_out_read(x[idx]).clamp(1e-6, 1 - 1e-6)
        loss = F.binary_cross_entropy(p, y[idx], weight=torch.where(y[idx] > 0, pos_weight, 1.0))
        opt.zero_grad()
        loss.backward()
        opt.step()
    router.requires_grad_(False)
    return router


def kept_out(m: ATMoE, rows: list[Example]) -> torch.Tensor:
    """[N] bool: which rows m's stay-out head keeps out (all False without a head). Embeddings only, no forward."""
    if not m.router.config.stay_out:
        return torch.zeros(len(rows), dtype=torch.bool)
    with torch.no_grad():
        return (m.router.stay_out_read(features(m, m.router, rows)) >= m.router.config.stay_out_threshold).cpu()


def threshold_table(m: ATMoE, router: GroupedRouter, examples: list[Example]) -> list[dict[str, float]]:
    """Per threshold of THRESHOLDS: the share of kept-out rows kept out, of engaged rows engaged."""
    rows, y = _labelled(examples)
    with torch.no_grad():
        scores = router.stay_out_read(features(m, router, rows)).cpu()
    out = y > 0
    return [{"threshold": t, "kept_out": float((scores[out] >= t).float().mean()) if out.any() else float("nan"),
             "engaged": float((scores[~out] < t).float().mean()) if (~out).any() else float("nan")}
            for t in THRESHOLDS]


def choose_threshold(table: list[dict[str, float]]) -> float:
    return max(table, key=lambda t: (round(t["kept_out"] + t["engaged"], 9), -t["threshold"]))["threshold"]


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manifest", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--validation", default="", help="rows for choosing the threshold (default: keep 0.5)")
    p.add_argument("--out", default="", help="router file to write (default: the manifest's router)")
    p.add_argument("--steps", type=int, default=1000)
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    try:
        if a.steps < 1 or not a.lr > 0:
            raise ValueError(f"--steps must be >= 1 and --lr > 0, got {a.steps} and {a.lr}")
        m = ATMoE.load(a.manifest, device=a.device)
        router = train_head(m, load_jsonl(a.data), a.steps, a.lr, seed=a.seed)
        if a.validation:
            table = threshold_table(m, router, load_jsonl(a.validation))
            router.config = replace(router.config, stay_out_threshold=choose_threshold(table))
            for t in table:
                print(f"threshold {t['threshold']}: kept out {t['kept_out']:.3f}, engaged {t['engaged']:.3f}")
        out = Path(a.out) if a.out else m.manifest.router_path()
        if out is None:
            raise ValueError(f"{a.manifest} names no router: give --out")
        save_router(router, out)
        print(f"stay-out head (threshold {router.config.stay_out_threshold}) written into {out}")
    except DataError as e:
        raise SystemExit(f"error: {e.one_line()}") from None
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {str(e).splitlines()[0]}") from None


if __name__ == "__main__":
    main()
