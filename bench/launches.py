"""Section "launches": aten ops (≈ kernel launches on a GPU) and host–device syncs per decoder layer, per path.

Counted with a `TorchDispatchMode` that sees every aten op a forward sends (views and allocations excluded: they
launch nothing), inside the model's own forward only (a hook on the outermost module switches counting on and off,
so what a call does before or after — building its plan, the decode loop's argmax — is not counted). Per decoder
layer by the slope method: (count with 6 layers − count with 2 layers) / 4, so per-forward constants (embedding,
final norm, LM head, mask building) cancel. The model: a tiny random Qwen2 shape, 7 rank-8 experts on all 7
projections in 3 groups, a router with random non-zero heads; batch 1, a 48-token prompt.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, Qwen2Config

from atmoe.generation import DecodeBuffers, GenerationSettings, decode

from .inference import forward_fn, routed
from .models import build_atmoe, build_peers, write_experts

LAYERS = (2, 6)
FREE = {"_unsafe_view", "lift_fresh", "empty", "empty_strided", "empty_like", "new_empty", "new_empty_strided",
        "_reshape_alias"}                          # metadata or allocation only: no kernel
SYNCS = {"_local_scalar_dense", "item", "is_nonzero", "nonzero"}
PROMPT = 48
# (path, what it runs): the AT-MoE paths of one routed call, and its peers
PATHS = ("base", "atmoe", "atmoe_merged", "atmoe_override", "atmoe_token", "atmoe_unrouted", "peft_one", "peft_cat",
         "xlora")
OVERRIDE = {"groups": {"g0": 0.5}}                 # one group fixed, every layer


class OpCounter(TorchDispatchMode):
    """Counts ops and syncs per forward of the modules `watch`ed (nested calls count once, in the outer forward)."""

    def __init__(self) -> None:
        super().__init__()
        self.depth = 0
        self.forwards: list[dict[str, int]] = []

    def watch(self, module: torch.nn.Module) -> list[Any]:
        def enter(*_: Any) -> None:
            if self.depth == 0:
                self.forwards.append(dict(ops=0, syncs=0))
            self.depth += 1

        def leave(*_: Any) -> None:
            self.depth -= 1
        return [module.register_forward_pre_hook(enter), module.register_forward_hook(leave, always_call=True)]

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.depth:
            name = func._schema.name.split("::")[-1]
            if func.is_view or name in FREE:
                return out
            rec = self.forwards[-1]
            rec["ops"] += 1
            if name in SYNCS or (name == "index" and _bool_index(args)):
                rec["syncs"] += 1
        return out


def _bool_index(args: tuple) -> bool:
    indices = args[1] if len(args) > 1 else []
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in indices)


def count(module: torch.nn.Module, run: Callable[[], object]) -> list[dict[str, int]]:
    """[{ops, syncs}] of every forward of `module` inside `run()`."""
    counter = OpCounter()
    hooks = counter.watch(module)
    try:
        with torch.inference_mode(), counter:
            run()
    finally:
        for h in hooks:
            h.remove()
    return counter.forwards


def tiny_qwen2(layers: int, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    cfg = Qwen2Config(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
                      tie_word_embeddings=True)
    torch.manual_seed(0)
    with torch.device(device):
        return AutoModelForCausalLM.from_config(cfg, dtype=dtype).eval()


def randomise_router(router: torch.nn.Module, seed: int = 0) -> None:
    """Non-zero heads (an untrained router is all zeros: uniform weights, a degenerate case)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in router.named_parameters():
            if name != "norm_weight":
                p.copy_(torch.randn(p.shape, generator=gen).to(p) * 0.5)


def _decode_counts(module: torch.nn.Module, forward: Callable[..., torch.Tensor], ids: torch.Tensor,
                   mask: torch.Tensor, config: Any) -> list[dict[str, int]]:
    """Prefill + one decode step of atmoe's loop (StaticCache): [prefill, step]."""
    buffers = DecodeBuffers(config, ids.shape[0], 256, ids.device)
    settings = GenerationSettings(max_new_tokens=2)
    return count(module, lambda: [None for _ in decode(forward, ids, mask, settings, set(), 0, buffers)])


def _path_counts(layers: int, device: torch.device, dtype: torch.dtype, tmp: Path, experts_n: int, rank: int
                 ) -> tuple[dict[str, dict[str, dict[str, int]]], dict[str, str]]:
    """{path: {"prefill": {ops, syncs}, "decode": {ops, syncs}}} on a `layers`-layer model; {path: error}."""
    base = tiny_qwen2(layers, device, dtype)
    experts = write_experts(base, tmp / f"L{layers}", experts_n, rank)
    m = build_atmoe(copy.deepcopy(base), None, experts)
    randomise_router(m.router)
    peers, errors = build_peers(base, experts)
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(10, 512, (1, PROMPT), generator=gen).to(device)
    mask = torch.ones_like(ids)
    out: dict[str, dict[str, dict[str, int]]] = {}

    def atmoe(**call: Any) -> list[dict[str, int]]:
        with routed(m, mask, **call) as (forward, _):
            return _decode_counts(m.model, forward, ids, mask, m.model.config)

    runs: dict[str, Callable[[], list[dict[str, int]]]] = {
        "base": lambda: _decode_counts(base, forward_fn(base), ids, mask, base.config),
        "atmoe": lambda: atmoe(),
        "atmoe_merged": lambda: atmoe(merge=True),
        "atmoe_override": lambda: atmoe(overrides=OVERRIDE),
        "atmoe_token": lambda: atmoe(granularity="token"),
        "atmoe_unrouted": lambda: _decode_counts(m.model, forward_fn(m.model), ids, mask, m.model.config)}
    for name in ("peft_one", "peft_cat"):
        if name in peers:
            runs[name] = lambda p=peers[name]: _decode_counts(p, forward_fn(p), ids, mask, base.config)
    if "xlora" in peers:   # no KV cache: a decode step re-runs the sequence, i.e. a prefill one token longer
        runs["xlora"] = lambda p=peers["xlora"]: count(p, lambda: p(input_ids=ids, attention_mask=mask,
                                                                     use_cache=False, logits_to_keep=1))
    for name, run in runs.items():
        try:
            with torch.inference_mode():   # before the call is held: a call made with grad on takes the training path
                forwards = run()
        except Exception as e:   # recorded, never faked
            errors[name] = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
            continue
        out[name] = dict(prefill=forwards[0], **({"decode": forwards[1]} if len(forwards) > 1 else {}))
    return out, errors


def launches(ctx: Any) -> dict:
    cfg = ctx.cfg
    by_layers, errors = {}, {}
    for n in LAYERS:
        by_layers[n], errs = _path_counts(n, ctx.device, ctx.dtype, ctx.tmp / "launches", cfg.experts, cfg.rank)
        errors.update({f"{p} (L={n})": e for p, e in errs.items()})
    lo, hi = (by_layers[n] for n in LAYERS)
    per_layer = {}
    for path in PATHS:
        if path not in lo or path not in hi:
            continue
        per_layer[path] = {phase: {k: (hi[path][phase][k] - lo[path][phase][k]) / (LAYERS[1] - LAYERS[0])
                                   for k in ("ops", "syncs")}
                           for phase in lo[path] if phase in hi[path]}
    base = per_layer["base"]
    added = {p: {phase: v[phase]["ops"] - base[phase]["ops"] for phase in v if phase in base}
             for p, v in per_layer.items() if p != "base"}
    if "atmoe_override" in per_layer:   # what an override adds over the plain routed call
        added["override_over_atmoe"] = {phase: per_layer["atmoe_override"][phase]["ops"]
                                        - per_layer["atmoe"][phase]["ops"] for phase in ("prefill", "decode")}
    line = ", ".join(f"{p} {v['prefill']['ops']:g}/{v.get('decode', {}).get('ops', float('nan')):g}"
                     for p, v in per_layer.items())
    ctx.log(f"launches per layer (prefill/decode ops): {line}")
    return dict(per_layer=per_layer, added_vs_base=added, raw={str(n): v for n, v in by_layers.items()},
                errors=errors, layers=list(LAYERS), prompt_tokens=PROMPT, override=OVERRIDE,
                model="tiny random Qwen2 (hidden 64, 4 heads, 2 KV heads)", experts=cfg.experts, rank=cfg.rank,
                unit="aten ops per decoder layer, views and allocations excluded, inside the model's forward; "
                     "slope (count at 6 layers − count at 2 layers) / 4; syncs = _local_scalar_dense, item, "
                     "is_nonzero, nonzero and boolean-mask index")
