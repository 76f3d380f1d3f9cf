"""User overrides of the router: fix group or expert weights on a layer range, or disable experts.

Renormalisation rules (applied per layer inside `layers`, after the router and before the experts run):

* Group level, softmax or flat router (α is a budget that sums to 1): fixed groups take their value; the free groups
  share what is left, `1 − Σ fixed`, in proportion to the router's own α. Fixed values summing to more than 1, or
  every group fixed to values that do not sum to 1, are refused.
* Group level, sigmoid router (independent gates): fixed groups take their value; the others keep the router's gate.
* Within a group (β sums to 1 over the group's experts): the same rule as a softmax budget — fixed experts take their
  value and the free ones share the rest in proportion to the router's β. A disabled expert counts as fixed at 0.
* A group whose experts are all disabled is switched off: its β and α are 0 (in softmax mode the other groups share
  the whole budget). Disabling every expert gives the base model.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .layout import GroupLayout

_TOL = 1e-4


@dataclass(frozen=True)
class Overrides:
    """Per-call overrides. `layers=(a, b)` is inclusive; `None` means every layer."""

    groups: Mapping[str, float] = field(default_factory=dict)
    experts: Mapping[str, float] = field(default_factory=dict)
    layers: tuple[int, int] | None = None
    disabled: Sequence[str] = ()

    def __post_init__(self) -> None:
        for kind, values in (("group", self.groups), ("expert", self.experts)):
            if not isinstance(values, Mapping):
                raise ValueError(f"{kind} overrides must be a mapping of name → weight, got {type(values).__name__}")
            for name, v in values.items():
                if not isinstance(name, str):
                    raise ValueError(f"{kind} override names must be strings, got {name!r}")
                if isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ValueError(f"{kind} '{name}': weight must be a number, got {v!r}")
                if not math.isfinite(v) or not 0.0 <= v <= 1.0:
                    raise ValueError(f"{kind} '{name}': weight must be a finite number in [0, 1], got {v!r}")
        if isinstance(self.disabled, str) or not all(isinstance(n, str) for n in self.disabled):
            raise ValueError(f"disabled must be a list of expert names, got {self.disabled!r}")
        if self.layers is not None:
            ok = (isinstance(self.layers, (tuple, list)) and len(self.layers) == 2
                  and all(isinstance(x, int) and not isinstance(x, bool) for x in self.layers))
            if not ok:
                raise ValueError(f"layers must be a pair of integers (first, last), got {self.layers!r}")
            a, b = self.layers
            if a < 0 or b < a:
                raise ValueError(f"layers=({a}, {b}) is not a valid inclusive range (need 0 ≤ first ≤ last)")
        object.__setattr__(self, "groups", dict(self.groups))
        object.__setattr__(self, "experts", dict(self.experts))
        object.__setattr__(self, "disabled", tuple(self.disabled))
        if self.layers is not None:
            object.__setattr__(self, "layers", tuple(self.layers))

    def is_empty(self) -> bool:
        return not (self.groups or self.experts or self.disabled)

    def to_dict(self) -> dict[str, Any]:
        return {"groups": dict(self.groups), "experts": dict(self.experts),
                "layers": list(self.layers) if self.layers is not None else None, "disabled": list(self.disabled)}

    @classmethod
    def from_dict(cls, d: Any) -> Overrides:
        if not isinstance(d, Mapping):
            raise ValueError(f"an override preset must be a JSON object, got {type(d).__name__}")
        unknown = set(d) - {"groups", "experts", "layers", "disabled"}
        if unknown:
            raise ValueError(f"unknown override field(s): {sorted(unknown)}")
        layers = d.get("layers")
        return cls(groups=d.get("groups") or {}, experts=d.get("experts") or {},
                   layers=tuple(layers) if isinstance(layers, list) else layers, disabled=d.get("disabled") or ())


@dataclass(frozen=True)
class CompiledOverrides:
    """Overrides checked against one model and turned into masks (G groups, E experts, L layers)."""

    layer_mask: torch.Tensor   # [L] bool — layers the overrides apply to
    group_fixed: torch.Tensor  # [G] bool
    group_value: torch.Tensor  # [G] float
    expert_fixed: torch.Tensor  # [E] bool (disabled experts are fixed at 0)
    expert_value: torch.Tensor  # [E] float
    group_slices: tuple[slice, ...]
    competitive_groups: bool   # True when α is a budget (softmax/flat), False for sigmoid gates
    source: Overrides          # the user's overrides, as given (the trace keeps them)

    def apply(self, layer: int, alpha: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Router weights α [..., G], β [..., E] at `layer` → the weights actually used."""
        if not bool(self.layer_mask[layer]):
            return alpha, beta
        dev = alpha.device
        beta = torch.cat([_share(beta[..., s], self.expert_fixed[s].to(dev), self.expert_value[s].to(dev))
                          for s in self.group_slices], dim=-1)
        if self.competitive_groups:
            alpha = _share(alpha, self.group_fixed.to(dev), self.group_value.to(dev))
        else:
            alpha = torch.where(self.group_fixed.to(dev), self.group_value.to(dev), alpha)
        return alpha, beta

    def tensors(self, mode: str) -> dict[str, torch.Tensor]:
        """These overrides as the per-layer tensors a routed forward applies (`router.routing_weights`), [L, ...]:

            alpha ← alpha·alpha_rest + alpha_value        beta ← beta·beta_rest + beta_value
            logit_mask [L, G, 1+E]: −inf on the gate of a fixed group (softmax, flat) and on a fixed expert, so that
                                    the free ones share what is left; never a whole row (then rest is 0 instead)
            expert_mask [L, G, E]:  the experts' part of it, applied after α for the flat router

        Outside `layers` every tensor is the identity (rest 1, value 0, mask 0)."""
        G, E = len(self.group_fixed), len(self.expert_fixed)
        member = torch.zeros(G, E, dtype=torch.bool)
        for g, s in enumerate(self.group_slices):
            member[g, s] = True
        if self.competitive_groups:
            rest = (1.0 - self.group_value[self.group_fixed].sum()).clamp(min=0.0)
            alpha_rest = torch.where(self.group_fixed, 0.0, rest)
            gate_mask = self.group_fixed & ~self.group_fixed.all()
        else:
            alpha_rest = (~self.group_fixed).float()
            gate_mask = torch.zeros(G, dtype=torch.bool)
        alpha_value = torch.where(self.group_fixed, self.group_value, 0.0)
        fixed = member & self.expert_fixed[None]                                          # [G, E]
        beta_value = torch.where(fixed, self.expert_value[None], 0.0)
        beta_rest = (1.0 - beta_value.sum(-1, keepdim=True)).clamp(min=0.0)                # [G, 1]
        whole = (fixed.sum(-1, keepdim=True) == member.sum(-1, keepdim=True))            # every expert fixed
        beta_rest = torch.where(whole, 0.0, beta_rest)
        expert_mask = fixed & ~whole
        neg = float("-inf")
        logit_mask = torch.cat([torch.where(gate_mask, neg, 0.0)[:, None],
                                torch.where(expert_mask & (mode != "flat"), neg, 0.0)], -1)   # [G, 1+E]
        on = self.layer_mask
        L = len(on)

        def per_layer(value: torch.Tensor, identity: float) -> torch.Tensor:
            return torch.where(on.view(L, *[1] * value.dim()), value[None], identity)

        return {"alpha_rest": per_layer(alpha_rest, 1.0), "alpha_value": per_layer(alpha_value, 0.0),
                "beta_rest": per_layer(beta_rest, 1.0), "beta_value": per_layer(beta_value, 0.0),
                "logit_mask": per_layer(logit_mask, 0.0),
                "expert_mask": per_layer(torch.where(expert_mask, neg, 0.0), 0.0)}


def _share(weights: torch.Tensor, fixed: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Fixed entries take `value`; free entries share `1 − Σ value[fixed]` in proportion to `weights`."""
    rest = (1.0 - value[fixed].sum()).clamp(min=0.0)
    free = weights * ~fixed
    denom = free.sum(-1, keepdim=True)
    # A free set the router gave no mass at all (only possible after disabling) shares the rest evenly.
    even = (~fixed).float().expand_as(free) / (~fixed).sum().clamp(min=1)
    share = torch.where(denom > 0, free / denom.clamp(min=1e-30), even)
    return torch.where(fixed, value, share * rest)


def compile_overrides(ov: Overrides, *, layout: GroupLayout, num_layers: int, competitive_groups: bool
                      ) -> CompiledOverrides:
    """Check `ov` against a model's names and layers; raise ValueError naming every fault."""
    groups, experts = layout.groups, layout.experts
    for kind, names, known in (("group", ov.groups, groups), ("expert", ov.experts, experts),
                               ("expert", ov.disabled, experts)):
        unknown = [n for n in names if n not in known]
        if unknown:
            shown = ", ".join(repr(n[:40]) for n in unknown[:5]) + (f" and {len(unknown) - 5} more" if len(unknown) > 5
                                                                    else "")
            raise ValueError(f"unknown {kind}(s) {shown}; this model has: {list(known)}")
    if ov.layers is not None and ov.layers[1] >= num_layers:
        raise ValueError(f"layers={ov.layers} is outside the model: it has {num_layers} layers (0–{num_layers - 1})")
    clash = sorted(set(ov.experts) & set(ov.disabled))
    if clash:
        raise ValueError(f"expert(s) {clash} are both fixed and disabled")

    G, E = len(groups), len(experts)
    group_fixed, group_value = torch.zeros(G, dtype=torch.bool), torch.zeros(G)
    expert_fixed, expert_value = torch.zeros(E, dtype=torch.bool), torch.zeros(E)
    for i, e in enumerate(experts):
        if e in ov.experts or e in ov.disabled:
            expert_fixed[i], expert_value[i] = True, float(ov.experts.get(e, 0.0))
    for gi, (g, s) in enumerate(zip(groups, layout.slices)):
        all_disabled = all(e in ov.disabled for e in experts[s])
        fixed_sum = float(expert_value[s].sum())
        if fixed_sum > 1 + _TOL:
            raise ValueError(f"fixed expert weights in group '{g}' sum to {fixed_sum:.3f}; within a group they must "
                             "sum to at most 1")
        if bool(expert_fixed[s].all()) and not all_disabled and abs(fixed_sum - 1) > _TOL:
            raise ValueError(f"every expert of group '{g}' is fixed, so their weights must sum to 1 (got "
                             f"{fixed_sum:.3f}); leave one free, or scale the whole group with its group weight")
        if g in ov.groups:
            group_fixed[gi], group_value[gi] = True, float(ov.groups[g])
        if all_disabled:
            if ov.groups.get(g, 0.0) > 0:
                raise ValueError(f"group '{g}' has every expert disabled but its weight is fixed to {ov.groups[g]}")
            group_fixed[gi], group_value[gi] = True, 0.0
    if competitive_groups:
        total = float(group_value[group_fixed].sum())
        everything_off = bool(group_fixed.all()) and total == 0 and all(e in ov.disabled for e in experts)
        if total > 1 + _TOL:
            raise ValueError(f"fixed group weights sum to {total:.3f}; with a softmax router the groups share a budget "
                             "of 1")
        if bool(group_fixed.all()) and abs(total - 1) > _TOL and not everything_off:
            raise ValueError(f"every group is fixed, so their weights must sum to 1 with a softmax router (got "
                             f"{total:.3f}); leave one group free or use a sigmoid router")
    layer_mask = torch.zeros(num_layers, dtype=torch.bool)
    a, b = ov.layers if ov.layers is not None else (0, num_layers - 1)
    layer_mask[a:b + 1] = True
    return CompiledOverrides(layer_mask, group_fixed, group_value, expert_fixed, expert_value, layout.slices,
                             competitive_groups, ov)


@dataclass(frozen=True)
class ReplayedWeights(CompiledOverrides):
    """Every layer's α [L, G] and within-group β [L, E] fixed, as a routing trace records them: one request's
    routing replayed on another (`replay`). It asks what the experts write for a prompt when routed as for another,
    e.g. a held-out wording answered with the weights of a training wording (docs/facts.md)."""

    alpha: torch.Tensor = None   # type: ignore[assignment]   [L, G]
    beta: torch.Tensor = None    # type: ignore[assignment]   [L, E]

    def apply(self, layer: int, alpha: torch.Tensor, beta: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        dev = alpha.device
        return self.alpha[layer].to(dev).expand_as(alpha), self.beta[layer].to(dev).expand_as(beta)

    def tensors(self, mode: str) -> dict[str, torch.Tensor]:
        L, G = self.alpha.shape
        E = self.beta.shape[1]
        beta_value = torch.zeros(L, G, E)
        for g, s in enumerate(self.group_slices):
            beta_value[:, g, s] = self.beta[:, s]
        return {"alpha_rest": torch.zeros(L, G), "alpha_value": self.alpha.clone(),
                "beta_rest": torch.zeros(L, G, 1), "beta_value": beta_value, "logit_mask": torch.zeros(L, G, 1 + E),
                "expert_mask": torch.zeros(L, G, E)}


def replay(trace: Any, layout: GroupLayout) -> ReplayedWeights:
    """A sequence-mode trace's weights (`RoutingTrace.group_weights`, `expert_weights`) as overrides for another
    call of a model with the same experts (`layout`: `m.layout`) and router mode: that call is routed on every layer
    exactly as the traced one, e.g. `m.generate(other, overrides=replay(tr, m.layout))`."""
    alpha = torch.as_tensor(trace.group_weights, dtype=torch.float32)
    beta = torch.as_tensor(trace.expert_weights, dtype=torch.float32)
    if list(trace.groups) != list(layout.groups) or list(trace.experts) != list(layout.experts):
        raise ValueError("this trace was routed for other groups or experts")
    if alpha.dim() != 2 or beta.shape != (alpha.shape[0], len(layout.experts)):
        raise ValueError(f"a replay needs a sequence trace's [L, G] and [L, E] weights, got {tuple(alpha.shape)} and "
                         f"{tuple(beta.shape)}")
    L, G, E = alpha.shape[0], len(layout.groups), len(layout.experts)
    return ReplayedWeights(torch.ones(L, dtype=torch.bool), torch.ones(G, dtype=torch.bool), torch.zeros(G),
                           torch.ones(E, dtype=torch.bool), torch.zeros(E), layout.slices, trace.mode != "sigmoid",
                           Overrides(), alpha=alpha, beta=beta)


def identity_tensors(num_layers: int, num_groups: int, num_experts: int) -> dict[str, torch.Tensor]:
    """The tensors of no overrides (the same shapes, so a call with overrides runs the very same graph)."""
    L, G, E = num_layers, num_groups, num_experts
    return {"alpha_rest": torch.ones(L, G), "alpha_value": torch.zeros(L, G), "beta_rest": torch.ones(L, G, 1),
            "beta_value": torch.zeros(L, G, E), "logit_mask": torch.zeros(L, G, 1 + E),
            "expert_mask": torch.zeros(L, G, E)}
