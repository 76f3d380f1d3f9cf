"""Sections 1–3: prefill time and decode tokens/s of AT-MoE and its PEFT peers, each ÷ the base model alone."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from atmoe.generation import GenerationSettings, decode
from atmoe.call import use_call

from .timing import interleaved


def random_batch(ctx: Any, batch: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, ctx.vocab, (batch, tokens), generator=gen).to(ctx.device)
    return ids, torch.ones_like(ids)


def prefill_fns(ctx: Any, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, Callable[[], object]]:
    """One full-prompt forward per peer (no KV cache kept, last position's logits only, as a generation prefill)."""
    kw = dict(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
    routed_kw = dict(use_cache=False, logits_to_keep=1)
    m = ctx.atmoe
    fns = {"base": lambda: m.model(**kw), "atmoe": lambda: m.forward_routed(ids, mask, mask, **routed_kw)}
    for name, peer in ctx.peers.items():
        fns[name] = lambda peer=peer: peer(**kw)
    return fns


def _nocache_decode(model: Any, ids: torch.Tensor, mask: torch.Tensor, n: int) -> None:
    """Greedy decoding re-running the whole sequence every step: X-LoRA refuses a KV cache."""
    for _ in range(n):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)


def decode_fns(ctx: Any, ids: torch.Tensor, mask: torch.Tensor, new_tokens: int, with_xlora: bool
               ) -> dict[str, Callable[[], object]]:
    """Prefill then `new_tokens` greedy steps with atmoe's decode loop (no EOS, so every peer makes them all)."""
    settings = GenerationSettings(max_new_tokens=new_tokens)
    m = ctx.atmoe

    def run(forward: Callable[..., Any]) -> None:
        for _ in decode(forward, ids, mask, settings, eos_ids=set(), pad_id=0):
            pass

    def routed(merge: bool = False) -> None:
        call = m.new_call(mask, merge=merge)  # routed once on the prompt, the weights reused by every step

        def forward(**kw: Any) -> Any:
            with use_call(call):
                return m.model(**kw, logits_to_keep=1)
        run(forward)

    fns = {"base": lambda: run(lambda **kw: m.model(**kw, logits_to_keep=1)), "atmoe": routed}
    if ids.shape[0] == 1:
        fns["atmoe_merged"] = lambda: routed(merge=True)
    for name, peer in ctx.peers.items():
        if name == "xlora":
            if with_xlora:
                fns[name] = lambda peer=peer: _nocache_decode(peer, ids, mask, new_tokens)
        else:
            fns[name] = lambda peer=peer: run(lambda **kw: peer(**kw, logits_to_keep=1))
    return fns


def _probe(fns: dict[str, Callable[[], object]], errors: dict[str, str]) -> dict[str, Callable[[], object]]:
    """Call every peer once; a peer that fails is recorded with its exact error and left out of the timing."""
    ok = {}
    for name, fn in fns.items():
        try:
            fn()
            ok[name] = fn
        except Exception as e:
            if name in ("base", "atmoe"):
                raise
            errors[name] = f"{type(e).__name__}: {e}"
    return ok


def prefill(ctx: Any) -> dict:
    cfg, rows, errors = ctx.cfg, [], {}
    for batch in cfg.prefill_batches:
        for tokens in cfg.prefill_tokens:
            ids, mask = random_batch(ctx, batch, tokens, seed=tokens + batch)
            with torch.inference_mode():
                fns = _probe(prefill_fns(ctx, ids, mask), errors)
                t = interleaved(fns, warmup=cfg.warmup, repeats=cfg.repeats, device=ctx.device)
            rows.append(dict(tokens=tokens, batch=batch, repeats=cfg.repeats,
                             seconds={p: t.median(p) for p in fns},
                             ratio_vs_base={p: t.ratio(p, "base") for p in fns if p != "base"},
                             atmoe_vs_peer={p: t.ratio("atmoe", p) for p in fns if p not in ("base", "atmoe")}))
            ctx.log(f"prefill T={tokens} B={batch}: " + ", ".join(f"{p} {r:.3f}" for p, r in
                                                              rows[-1]["ratio_vs_base"].items()))
    return dict(rows=rows, errors=errors, unit="seconds per forward; ratio = peer time ÷ base time (lower is better)")


def _decode_row(t: Any, batch: int, new_tokens: int, cfg: Any) -> dict:
    n = batch * new_tokens
    return dict(batch=batch, new_tokens=new_tokens, prompt_tokens=cfg.decode_prompt, repeats=cfg.repeats,
                tokens_per_s={p: n / t.median(p) for p in t.samples},
                # tokens/s ratio peer ÷ base = time(base) ÷ time(peer), paired per round
                ratio_vs_base={p: 1.0 / t.ratio(p, "base") for p in t.samples if p != "base"},
                atmoe_vs_peer={p: 1.0 / t.ratio("atmoe", p) for p in t.samples if p not in ("base", "atmoe")})


def decode_section(ctx: Any) -> dict:
    cfg, rows, errors = ctx.cfg, [], {}
    for batch in cfg.decode_batches:
        ids, mask = random_batch(ctx, batch, cfg.decode_prompt, seed=7 + batch)
        # X-LoRA has no KV cache, so it re-runs the whole sequence per token: timed at batch 1 only.
        with_xlora = batch == 1
        with torch.inference_mode():
            ok = _probe(decode_fns(ctx, ids, mask, 2, with_xlora), errors)  # short probe run
            fns = {p: f for p, f in decode_fns(ctx, ids, mask, cfg.new_tokens, False).items() if p in ok}
            t = interleaved(fns, warmup=cfg.warmup, repeats=cfg.repeats, device=ctx.device)
        rows.append(_decode_row(t, batch, cfg.new_tokens, cfg))
        ctx.log(f"decode B={batch}: " + ", ".join(f"{p} {r:.3f}" for p, r in rows[-1]["ratio_vs_base"].items()))
        if with_xlora and "xlora" in ctx.peers and "xlora" not in errors:
            # X-LoRA re-runs the whole sequence per token: its own shorter run, against base and AT-MoE at that length.
            n = cfg.xlora_new_tokens
            with torch.inference_mode():
                fns = {p: f for p, f in decode_fns(ctx, ids, mask, n, True).items() if p in ("base", "atmoe", "xlora")}
                t = interleaved(fns, warmup=min(cfg.warmup, 1), repeats=cfg.repeats, device=ctx.device)
            rows.append(_decode_row(t, batch, n, cfg))
            ctx.log(f"decode B={batch} n={n}: " + ", ".join(f"{p} {r:.3f}" for p, r in
                                                            rows[-1]["ratio_vs_base"].items()))
    notes = {"timing": "end to end: prefill of the prompt + new_tokens greedy steps with the KV cache "
                       "(atmoe.generation.decode, no EOS); tokens/s counts new tokens of all rows",
             "xlora": "X-LoRA cannot keep a KV cache (XLoraModel requires config.use_cache=False and its generate "
                      "forces it): every step re-runs both of its passes over the whole sequence; timed at batch 1 "
                      "only, in its own row of xlora_new_tokens (with base and AT-MoE at the same length)"}
    return dict(rows=rows, errors=errors, notes=notes,
                unit="new tokens per second; ratio = peer tokens/s ÷ base tokens/s (higher is better)")
