"""`RoutingCall`: one call's routing, as values — what the router reads, its head, the overrides as tensors — and,
once the call has run, what each layer's router read, from which the trace and the training losses compute α and β.

A call is made by `ATMoE` (one per route / score / generate), handed to the model's `RoutingState` for the duration
of its forwards (`state.py`), and kept by nobody afterwards: nothing about a request stays on the shared model.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch

from .overrides import CompiledOverrides, identity_tensors
from .router import EPS, GroupedRouter, head_logits, inference_head, routing_weights


@dataclass
class RoutingCall:
    """The routing of one call. `read_mask` [B, T]: 1 on the tokens the router reads (RouterConfig.reads)."""

    router: GroupedRouter
    read_mask: torch.Tensor
    granularity: str = "sequence"
    overrides: CompiledOverrides | None = None
    merge: bool = False       # batch 1, sequence: fold the weighted experts into one weight per group (decode speed)
    keep_inputs: bool = False  # keep the hidden state entering each layer (atmoe.explain)
    gate_floor: float = 0.0    # sigmoid gates at or below it read as 0 (RouterConfig.gate_floor; 0 while training)
    stay_scores: torch.Tensor | None = None   # [B] the stay-out head's scores (`GroupedRouter.stay_out_scores`)
    plan: dict[str, torch.Tensor] = field(default_factory=dict)
    records: list[Any] = field(default_factory=list)       # per layer: what its router read (filled by the run)
    weights: list[torch.Tensor | None] = field(default_factory=list)   # per layer: w [B, 1 | T, E] ("rows", "separate")
    inputs: dict[int, torch.Tensor] | None = None          # per layer: the hidden state entering it (keep_inputs)
    path: str = ""                                          # how the fused layers applied the weights (state.PATHS)

    def __post_init__(self) -> None:
        self.plan = build_plan(self.router, self.overrides, self.read_mask)
        if self.stay_scores is not None:
            out = self.stay_scores >= self.router.config.stay_out_threshold
            self.plan["engaged"] = (~out).float().view(-1, 1, 1)

    @property
    def prompt_mask(self) -> torch.Tensor:   # the name before this release
        return self.read_mask

    def stacked(self, name: str) -> torch.Tensor:
        """What every layer decided, stacked over layers: `router_alpha`, `router_beta` (the router's own), `alpha`,
        `beta` (used, after overrides) or `fallback` (a non-finite input gave uniform weights): [L, B, ·] in sequence
        mode, [L, B, T, ·] in token mode. α and β keep the router's autograd graph (training reads them here)."""
        own = name.startswith("router_")
        alpha, beta, fallback = self._weights(own)
        return {"router_alpha": alpha, "alpha": alpha, "router_beta": beta, "beta": beta, "fallback": fallback}[name]

    def highest_weights(self) -> torch.Tensor:
        """[B, E]: each expert's highest used weight α·β over the layers (and tokens) routed so far. Not cached, so it
        can be read while the call goes on (grounded decoding reads it after the prefill)."""
        alpha, beta, _ = self._compute(own=False)
        w = alpha[..., list(self.router.config.layout.group_index)] * beta                  # [L, B, (T,) E]
        return w.transpose(0, 1).reshape(w.shape[1], -1, w.shape[-1]).amax(1)

    def _weights(self, own: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        key = "own" if own else "used"
        cached = self.__dict__.setdefault("_cache", {})
        if key in cached:
            return cached[key]
        grad = any(t.requires_grad for x in self.records for t in (x if isinstance(x, list) else [x]))
        with torch.enable_grad() if grad else torch.inference_mode():   # training reads them with the graph
            cached[key] = self._compute(own)
        return cached[key]

    def _compute(self, own: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        plan, cfg = self.plan, self.router.config
        per_group = cfg.pooling == "attention" and self.granularity == "sequence"
        alphas, betas, fallbacks = [], [], []
        for layer, x in enumerate(self.records):
            x = torch.cat(x, 1) if isinstance(x, list) else x                       # token mode: the steps in order
            bias = plan["router_bias" if own else "head_bias"][layer]
            z = head_logits(x, plan["head_weight"][layer], bias, plan["eps_d"], per_group)   # [B, N, G, 1+E]
            bad = ~torch.isfinite(x).all(-1)                                        # [B, N] or [B, G]
            bad = bad.any(-1, keepdim=True) if per_group else bad                   # [B, N]
            # A non-finite input reads as the untrained router: zero logits (the masks kept), hence uniform weights.
            empty = torch.where(torch.isfinite(plan["router_bias"][layer]), 0.0, float("-inf"))
            if not own:
                empty = empty + plan["logit_mask"][layer]
            z = torch.where(bad[..., None, None], empty, z)
            a, b, _ = routing_weights(z, cfg.mode, None if own else plan, layer, self.gate_floor)
            alphas.append(a)
            betas.append(b.sum(-2))                                                 # [B, N, E] within-group weights
            fallbacks.append(bad)
        squeeze = (lambda t: t.squeeze(2)) if self.granularity == "sequence" else (lambda t: t)
        return tuple(squeeze(torch.stack(parts)) for parts in (alphas, betas, fallbacks))


def build_plan(router: GroupedRouter, overrides: CompiledOverrides | None, read_mask: torch.Tensor
               ) -> dict[str, torch.Tensor]:
    """The call's tensors, on the router's device: the inference head (overrides' masks in its bias), the override
    tensors, and the pooling weights over the tokens read. Built once per call, outside the forward."""
    cfg = router.config
    device = router.norm_weight.device
    L, G, E = cfg.num_layers, len(cfg.groups), len(cfg.experts)
    weight, bias = inference_head(router)
    ov = overrides.tensors(cfg.mode) if overrides is not None else identity_tensors(L, G, E)
    plan = {k: v.to(device) for k, v in ov.items()}
    mask = read_mask.to(device, torch.float32)                                          # [B, T]
    plan.update(head_weight=weight, router_bias=bias, head_bias=bias + plan["logit_mask"],
                eps_d=torch.tensor(EPS * cfg.hidden_size, device=device))
    if cfg.pooling == "mean":
        plan["pool"] = (mask / mask.sum(1, keepdim=True).clamp(min=1.0))[:, None, :]   # [B, 1, T]
    elif cfg.pooling == "last":
        positions = torch.arange(mask.shape[1], device=device)
        plan["pool"] = torch.nn.functional.one_hot((mask * positions).argmax(-1), mask.shape[1]).float()[:, None]
    else:
        plan["query"] = router.query.float() * cfg.hidden_size ** 0.5                  # [L, G, D]  (√D: state.read)
        plan["read_bias"] = torch.where(mask > 0, 0.0, float("-inf"))[:, None, :]       # [B, 1, T]
    return plan
