"""Sections 1–2: prefill time and decode time per token of AT-MoE and its peers, each ÷ the pristine base.

Every peer runs the same code around its forward: one full-prompt forward for a prefill (no KV cache kept, last
position's logits only, as a generation prefill), and atmoe's own decode loop (`atmoe.generation.decode`: StaticCache,
fixed-size mask, greedy, no EOS) for a decode, timed per step after an untimed prefill. AT-MoE's routed calls are held
the way `ATMoE.generate` holds them (`routed`); only X-LoRA, which refuses a KV cache, re-runs the sequence per token.
With `--compile MODE` the pristine base and AT-MoE's default path get compiled twins ("base+compile", "atmoe+compile"):
the prefill compiled with torch.compile's default mode, the decode step with MODE (reduce-overhead: CUDA graphs).
"""

from __future__ import annotations

import inspect
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

from atmoe.generation import DecodeBuffers, GenerationSettings, cache_length, decode

from .timing import interleaved, sync



def random_batch(ctx: Any, batch: int, tokens: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(10, ctx.vocab, (batch, tokens), generator=gen).to(ctx.device)
    return ids, torch.ones_like(ids)


def hf_model(model: Any) -> Any:
    """The transformers model inside a torch.compile or PEFT wrapper (or the model itself)."""
    model = getattr(model, "_orig_mod", model)
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def forward_fn(model: Any) -> Callable[..., torch.Tensor]:
    """`forward(**kw) → logits` of the last position, as `atmoe.generation.decode` calls it (it names the KV cache
    `cache`, the name of transformers ≥ 5.2x; earlier 5.x releases call it `past_key_values`)."""
    params = inspect.signature(hf_model(model).forward).parameters
    name = "cache" if "cache" in params else "past_key_values"

    def forward(**kw: Any) -> torch.Tensor:
        if name != "cache" and "cache" in kw:
            kw[name] = kw.pop("cache")
        return model(**kw, logits_to_keep=1).logits
    return forward


@contextmanager
def routed(m: Any, mask: torch.Tensor, *, merge: bool = False, overrides: Any = None, granularity: str | None = None,
           module: Any = None) -> Iterator[tuple[Callable[..., torch.Tensor], Any]]:
    """Hold one routed call of ATMoE `m` as `ATMoE.generate` does and yield (forward, call): the first forward routes
    on the prompt; later ones (decode steps) read the weights the prompt fixed (sequence routing) or route every
    token (token routing). `module` (default `m.model`): what to call, e.g. its torch.compile'd twin.
    This reaches `ATMoE._hold`: the engine has no public entry that runs routed forwards or decodes from token ids
    without a tokenizer (docs/performance.md, "What the engine's API lacks")."""
    call = m.new_call(mask, overrides=overrides, granularity=granularity, merge=merge)
    run = forward_fn(module if module is not None else m.model)
    with m._hold(call):
        def forward(**kw: Any) -> torch.Tensor:
            logits = run(**kw)
            m.state.route_now = call.granularity == "token"   # as ATMoE.generate: the prompt fixed the routing
            return logits
        yield forward, call


def routed_prefill(m: Any, ids: torch.Tensor, mask: torch.Tensor, module: Any = None, **call: Any) -> torch.Tensor:
    with routed(m, mask, module=module, **call) as (forward, _):
        return forward(input_ids=ids, attention_mask=mask, use_cache=False)


def compiled(ctx: Any, key: str, make: Callable[[], Any]) -> Any:
    """One compiled object per key for the whole run (a fresh torch.compile per call would recompile)."""
    if key not in ctx.compiled:
        ctx.compiled[key] = make()
    return ctx.compiled[key]


def _compile(ctx: Any, fn: Any, mode: str) -> Any:
    return torch.compile(fn, mode=None if mode == "default" else mode, backend=ctx.cfg.compile_backend)


def prefill_fns(ctx: Any, ids: torch.Tensor, mask: torch.Tensor) -> dict[str, Callable[[], object]]:
    kw = dict(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1)
    m = ctx.atmoe
    fns: dict[str, Callable[[], object]] = {
        "base": lambda: ctx.base(**kw),
        "atmoe": lambda: m.forward_routed(ids, mask, mask, use_cache=False, logits_to_keep=1),
        "atmoe_unrouted": lambda: m.model(**kw)}
    if ids.shape[0] == 1:
        fns["atmoe_merged"] = lambda: routed_prefill(m, ids, mask, merge=True)
    for name, peer in ctx.peers.items():
        fns[name] = lambda peer=peer: peer(**kw)
    if ctx.cfg.compile:
        base = compiled(ctx, "prefill/base", lambda: _compile(ctx, ctx.base, "default"))
        model = compiled(ctx, "prefill/atmoe", lambda: _compile(ctx, m.model, "default"))
        fns["base+compile"] = lambda: base(**kw)
        fns["atmoe+compile"] = lambda: routed_prefill(m, ids, mask, module=model)
    return fns


def timed_decode(forward: Callable[..., torch.Tensor], ids: torch.Tensor, mask: torch.Tensor, n: int,
                 buffers: DecodeBuffers, step: Callable[..., torch.Tensor] | None = None) -> float:
    """Prefill (untimed) then the n − 1 decode steps of atmoe's loop: seconds per step (a float: `interleaved` takes
    it as the sample)."""
    tokens = decode(forward, ids, mask, GenerationSettings(max_new_tokens=n), set(), 0, buffers, step=step)
    next(tokens)
    sync(ids.device)
    t0 = time.perf_counter()
    steps = sum(1 for _ in tokens)
    sync(ids.device)
    return (time.perf_counter() - t0) / max(steps, 1)


def _nocache_decode(model: Any, ids: torch.Tensor, mask: torch.Tensor, n: int) -> float:
    """Greedy decoding re-running the whole sequence every step (X-LoRA refuses a KV cache): seconds per token."""
    sync(ids.device)
    t0 = time.perf_counter()
    for _ in range(n):
        logits = model(input_ids=ids, attention_mask=mask, use_cache=False, logits_to_keep=1).logits
        ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], 1)
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
    sync(ids.device)
    return (time.perf_counter() - t0) / n


def decode_fns(ctx: Any, ids: torch.Tensor, mask: torch.Tensor, n: int, with_xlora: bool
               ) -> dict[str, Callable[[], object]]:
    """{peer: fn → seconds per decode step}. Each peer keeps its own DecodeBuffers for the shape (stable addresses)."""
    m, B = ctx.atmoe, ids.shape[0]
    length = cache_length(ids.shape[1] + n)

    def buffers(peer: str, model: Any) -> DecodeBuffers:
        key = (peer, B, length)
        if key not in ctx.decode_buffers:
            ctx.decode_buffers[key] = DecodeBuffers(hf_model(model).config, B, length, ctx.device)
        return ctx.decode_buffers[key]

    def plain(peer: str, model: Any, step: Any = None) -> Callable[[], float]:
        return lambda: timed_decode(forward_fn(model), ids, mask, n, buffers(peer, model), step)

    def atmoe(peer: str, merge: bool, step: Any = None) -> Callable[[], float]:
        def run() -> float:
            with routed(m, mask, merge=merge) as (forward, _):
                return timed_decode(forward, ids, mask, n, buffers(peer, m.model), step)
        return run

    fns = {"base": plain("base", ctx.base), "atmoe": atmoe("atmoe", False),
           "atmoe_unrouted": plain("atmoe_unrouted", m.model)}
    if B == 1:
        fns["atmoe_merged"] = atmoe("atmoe_merged", True)
    for name, peer in ctx.peers.items():
        if name != "xlora":
            fns[name] = plain(name, peer)
        elif with_xlora:
            fns[name] = lambda peer=peer: _nocache_decode(peer, ids, mask, n)
    if ctx.cfg.compile:
        mode = ctx.cfg.compile
        base_step = compiled(ctx, "step/base", lambda: _compile(ctx, forward_fn(ctx.base), mode))
        atmoe_step = compiled(ctx, "step/atmoe", lambda: _compile(ctx, forward_fn(m.model), mode))
        fns["base+compile"] = plain("base+compile", ctx.base, base_step)
        fns["atmoe+compile"] = atmoe("atmoe+compile", False, atmoe_step)
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
            errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return ok


def _paired(t: Any, invert: bool) -> dict[str, dict[str, float]]:
    """Paired medians: peer ÷ base, atmoe ÷ peer, and each compiled twin ÷ the compiled base; `invert` for
    throughput (time(base) ÷ time(peer))."""
    f = (lambda r: 1.0 / r) if invert else (lambda r: r)
    peers = list(t.samples)
    out = dict(ratio_vs_base={p: f(t.ratio(p, "base")) for p in peers if p != "base"},
               atmoe_vs_peer={p: f(t.ratio("atmoe", p)) for p in peers if p not in ("base", "atmoe")})
    if "base+compile" in t.samples:
        out["ratio_vs_compiled_base"] = {p: f(t.ratio(p, "base+compile")) for p in peers
                                         if p.endswith("+compile") and p != "base+compile"}
    return out


def prefill(ctx: Any) -> dict:
    cfg, rows, errors = ctx.cfg, [], {}
    for batch, tokens in ctx.prefill_grid:
        ids, mask = random_batch(ctx, batch, tokens, seed=tokens + batch)
        with torch.inference_mode():
            fns = _probe(prefill_fns(ctx, ids, mask), errors)
            t = interleaved(fns, warmup=cfg.warmup, repeats=cfg.repeats, device=ctx.device)
        rows.append(dict(tokens=tokens, batch=batch, repeats=cfg.repeats,
                         seconds={p: t.median(p) for p in fns}, **_paired(t, invert=False)))
        ctx.log(f"prefill T={tokens} B={batch}: " + ", ".join(f"{p} {r:.3f}" for p, r in
                                                          rows[-1]["ratio_vs_base"].items()))
    return dict(rows=rows, errors=errors,
                unit="seconds per forward; ratio = peer time ÷ pristine base time, median of paired rounds "
                     "(lower is better)")


def _decode_row(t: Any, batch: int, new_tokens: int, cfg: Any) -> dict:
    return dict(batch=batch, new_tokens=new_tokens, prompt_tokens=cfg.decode_prompt, repeats=cfg.repeats,
                seconds_per_token={p: t.median(p) for p in t.samples},
                tokens_per_s={p: batch / t.median(p) for p in t.samples}, **_paired(t, invert=True))


def decode_section(ctx: Any) -> dict:
    cfg, rows, errors = ctx.cfg, [], {}
    for batch in cfg.decode_batches:
        ids, mask = random_batch(ctx, batch, cfg.decode_prompt, seed=7 + batch)
        with_xlora = batch == 1   # X-LoRA re-runs the whole sequence per token: timed at batch 1 only
        with torch.inference_mode():
            ok = _probe(decode_fns(ctx, ids, mask, 2, with_xlora), errors)  # short probe run
            fns = {p: f for p, f in decode_fns(ctx, ids, mask, cfg.new_tokens, False).items() if p in ok}
            t = interleaved(fns, warmup=cfg.warmup, repeats=cfg.repeats, device=ctx.device)
        rows.append(_decode_row(t, batch, cfg.new_tokens, cfg))
        ctx.log(f"decode B={batch}: " + ", ".join(f"{p} {r:.3f}" for p, r in rows[-1]["ratio_vs_base"].items()))
        if with_xlora and "xlora" in ok:
            n = cfg.xlora_new_tokens
            with torch.inference_mode():
                fns = {p: f for p, f in decode_fns(ctx, ids, mask, n, True).items() if p in ("base", "atmoe", "xlora")}
                t = interleaved(fns, warmup=min(cfg.warmup, 1), repeats=cfg.repeats, device=ctx.device)
            rows.append(_decode_row(t, batch, n, cfg))
            ctx.log(f"decode B={batch} n={n}: " + ", ".join(f"{p} {r:.3f}" for p, r in
                                                            rows[-1]["ratio_vs_base"].items()))
    notes = {"timing": "seconds per decode step: the prompt's prefill runs untimed, then the n − 1 steps of "
                       "atmoe.generation.decode (StaticCache, greedy, no EOS) are timed together and divided; every "
                       "peer runs the same loop",
             "xlora": "X-LoRA cannot keep a KV cache (XLoraModel requires config.use_cache=False and its generate "
                      "forces it): every token re-runs both of its passes over the whole sequence; timed at batch 1 "
                      "only, in its own row of xlora_new_tokens (with base and AT-MoE at the same length)"}
    return dict(rows=rows, errors=errors, notes=notes,
                unit="seconds per new token; ratio = peer tokens/s ÷ pristine base tokens/s, median of paired rounds "
                     "(higher is better)")
