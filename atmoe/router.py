"""The AT-MoE router: at every decoder layer, weights over groups, then weights within each group.

Shape legend:  L layers · G groups · E experts (ordered by group, so each group is a contiguous slice) ·
               D hidden size · B batch · T tokens (token-level mode only; `...` = B or B, T).

    α[l] = softmax(Wg[l]·x / τ)  over groups            (mode "softmax": a shared budget, Σ_g α = 1)
         | sigmoid(Wg[l]·x / τ)  per group              (mode "sigmoid": independent gates in [0, 1])
    β[l] = softmax(We[l]·x / τ)  within each group      (Σ_{e ∈ g} β = 1)
    w[l, e] = α[l, g(e)] · β[l, e]                      (the weight of expert e's LoRA update at layer l)

where x = RMSNorm(pooled hidden state entering layer l), pooled over the instruction's tokens (`reads="instruction"`,
the default) or over the whole prompt (`reads="prompt"`: system text, instruction and input). Pooling "mean" and
"last" give one x shared by every head; pooling "attention" gives each group its own x_g, a softmax-weighted mean
whose weights come from a learnt query per layer and group (a_t = softmax_t(q[l,g]·RMSNorm(h_t))), read by the group's
gate and by its experts' heads. A zero query weighs every token equally, so an attention router starts as exactly
the mean-pooling router it is initialised from, and learns where to look: the task gate on the sentence that names
the task, rather than on the average of a three-sentence instruction.

Reading the instruction is what makes routing a function of the request: the instruction precedes the input, so
under causal attention its hidden states, and hence every routing weight, are the same whatever note follows it.
Mode "flat" is the ablation without groups: one softmax over all experts, reported as α[g] = Σ_{e∈g} w and β = w / α
so that the trace keeps the same shape.

Heads start at zero, so an untrained router gives exactly uniform weights (α = 1/G or 0.5, β = 1/|g|).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from functools import cached_property
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from .layout import GroupLayout
from .load.files import LoadError, atomic_save_safetensors, read_safetensors

MODES = ("softmax", "sigmoid", "flat")
POOLINGS = ("mean", "last", "attention")
READS = ("instruction", "prompt")
GRANULARITIES = ("sequence", "token")
_FORMAT = "atmoe-router-v1"
EPS = 1e-6                          # the RMS norm's epsilon


@dataclass
class RouterConfig:
    """What a router is shaped for, and how it normalises."""

    groups: list[str]
    experts: list[str]
    expert_groups: list[str]           # group of each expert, aligned with `experts`
    num_layers: int
    hidden_size: int
    mode: str = "softmax"              # "softmax" | "sigmoid" | "flat"
    temperature: float = 1.0
    pooling: str = "mean"              # masked mean, the last token read, or a learnt attention per group
    reads: str = "instruction"         # which tokens are pooled: the user's instruction, or the whole prompt
    granularity: str = "sequence"      # "sequence": fixed after the prompt; "token": per token (analysis)
    gate_floor: float = 0.0            # sigmoid: a gate ≤ this is closed (0) when answering; training reads it unfloored
    stay_out: bool = False             # a stay-out head: one decision per request, from the instruction's embeddings
    stay_out_threshold: float = 0.5    # a score at or above it keeps every expert out (`GroupedRouter.stay_out_scores`)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"router mode must be one of {MODES}, got {self.mode!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"router pooling must be one of {POOLINGS}, got {self.pooling!r}")
        if self.reads not in READS:
            raise ValueError(f"router reads must be one of {READS}, got {self.reads!r}")
        if self.granularity not in GRANULARITIES:
            raise ValueError(f"router granularity must be one of {GRANULARITIES}, got {self.granularity!r}")
        if not (isinstance(self.temperature, (int, float)) and self.temperature > 0):
            raise ValueError(f"router temperature must be > 0, got {self.temperature!r}")
        if not (isinstance(self.gate_floor, (int, float)) and 0.0 <= self.gate_floor < 1.0):
            raise ValueError(f"router gate_floor must be in [0, 1), got {self.gate_floor!r}")
        if self.gate_floor and self.mode != "sigmoid":
            raise ValueError(f"router gate_floor needs sigmoid gates (a {self.mode} budget cannot close every group)")
        if not (isinstance(self.stay_out_threshold, (int, float)) and 0.0 < self.stay_out_threshold < 1.0):
            raise ValueError(f"router stay_out_threshold must be in (0, 1), got {self.stay_out_threshold!r}")
        if self.num_layers < 1 or self.hidden_size < 1:
            raise ValueError("router num_layers and hidden_size must be positive")
        GroupLayout(self.groups, self.experts, self.expert_groups)  # raises unless every group has experts, in order

    def check_shape(self, expected: RouterConfig, what: str) -> None:
        """Raise LoadError if this router was made for other layers, hidden size or experts than `expected`."""
        for name in ("num_layers", "hidden_size", "groups", "experts", "expert_groups"):
            got, want = getattr(self, name), getattr(expected, name)
            if got != want:
                raise LoadError(f"{what} was made for {name}={got}, but this model has {want}")

    @cached_property
    def layout(self) -> GroupLayout:
        """The groups and their experts, built once (not a field: the JSON record keeps the three lists)."""
        return GroupLayout(self.groups, self.experts, self.expert_groups)


class GroupedRouter(nn.Module):
    """One small router per decoder layer (an RMS norm and two linear heads), stored stacked over layers."""

    def __init__(self, config: RouterConfig) -> None:
        super().__init__()
        self.config = config
        L, D, G, E = config.num_layers, config.hidden_size, len(config.groups), len(config.experts)
        self.norm_weight = nn.Parameter(torch.ones(L, D))
        self.group_weight = nn.Parameter(torch.zeros(L, G, D))
        self.group_bias = nn.Parameter(torch.zeros(L, G))
        self.expert_weight = nn.Parameter(torch.zeros(L, E, D))
        self.expert_bias = nn.Parameter(torch.zeros(L, E))
        if config.pooling == "attention":
            self.query = nn.Parameter(torch.zeros(L, G, D))   # zero: every token weighs the same (mean pooling)
        if config.stay_out:   # zero: every request scores 0.5 until trained (`atmoe.train.stay_out`)
            self.stay_weight = nn.Parameter(torch.zeros(D))
            self.stay_bias = nn.Parameter(torch.zeros(()))
        self.layout = config.layout                  # built once: forward reads its slices at every layer
        self.register_buffer("group_index", torch.tensor(self.layout.group_index), persistent=False)
        self.trained = False  # set by training or by loading a checkpoint; reported in every trace

    def pool(self, layer: int, hidden: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """hidden [B, T, D], mask [B, T] (1 on the tokens read) → [B, D] (mean, last) or [B, G, D] (attention)."""
        how = self.config.pooling
        if how != "attention":
            return pool(hidden, mask, how)
        return attention_pool(hidden, mask, self.query[layer])

    def stay_out_scores(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The stay-out head: embeddings [B, T, D] of the prompt's tokens (the model's input embeddings, before any
        decoder layer), mask [B, T] (1 on the tokens the router reads) → [B] scores in [0, 1]. At or above
        `stay_out_threshold` the request is judged outside every expert's skill and every expert weight of the call
        is 0 (overrides still apply). A logistic read of the tokens' mean: a learnt attention over them did no
        better on the demo's wording-shifted validation rows (docs/abstention.md). One decision per request, made
        before the first layer, so a kept-out answer is the base model's exactly; the gates decide everything else,
        as trained for composition."""
        return self.stay_out_read(self.stay_out_features(embeddings, mask))

    def stay_out_features(self, embeddings: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """What the head reads: the mean of the RMS-normed tokens under `mask`, [B, T, D] → [B, D]."""
        h = embeddings.float()
        return pool(h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS), mask, "mean")

    def stay_out_read(self, features: torch.Tensor) -> torch.Tensor:
        """[B, D] features → [B] scores: the head's only learnt part, a logistic read."""
        return torch.sigmoid(features @ self.stay_weight + self.stay_bias)

    def per_token(self, hidden: torch.Tensor) -> torch.Tensor:
        """Token granularity: each token read on its own, [B, T, D] → what `logits` takes ([B, T, G, D] for an
        attention router: every group reads the token itself)."""
        if self.config.pooling != "attention":
            return hidden
        return hidden.unsqueeze(-2).expand(*hidden.shape[:-1], len(self.config.groups), hidden.shape[-1])

    def logits(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hidden [..., D] (pooled: `pool`, or one token: `per_token`), or [..., G, D] with attention pooling (one
        vector per group) → group logits [..., G], expert logits [..., E], before either normalisation
        (`atmoe.explain` splits them into per-token contributions)."""
        tau = self.config.temperature
        x = hidden.float()
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * self.norm_weight[layer]
        if self.config.pooling == "attention":
            group_logits = (x * self.group_weight[layer]).sum(-1) + self.group_bias[layer]            # [..., G]
            x_e = x[..., self.group_index, :]                                                       # [..., E, D]
            expert_logits = (x_e * self.expert_weight[layer]).sum(-1) + self.expert_bias[layer]    # [..., E]
            return group_logits / tau, expert_logits / tau
        group_logits = F.linear(x, self.group_weight[layer], self.group_bias[layer]) / tau    # [..., G]
        expert_logits = F.linear(x, self.expert_weight[layer], self.expert_bias[layer]) / tau  # [..., E]
        return group_logits, expert_logits

    def forward(self, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """hidden [..., D] or [..., G, D] (pooled; see `logits`) → α [..., G], β [..., E], fallback [...] (bool:
        non-finite input → uniform)."""
        cfg, slices = self.config, self.layout.slices
        group_logits, expert_logits = self.logits(layer, hidden)

        if cfg.mode == "flat":
            w = expert_logits.softmax(-1)                                                      # one softmax over E
            group_weights = torch.stack([w[..., s].sum(-1) for s in slices], -1)              # α[g] = Σ_{e∈g} w
            within_group_weights = w / group_weights[..., self.group_index].clamp(min=1e-30)
        else:
            if cfg.mode == "softmax":
                group_weights = group_logits.softmax(-1)                                      # Σ_g α = 1
            else:
                group_weights = close_gates(group_logits.sigmoid(), cfg.gate_floor)           # gates in [0, 1]
            within_group_weights = torch.cat(
                [expert_logits[..., s].softmax(-1) for s in slices], -1)                      # Σ_{e∈g} β = 1

        # Numerics guard: a non-finite hidden state (e.g. a half-precision overflow) must never produce NaN weights.
        fallback = ~(torch.isfinite(group_weights).all(-1) & torch.isfinite(within_group_weights).all(-1))
        if fallback.any():
            a0, b0 = self.uniform(group_weights.shape[:-1], group_weights.device)
            group_weights = torch.where(fallback[..., None], a0, group_weights)
            within_group_weights = torch.where(fallback[..., None], b0, within_group_weights)
        return group_weights, within_group_weights, fallback

    def uniform(self, batch_shape: torch.Size, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The untrained router's weights: α = 1/G (softmax, flat) or 0.5 (sigmoid), β = 1/|group|."""
        cfg = self.config
        G = len(cfg.groups)
        alpha = torch.full((G,), 0.5 if cfg.mode == "sigmoid" else 1.0 / G, device=device)
        sizes = torch.tensor(self.layout.sizes, device=device, dtype=torch.float)   # [G]
        if cfg.mode == "flat":
            alpha = sizes / sizes.sum()
        beta = 1.0 / sizes[self.group_index.to(device)]                              # [E]
        return alpha.expand(*batch_shape, G), beta.expand(*batch_shape, len(cfg.experts))


def pool(hidden: torch.Tensor, mask: torch.Tensor, how: str) -> torch.Tensor:
    """hidden [B, T, D], mask [B, T] → [B, D]: masked mean over the tokens read, or the last of them."""
    mask = mask.to(hidden.device, torch.float32)
    if how == "last":
        positions = torch.arange(mask.shape[1], device=hidden.device)
        last = (mask * positions).argmax(-1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last].float()
    # mask-weighted sum as one batched GEMV ([B, 1, T] @ [B, T, D]): no [B, T, D] temporary
    return torch.bmm(mask[:, None, :], hidden.float()).squeeze(1) / mask.sum(1, keepdim=True).clamp(min=1.0)


def attention_weights(hidden: torch.Tensor, mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """hidden [B, T, D], mask [B, T], query [G, D] → a [B, G, T]: softmax over the tokens read of q_g·RMSNorm(h_t)
    (a zero query: equal weights, the masked mean). A row that reads no token weighs nothing."""
    h = hidden.float()
    h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + EPS)
    scores = torch.einsum("btd,gd->bgt", h, query.float())
    read = mask.to(hidden.device).bool()[:, None, :]
    a = scores.masked_fill(~read, float("-inf")).softmax(-1)
    return torch.where(read.any(-1, keepdim=True), a, torch.zeros_like(a))


def attention_pool(hidden: torch.Tensor, mask: torch.Tensor, query: torch.Tensor) -> torch.Tensor:
    """[B, T, D] → [B, G, D]: each group's attention-weighted mean of the hidden states read."""
    return torch.bmm(attention_weights(hidden, mask, query), hidden.float())


def effective_weights(router: GroupedRouter, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """w = α[g(e)] · β[e]   ([..., G], [..., E] → [..., E])."""
    return alpha[..., router.group_index.to(alpha.device)] * beta


def save_router(router: GroupedRouter, path: str | Path) -> Path:
    """One safetensors file; the JSON config travels in its header, so weights and config can never disagree."""
    metadata = {"format": _FORMAT, "config": json.dumps(asdict(router.config)), "trained": json.dumps(router.trained)}
    return atomic_save_safetensors(dict(router.state_dict()), path, metadata)


def load_router(path: str | Path, expected: RouterConfig | None = None) -> GroupedRouter:
    """Load a router checkpoint; with `expected`, refuse one made for other experts, layers or hidden size."""
    tensors, metadata = read_safetensors(path, "router checkpoint")
    if metadata.get("format") != _FORMAT:
        raise LoadError(f"router checkpoint {path} is not an atmoe router (format {metadata.get('format')!r})")
    try:
        config = RouterConfig(**json.loads(metadata["config"]))
    except (KeyError, TypeError, ValueError) as e:
        raise LoadError(f"router checkpoint {path} has an invalid config: {e}") from None
    if expected is not None:
        config.check_shape(expected, f"router checkpoint {path}")
    router = GroupedRouter(config)
    own = router.state_dict()
    if set(tensors) != set(own):
        raise LoadError(f"router checkpoint {path} has tensors {sorted(tensors)}, expected {sorted(own)}")
    for k, t in tensors.items():
        if t.shape != own[k].shape:
            raise LoadError(f"router checkpoint {path}: '{k}' has shape {tuple(t.shape)}, expected {tuple(own[k].shape)}")
    router.load_state_dict(tensors)
    router.trained = bool(json.loads(metadata.get("trained", "true")))
    return router.requires_grad_(False)




# ---------------------------------------------------------------------------------------------------------------------
# The routed forward's router (what `state.RoutingState.route` runs at every layer): the same functions as above,
# arranged so that a layer costs one GEMM for both heads and a short elementwise chain, with no Python loop over groups.
#
#   z[g, 0]     = group g's gate logit                                  (Wg·x / τ + bg / τ)
#   z[g, 1 + e] = expert e's logit where e ∈ g, −inf elsewhere          (We·x / τ + be / τ)
# so a softmax along a row of z[:, 1:] is the within-group softmax, and w = α @ β is one small matmul.

def inference_head(router: GroupedRouter) -> tuple[torch.Tensor, torch.Tensor]:
    """The router's heads as one weight [L, G, 1+E, D] and bias [L, G, 1+E] in the layout above, with the RMS norm's
    gain, 1/τ and √D folded in (the norm's scale is applied to the logits: `head_logits`). Differentiable in the
    router's parameters (training reads the same head)."""
    cfg = router.config
    L, D, G, E = cfg.num_layers, cfg.hidden_size, len(cfg.groups), len(cfg.experts)
    member = (router.group_index[None, :] == torch.arange(G, device=router.group_index.device)[:, None])   # [G, E]
    gain = router.norm_weight * (D ** 0.5 / cfg.temperature)                                       # [L, D]
    gates = router.group_weight * gain[:, None]                                                   # [L, G, D]
    if cfg.mode == "flat":       # the flat router has no gates: α comes from its experts' logits
        gates = torch.zeros_like(gates)
    experts = (router.expert_weight * gain[:, None])[:, None] * member[None, :, :, None]            # [L, G, E, D]
    weight = torch.cat([gates[:, :, None], experts], 2)                                           # [L, G, 1+E, D]
    gate_bias = router.group_bias / cfg.temperature if cfg.mode != "flat" else torch.zeros_like(router.group_bias)
    expert_bias = torch.where(member[None], (router.expert_bias / cfg.temperature)[:, None, :], float("-inf"))
    return weight, torch.cat([gate_bias[..., None], expert_bias], -1)                               # [L, G, 1+E]


def head_logits(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, eps_d: torch.Tensor,
                per_group: bool = False) -> torch.Tensor:
    """What the router read, x [B, N, D] (one vector per row, or per token) or [B, G, D] (`per_group`: attention
    pooling) → z [B, N | 1, G, 1+E]. RMSNorm(x)·w = (x·w)·rsqrt(Σx² + εD)·√D; √D and the gain live in `weight`."""
    B, N, D = x.shape
    flat = x.reshape(B * N, 1, D)
    rs = torch.baddbmm(eps_d, flat, flat.transpose(1, 2)).rsqrt().view(B, N, 1)    # [B, N, 1]  Σx² + εD, one GEMV
    G, H = weight.shape[0], weight.shape[1]
    if per_group:                                                                     # group g reads its own x_g
        z = torch.bmm(x.transpose(0, 1), weight.transpose(1, 2)).transpose(0, 1)      # [B, G, 1+E]
        return torch.addcmul(bias, z, rs).unsqueeze(1)                                # [B, 1, G, 1+E]
    z = torch.matmul(x, weight.reshape(G * H, D).t())                                 # [B, N, G·(1+E)] one GEMM
    return torch.addcmul(bias.reshape(G * H), z, rs).view(B, N, G, H)


def close_gates(alpha: torch.Tensor, floor: float) -> torch.Tensor:
    """Sigmoid gates at or below `floor` read as exactly 0, so a group the router keeps out adds nothing: with every
    gate under it the answer is that of every expert disabled, token for token (`RouterConfig.gate_floor`). One op,
    none at 0."""
    return torch.threshold(alpha, floor, 0.0) if floor > 0 else alpha


def routing_weights(z: torch.Tensor, mode: str, plan: dict[str, torch.Tensor] | None = None, layer: int = 0,
                    gate_floor: float = 0.0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """z [..., G, 1+E] → α [..., G], β [..., G, E] (row g: group g's experts, 0 elsewhere), w [..., E].

    With a `plan` (a call's overrides as tensors, `overrides.CompiledOverrides.tensors`), a stay-out decision
    (`plan["engaged"]`) scales the router's α first, then fixed weights are applied
    as α ← α·rest + value and β ← β·rest + value; the −inf masks that make the free members share the rest are in
    the plan's head bias already (and, for the flat router, in `expert_mask`)."""
    gate, expert = z[..., 0], z[..., 1:]
    if mode == "flat":                   # α[g] = Σ_{e∈g} softmax_E: a softmax over the groups' log-sum-exps
        alpha = (expert.logsumexp(-1) + gate).softmax(-1)
        if plan is not None:
            expert = expert + plan["expert_mask"][layer]
    elif mode == "softmax":
        alpha = gate.softmax(-1)                                                   # Σ_g α = 1
    else:
        alpha = close_gates(gate.sigmoid(), gate_floor)                            # gates in [0, 1]
    beta = expert.softmax(-1)                                                      # Σ_{e∈g} β = 1
    if plan is not None and "engaged" in plan:          # the stay-out head's decision, [B, 1, 1]: 0 keeps all out
        alpha = alpha * plan["engaged"]
    if plan is not None:
        alpha = torch.addcmul(plan["alpha_value"][layer], alpha, plan["alpha_rest"][layer])
        beta = torch.addcmul(plan["beta_value"][layer], beta, plan["beta_rest"][layer])
    w = torch.matmul(alpha.unsqueeze(-2), beta).squeeze(-2)                         # w[e] = α[g(e)]·β[e]
    return alpha, beta, w

__all__ = ["GroupedRouter", "RouterConfig", "attention_pool", "close_gates", "attention_weights", "effective_weights", "head_logits", "inference_head", "load_router",
           "pool", "routing_weights", "save_router"]
