"""Per-call routing state (`RoutingCall`), and the hook that routes at the entrance of every decoder layer.

Nothing about a request is stored on the (shared) model: a `RoutingCall` lives in a `ContextVar` for the duration of
one forward call, so threads serving different users with different overrides never see each other's weights.

Flow of one forward pass (no second pass, KV cache kept):
    decoder layer l pre-hook → pool hidden state entering l over the tokens read → router(l) → overrides → w[l]
    → the layer's FusedLoRA modules read w[l] from the call.
In sequence mode w[l] is computed once, on the prompt, and reused for every generated token.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from functools import partial

import torch
from torch import nn

from .overrides import CompiledOverrides
from .router import GroupedRouter, effective_weights

_CURRENT: ContextVar[RoutingCall | None] = ContextVar("atmoe_routing_call", default=None)


@dataclass
class LayerRecord:
    """What one layer decided, for the trace. Sequence mode: [B, ·]; token mode: [B, T, ·] (concatenated steps)."""

    router_alpha: list[torch.Tensor] = field(default_factory=list)
    router_beta: list[torch.Tensor] = field(default_factory=list)
    alpha: list[torch.Tensor] = field(default_factory=list)
    beta: list[torch.Tensor] = field(default_factory=list)
    fallback: list[torch.Tensor] = field(default_factory=list)


@dataclass
class RoutingCall:
    """The routing state of one call: made by `ATMoE.new_call`, current inside `use_call`, dropped afterwards."""

    router: GroupedRouter
    prompt_mask: torch.Tensor                    # [B, T] 1 on the tokens the router pools over (RouterConfig.reads)
    granularity: str = "sequence"
    overrides: CompiledOverrides | None = None
    merge: bool = False   # batch 1: fold the weighted experts into a per-call copy of each base weight (decode speed)
    weights: dict[int, torch.Tensor] = field(default_factory=dict)   # layer → w [B, E] or [B, T, E]
    records: dict[int, LayerRecord] = field(default_factory=dict)
    prepared: dict[object, tuple[str, torch.Tensor]] = field(default_factory=dict)  # FusedLoRA → (kind, factor)
    inputs: dict[int, torch.Tensor] | None = None  # layer → hidden state entering it [B, T, D], kept if a dict

    def stacked(self, name: str) -> torch.Tensor:
        """What every layer recorded under `name` (router_alpha, router_beta, alpha, beta or fallback), stacked over
        layers: [L, B, ·] in sequence mode, [L, B, T, ·] in token mode (the steps' tokens in order). The used α, β
        keep the router's autograd graph (training reads them here)."""
        def per_layer(record: LayerRecord) -> torch.Tensor:
            parts = getattr(record, name)
            return torch.cat(parts, dim=1) if self.granularity == "token" else parts[0]

        return torch.stack([per_layer(self.records[l]) for l in range(len(self.records))])


def current_call() -> RoutingCall | None:
    return _CURRENT.get()


@contextmanager
def use_call(call: RoutingCall) -> Iterator[RoutingCall]:
    token = _CURRENT.set(call)
    try:
        yield call
    finally:
        _CURRENT.reset(token)


def checkpoint_context() -> tuple[object, object]:
    """`context_fn` for torch's non-reentrant checkpoint: the backward recompute of a layer runs outside the call's
    context, so re-enter the same call (its weights carry the router's autograd graph). The recompute starts with
    no prepared factors, so it records exactly the ops of the original forward."""
    call = _CURRENT.get()
    return nullcontext(), (use_call(replace(call, prepared={})) if call is not None else nullcontext())


@torch.compiler.disable
def route_layer(layer: int, hidden: torch.Tensor) -> None:
    """Decoder-layer pre-hook body: compute w[layer] for the current call (no-op outside a call)."""
    call = _CURRENT.get()
    if call is None or (call.granularity == "sequence" and layer in call.weights):
        return  # not routed, or already fixed by the prompt (decode steps reuse it with the KV cache)
    router = call.router
    if call.inputs is not None:
        call.inputs[layer] = hidden.detach()   # what this layer's router reads (atmoe.explain), for this call only
    if call.granularity == "sequence":
        x = router.pool(layer, hidden, call.prompt_mask)                # [B, D] or [B, G, D] (attention)
    else:
        x = router.per_token(hidden)                                     # [B, T, D] ([B, T, G, D] attention)
    alpha, beta, fallback = router(layer, x)   # an untrained router (zero heads) gives exactly uniform weights
    rec = call.records.setdefault(layer, LayerRecord())
    rec.router_alpha.append(alpha.detach())
    rec.router_beta.append(beta.detach())
    rec.fallback.append(fallback.detach())
    if call.overrides is not None:
        alpha, beta = call.overrides.apply(layer, alpha, beta)
    rec.alpha.append(alpha)
    rec.beta.append(beta)
    call.weights[layer] = effective_weights(router, alpha, beta)


def _route_pre_hook(layer: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
    route_layer(layer, args[0] if args else kwargs["hidden_states"])


def add_routing_hooks(layers: nn.ModuleList) -> None:
    """Route at the entrance of every decoder layer (a forward pre-hook; it does nothing outside a call)."""
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(partial(_route_pre_hook, i), with_kwargs=True)
