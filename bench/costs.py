"""Sections 4–6: how the overhead scales with experts and rank, memory, and router training step time."""

from __future__ import annotations

import copy
import gc
import os
from typing import Any

import torch
from peft import LoraConfig, get_peft_model

from .inference import random_batch, routed
from .models import TARGETS, build_atmoe, nbytes, write_experts
from .timing import interleaved


def rss() -> int | None:
    try:
        import psutil
        return psutil.Process(os.getpid()).memory_info().rss
    except ImportError:
        return None


def _free(ctx: Any) -> None:
    gc.collect()
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


def _overhead(ctx: Any, n: int, rank: int, ids: torch.Tensor, mask: torch.Tensor) -> float:
    """AT-MoE ÷ pristine base prefill, AT-MoE on a fresh copy of the base holding n experts of `rank`."""
    experts = write_experts(ctx.base, ctx.tmp / "scaling", n, rank)
    m = build_atmoe(copy.deepcopy(ctx.base), ctx.tokenizer, experts)
    kw = dict(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
    routed_kw = dict(use_cache=False, logits_to_keep=1)
    with torch.inference_mode():
        t = interleaved({"base": lambda: ctx.base(**kw),
                         "atmoe": lambda: m.forward_routed(ids, mask, mask, **routed_kw)},
                        warmup=ctx.cfg.warmup, repeats=ctx.cfg.repeats, device=ctx.device)
    del m
    _free(ctx)
    return t.ratio("atmoe", "base")


def scaling(ctx: Any) -> dict:
    cfg = ctx.cfg
    ids, mask = random_batch(ctx, 1, cfg.scaling_tokens, seed=3)
    by_experts = []
    for n in cfg.scaling_experts:
        by_experts.append(dict(experts=n, rank=8, ratio=_overhead(ctx, n, 8, ids, mask)))
        ctx.log(f"scaling E={n} r=8: {by_experts[-1]['ratio']:.3f}")
    by_rank = []
    for r in cfg.scaling_ranks:
        by_rank.append(dict(experts=7, rank=r, ratio=_overhead(ctx, 7, r, ids, mask)))
        ctx.log(f"scaling E=7 r={r}: {by_rank[-1]['ratio']:.3f}")
    return dict(tokens=cfg.scaling_tokens, batch=1, repeats=cfg.repeats, by_experts=by_experts, by_rank=by_rank,
                unit="prefill time AT-MoE ÷ base on the same model (lower is better)")


def _call_state_bytes(ctx: Any, batch: int, merge: bool) -> int:
    """Bytes one routed call holds for its whole life (its plan: router head, overrides, pooling weights; what each
    router read; per-layer weights on the rows path), after a prefill: the per-request memory beyond activations.
    Counted exactly from the call's own tensors. Merged weights are not the call's: they live in buffers the model
    keeps across calls (`merge_bytes`, allocated by the first merge=True call)."""
    m = ctx.atmoe
    ids, mask = random_batch(ctx, batch, 64, seed=13)
    with torch.inference_mode():
        if merge:
            with routed(m, mask, merge=True) as (forward, call):
                forward(input_ids=ids, attention_mask=mask, use_cache=False)
        else:
            _, call = m.forward_routed(ids, mask, mask, use_cache=False, logits_to_keep=1)
    records = [t for rec in call.records for t in (rec if isinstance(rec, list) else [rec]) if t is not None]
    tensors = [*call.plan.values(), *(w for w in call.weights if w is not None), *records]
    return sum(t.numel() * t.element_size() for t in {t.data_ptr(): t for t in tensors}.values())


def memory(ctx: Any) -> dict:
    m, base = ctx.atmoe, ctx.base
    elem = next(base.parameters()).element_size()
    base_bytes = nbytes(base)
    atmoe_bytes = nbytes(m.model, m.router)
    expert_bytes = sum(m.expert(e).num_parameters for e in m.experts) * elem  # Σ numel(A) + numel(B), model dtype
    out = dict(base_bytes=base_bytes, atmoe_bytes=atmoe_bytes, atmoe_extra_bytes=atmoe_bytes - base_bytes,
               expert_bytes=expert_bytes, router_bytes=nbytes(m.router),
               ratio=(atmoe_bytes - base_bytes) / expert_bytes,
               peers_extra_bytes={p: nbytes(pm) - base_bytes for p, pm in ctx.peers.items()},
               build_rss_delta_bytes=ctx.build_rss_delta, merge_bytes=m.merge_bytes,
               unit="ratio = (AT-MoE bytes − base bytes) ÷ experts' own A,B bytes (1.0 = no overhead)")
    out["call_state_bytes"] = {f"batch {b}{' merge' if merge else ''}": _call_state_bytes(ctx, b, merge)
                               for b, merge in ((1, False), (8, False), (1, True))}
    out["merged_buffer_bytes"] = sum(g.merged.nbytes for layer in m.state.layers for g in layer.groups
                                     if g.merged is not None)   # kept by the model after a merge=True call
    if ctx.device.type == "cuda":  # activation peak of one prefill, base vs routed
        ids, mask = random_batch(ctx, *max(ctx.prefill_grid, key=lambda bt: bt[0] * bt[1]), seed=5)
        kw = dict(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
        routed_kw = dict(use_cache=False, logits_to_keep=1)
        peaks = {}
        with torch.inference_mode():
            for name, fn in (("base", lambda: base(**kw)),
                             ("atmoe", lambda: m.forward_routed(ids, mask, mask, **routed_kw))):
                torch.cuda.synchronize()
                torch.cuda.reset_peak_memory_stats()
                start = torch.cuda.memory_allocated()
                fn()
                torch.cuda.synchronize()
                peaks[name] = torch.cuda.max_memory_allocated() - start
        out["cuda_prefill_peak_bytes"] = dict(tokens=ids.shape[1], batch=ids.shape[0], **peaks,
                                              ratio=peaks["atmoe"] / max(peaks["base"], 1))
    ctx.log(f"memory: extra {out['atmoe_extra_bytes'] / 2**20:.1f} MiB for {expert_bytes / 2**20:.1f} MiB of experts "
            f"({out['ratio']:.3f})")
    return out


def train(ctx: Any) -> dict:
    """One router training step (AT-MoE) ÷ one LoRA training step (PEFT, one adapter, same targets and rank)."""
    cfg, m = ctx.cfg, ctx.atmoe
    ids, mask = random_batch(ctx, cfg.train_batch, cfg.train_tokens, seed=11)
    prompt_mask = mask.clone()
    prompt_mask[:, cfg.train_tokens // 2:] = 0  # the router pools over the instruction half
    lora = get_peft_model(copy.deepcopy(ctx.base), LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS,
                                                              lora_dropout=0.0), autocast_adapter_dtype=False)
    router = m.new_router()
    router.requires_grad_(True)
    opt_router = torch.optim.AdamW(router.parameters(), lr=1e-4)
    opt_lora = torch.optim.AdamW([p for p in lora.parameters() if p.requires_grad], lr=1e-4)

    def router_step() -> None:
        out, _ = m.forward_routed(ids, mask, prompt_mask, router=router, labels=ids, use_cache=False)
        out.loss.backward()
        opt_router.step()
        opt_router.zero_grad(set_to_none=True)

    def lora_step() -> None:
        lora(input_ids=ids, attention_mask=mask, labels=ids, use_cache=False).loss.backward()
        opt_lora.step()
        opt_lora.zero_grad(set_to_none=True)

    t = interleaved({"lora": lora_step, "atmoe_router": router_step}, warmup=cfg.warmup, repeats=cfg.repeats,
                    device=ctx.device)
    trainable = dict(atmoe_router=sum(p.numel() for p in router.parameters()),
                     lora=sum(p.numel() for p in lora.parameters() if p.requires_grad))
    del lora, opt_lora
    _free(ctx)
    ctx.log(f"train: router step ÷ LoRA step {t.ratio('atmoe_router', 'lora'):.3f}")
    return dict(batch=cfg.train_batch, tokens=cfg.train_tokens, repeats=cfg.repeats,
                seconds={p: t.median(p) for p in t.samples}, trainable_parameters=trainable,
                ratio=t.ratio("atmoe_router", "lora"),
                unit="seconds per step (forward + backward + AdamW); ratio = router step ÷ LoRA step")

