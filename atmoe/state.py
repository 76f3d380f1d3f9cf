"""What a routed forward reads: the model's routing workspace, filled by the call that holds it, and the router step
that runs at the entrance of every decoder layer.

A call (`ATMoE` builds a `RoutingCall`: the router's head, the overrides as tensors, which tokens are read) takes the
workspace under its lock, writes its tensors, runs, reads its records out and releases it. Nothing inside the forward
looks anything up: no context variable, no dict of per-call state, no host sync, no `torch.compiler.disable`, so the
forward is one graph for `torch.compile` and a decode step reads every tensor at the same address (a CUDA graph can
replay it). Concurrent users are served one call at a time per model; each gets exactly its own routing.

Flow of one forward pass (no second pass, KV cache kept):
    decoder layer l pre-hook → read the hidden state entering l (pooled over the instruction) → router head (one GEMM)
    → α, β, w = α·β with the call's overrides (a few elementwise ops) → fold w into the layer's expand Bᵀ
    → the layer's projection groups launch [W0; A] and Bᵀ_scaled (two GEMMs per group)
In sequence routing w is computed once, on the prompt; decode steps only read the folded Bᵀ.
"""

from __future__ import annotations

import threading
from functools import partial
from typing import Any

import torch
from torch import nn

from .router import head_logits, routing_weights

PATHS = ("folded", "rows", "merged", "separate")


class LayerExperts(nn.Module):
    """One decoder layer's expands, stored once as rows of one width X, so that folding the router's weights into
    every Bᵀ of the layer is one multiply: scaled[n] = raw[n] · w[row_expert[n]]."""

    def __init__(self, raw: torch.Tensor, row_expert: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("raw", raw, persistent=False)                  # [N, X]  (B·s)ᵀ rows
        self.register_buffer("scaled", torch.zeros_like(raw), persistent=False)   # [N, X]  (B·s·w)ᵀ of this call
        self.register_buffer("row_expert", row_expert, persistent=False)    # [N]     the expert of each row
        self.__dict__["groups"] = []                                        # ProjectionGroups reading `scaled`

    def fold(self, w: torch.Tensor) -> None:
        """w [1, 1, E] (batch 1, sequence routing) → scaled = raw · w[row_expert] in place (two launches)."""
        torch.mul(self.raw, w.reshape(-1).index_select(0, self.row_expert)[:, None].to(self.raw.dtype),
                  out=self.scaled)


class RoutingState(nn.Module):
    """The model's routing workspace. `active` False (no call holds it): every fused layer is its base layer."""

    def __init__(self, num_layers: int) -> None:
        super().__init__()
        self.layers = nn.ModuleList(LayerExperts(torch.zeros(0, 1), torch.zeros(0, dtype=torch.long))
                                    for _ in range(num_layers))   # filled by fuse_experts
        self.stackable = True                  # False: some base layer must run as it is (offloaded, quantized)
        self.lock = threading.Lock()
        self.owner: int | None = None          # thread id of the call holding the workspace
        self.num_layers = num_layers
        self.clear()

    # -- what the forward reads (written by `install`, cleared by `clear`) --------------------------------------
    def clear(self) -> None:
        self.call: Any = None                   # the RoutingCall holding the workspace
        self.active = False
        self.route_now = False                  # run the routers in this forward (prefill; every step in token mode)
        self.path = "folded"                    # how fused layers apply the weights (PATHS)
        self.token_mode = False
        self.mode = "softmax"
        self.pooling = "mean"
        self.gate_floor = 0.0
        self.plan: dict[str, torch.Tensor] = {}  # the call's tensors (RoutingCall.plan)
        self.weights: list[torch.Tensor | None] = [None] * self.num_layers   # w per layer ("rows", "separate")
        self.records: list[Any] = [None] * self.num_layers                   # what each router read
        self.inputs: dict[int, torch.Tensor] | None = None                   # hidden states (explain)

    def install(self, call: Any, path: str) -> None:
        cfg = call.router.config
        self.call = call
        self.active, self.route_now, self.path = True, True, path
        self.token_mode = call.granularity == "token"
        self.mode, self.pooling, self.gate_floor = cfg.mode, cfg.pooling, call.gate_floor
        self.plan = call.plan
        if not call.records:      # a fresh call (a checkpoint's recompute re-installs one that has run)
            call.weights = [None] * self.num_layers
            call.records = [[] for _ in range(self.num_layers)] if self.token_mode else [None] * self.num_layers
            call.inputs = {} if call.keep_inputs else None
        self.weights, self.records, self.inputs = call.weights, call.records, call.inputs   # the call's own lists

    # -- the router step, at the entrance of decoder layer `layer` -----------------------------------------------
    def route(self, layer: int, hidden: torch.Tensor) -> None:
        if not (self.active and self.route_now):
            return          # not routed, or sequence routing already fixed by the prompt (decode reads the fold)
        plan = self.plan
        if self.inputs is not None:
            self.inputs[layer] = hidden.detach()
        if self.token_mode:
            x = hidden.float()                                                    # [B, T, D] every token reads itself
            self.records[layer].append(x.detach())
        else:
            x = read(hidden, plan, layer, self.pooling)                           # [B, 1, D] or [B, G, D]
            self.records[layer] = x if torch.is_grad_enabled() else x.detach()
        z = head_logits(x, plan["head_weight"][layer], plan["head_bias"][layer], plan["eps_d"],
                        per_group=self.pooling == "attention" and not self.token_mode)   # [B, 1 | T, G, 1+E]
        _, _, w = routing_weights(z, self.mode, plan, layer, self.gate_floor)                  # [B, 1 | T, E]
        if self.path in ("folded", "merged"):
            experts = self.layers[layer]
            experts.fold(w)
            if self.path == "merged":
                for group in experts.groups:
                    group.merge()
        else:
            self.weights[layer] = w


def read(hidden: torch.Tensor, plan: dict[str, torch.Tensor], layer: int, pooling: str) -> torch.Tensor:
    """What the router reads at one layer: hidden [B, T, D] → [B, 1, D] (mean, last: one GEMV with the call's
    pooling weights) or [B, G, D] (attention: each group's softmax over the tokens read)."""
    if pooling != "attention":
        return torch.bmm(plan["pool"], hidden.float())                                   # [B, 1, D]
    # q·RMSNorm(h_t) = (q·h_t)·rsqrt(Σh_t² + εD)·√D, √D folded into the call's query: one GEMM for every group's
    # scores, one batched GEMV for every token's Σh², then the scale and the read mask in one addcmul.
    h = hidden.float()
    B, T, D = h.shape
    tokens = h.reshape(B * T, 1, D)
    rs = torch.baddbmm(plan["eps_d"], tokens, tokens.transpose(1, 2)).rsqrt().view(B, 1, T)   # [B, 1, T]
    scores = torch.addcmul(plan["read_bias"], torch.matmul(plan["query"][layer], h.transpose(1, 2)), rs)  # [B, G, T]
    a = torch.nan_to_num(scores.softmax(-1))               # a row that reads no token weighs nothing
    return torch.bmm(a, h)                                                                  # [B, G, D]


def _route_pre_hook(state: RoutingState, layer: int, module: nn.Module, args: tuple, kwargs: dict) -> None:
    state.route(layer, args[0] if args else kwargs["hidden_states"])


def add_routing_hooks(state: RoutingState, layers: nn.ModuleList) -> None:
    """Route at the entrance of every decoder layer (a forward pre-hook; it does nothing outside a call)."""
    for i, layer in enumerate(layers):
        layer.register_forward_pre_hook(partial(_route_pre_hook, state, i), with_kwargs=True)
