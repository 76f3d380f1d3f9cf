"""The fused expert layers: each base projection plus every expert's LoRA pair, launched as few GEMMs as the input allows.

    y = W0·x + Σ_e w[l, e] · s_e · B_e(A_e(x))

Shape legend: I in, O out features of one projection; R = Σ_e r_e the experts' total rank there; a *group* is the
projections of one decoder layer that read the same input (q/k/v; gate/up) and are launched together:
O_g = Σ O, R_g = Σ R over the group's projections.

How a routed forward launches a group (vLLM's merged linear layers and punica shrink/expand, in plain torch):

    [y0 | h] = x · [W0_q; W0_k; W0_v; A_q; A_k; A_v]ᵀ      one GEMM: the base projections and every expert's shrink
    y        = y0 + h · Bᵀ_scaled                           one GEMM: every expand, Bᵀ block-diagonal [R_g, O_g]

`Bᵀ_scaled` holds B·s·w for this call: the router's weights are folded into it once, after the prompt, so a decode
step reads a tensor at a fixed address and adds one GEMM per group (batch 1, sequence routing). Batches with their
own routing per row, and token routing, scale h per row instead; `merge` folds everything into one weight per group.
The base weights are views into the group's stacked weight, so nothing of the base is stored twice, and outside a
routed call each projection is exactly the base layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .state import RoutingState  # noqa: F401  (type of FusedLoRA.state)


class FusedLoRA(nn.Module):
    """Wraps `base_layer` (never subclasses it), so it works on any loaded Hugging Face model. One per projection that
    joins a routed layer; the first projection of its `ProjectionGroup` launches the whole group."""

    def __init__(self, base_layer: nn.Module, layer_idx: int, lora_A: torch.Tensor, lora_B: torch.Tensor,
                 rank_expert: torch.Tensor, rank_scale: torch.Tensor) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layer_idx = layer_idx
        # Experts are frozen data, not parameters: buffers follow .to() and stay out of optimisers. lora_B holds B·s
        # (each rank's scaling folded in); `expert_pair` gives the PEFT pair back.
        self.register_buffer("lora_A", lora_A, persistent=False)             # [R, I]
        self.register_buffer("lora_B", lora_B, persistent=False)             # [O, R]  (B·s)
        self.register_buffer("rank_expert", rank_expert, persistent=False)   # [R] expert index of each rank
        self.register_buffer("rank_scale", rank_scale, persistent=False)     # [R] s_e of each rank
        self._register_state_dict_hook(contiguous_state)   # the pairs are views into the group's stacked tensors
        self.__dict__["state"] = None      # the model's RoutingState (a reference, not a child module)
        self.__dict__["group"] = None      # set by ProjectionGroup
        self.__dict__["member"] = 0

    @property
    def in_features(self) -> int:
        return self.lora_A.shape[1]

    @property
    def out_features(self) -> int:
        return self.lora_B.shape[0]

    def unfreeze_experts(self) -> tuple[nn.Parameter, nn.Parameter]:
        """Co-adaptation: the pairs become trainable parameters (sharing storage with the group's stacked tensors,
        so what the optimiser writes is what the fast path reads), still split by `rank_expert`."""
        for name in ("lora_A", "lora_B"):
            if not isinstance(getattr(self, name), nn.Parameter):
                setattr(self, name, nn.Parameter(self._buffers.pop(name).detach()))
        return self.lora_A, self.lora_B

    def expert_pair(self, expert: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Expert `expert`'s PEFT pair (A [r, I], B [O, r]) in this module, or None where it targets no rank here."""
        rows = (self.rank_expert == expert).nonzero().flatten().tolist()
        if not rows:
            return None
        A, B = self.lora_A.detach()[rows], self.lora_B.detach()[:, rows]
        return A, (B / self.rank_scale[rows].to(B.dtype)).contiguous()

    def delta(self, x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
        """Σ_e w·s·B·A·x with a per-rank scale [..., R] (differentiable: training, offloaded and quantized bases)."""
        return F.linear(F.linear(x, self.lora_A) * scale.to(x.dtype), self.lora_B)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        state = self.state
        if not state.active:
            return self.base_layer(x)
        if state.path == "separate":      # base layer as it is (hooks, quantization, training), LoRA beside it
            w = state.weights[self.layer_idx]
            return self.base_layer(x) + self.delta(x, w[..., self.rank_expert])
        return self.group.output(self.member, x)

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, rank={self.lora_A.shape[0]}"


class ProjectionGroup(nn.Module):
    """Projections of one decoder layer that read the same input, launched together (see the module docstring).

    Holds the stacked weight [O_g + R_g, I] (the members' base weights and A's are views into it), the expand
    Bᵀ [R_g, O_g] (raw: B·s; scaled: B·s·w for this call, a view into the layer's `LayerExperts.scaled`), and the
    merged weight when a call asks for it. The first member to run computes the whole group; the others return
    their slice of it (checked: the same input tensor, else they compute their own)."""

    def __init__(self, state: RoutingState, members: list[FusedLoRA], expand_raw: torch.Tensor,
                 expand_scaled: torch.Tensor) -> None:
        super().__init__()
        self.__dict__["state"] = state
        self.__dict__["members"] = members
        outs = [m.out_features for m in members]
        ranks = [m.lora_A.shape[0] for m in members]
        self.out_offsets = [0, *torch.tensor(outs).cumsum(0).tolist()]
        self.rank_offsets = [0, *torch.tensor(ranks).cumsum(0).tolist()]
        O, R = self.out_offsets[-1], self.rank_offsets[-1]
        base = [m.base_layer for m in members]
        self.register_buffer("stacked", torch.cat([_rows(b).detach() for b in base] + [m.lora_A for m in members]),
                             persistent=False)                                        # [O_g + R_g, I]
        biases = [b.bias.detach() if b.bias is not None else None for b in base]
        if any(b is not None for b in biases):
            full = [b if b is not None else torch.zeros(o, dtype=self.stacked.dtype, device=self.stacked.device)
                    for b, o in zip(biases, outs)]
            self.register_buffer("stacked_bias", torch.cat(full + [self.stacked.new_zeros(R)]), persistent=False)
        else:
            self.stacked_bias = None
        self.register_buffer("expand_raw", expand_raw, persistent=False)         # [R_g, O_g]  (B·s)ᵀ, block-diagonal
        self.register_buffer("expand_scaled", expand_scaled, persistent=False)   # [R_g, O_g]  (B·s·w)ᵀ of this call
        self.register_buffer("rank_expert", torch.cat([m.rank_expert for m in members]), persistent=False)
        self.merged: torch.Tensor | None = None    # [O_g, I], allocated by the first merge call, then rewritten
        self.num_out, self.num_rank = O, R
        for i, (m, b) in enumerate(zip(members, base)):   # the members now read the stacked storage: stored once
            m.__dict__["group"], m.__dict__["member"] = self, i
            rows = self.stacked[self.out_offsets[i]:self.out_offsets[i + 1]]
            b.weight = nn.Parameter(rows if isinstance(b, nn.Linear) else rows.t(), requires_grad=False)
            m.lora_A = self.stacked[O + self.rank_offsets[i]:O + self.rank_offsets[i + 1]]
            m.lora_B = expand_raw[self.rank_offsets[i]:self.rank_offsets[i + 1],
                                  self.out_offsets[i]:self.out_offsets[i + 1]].t()
        self.__dict__["_slot"] = None       # (input, output) of the group's last launch, for the other members

    def merge(self) -> None:
        """W0 + (B·s·w)·A for every member at once, into a buffer kept across calls (a stable address)."""
        O = self.num_out
        if self.merged is None:
            self.merged = torch.empty_like(self.stacked[:O])
        torch.addmm(self.stacked[:O], self.expand_scaled.t(), self.stacked[O:], out=self.merged)

    def output(self, member: int, x: torch.Tensor) -> torch.Tensor:
        slot = self._slot
        if member > 0 and slot is not None and slot[0] is x:
            y = slot[1]
        else:
            y = self._launch(x)
            self.__dict__["_slot"] = (x, y) if len(self.members) > 1 else None
        if member == len(self.members) - 1:
            self.__dict__["_slot"] = None      # the group is done: keep no activation past it
        return y[..., self.out_offsets[member]:self.out_offsets[member + 1]]

    def _launch(self, x: torch.Tensor) -> torch.Tensor:
        """x [..., I] → the group's outputs [..., O_g]."""
        state, O = self.state, self.num_out
        bias = None if self.stacked_bias is None else self.stacked_bias[:O]
        if state.path == "merged":
            return F.linear(x, self.merged, bias)
        y = F.linear(x, self.stacked, self.stacked_bias)               # [..., O_g + R_g] = [y0 | h]
        flat = y.view(-1, y.shape[-1])
        y0, h = flat[:, :O], flat[:, O:]
        if state.path == "folded":                                      # batch 1, sequence: w is inside Bᵀ
            out = torch.addmm(y0, h, self.expand_scaled)
        else:                                                           # "rows": each row (or token) its own w
            w = state.weights[self.members[0].layer_idx]                # [B, 1, E] or [B, T, E]
            s = w[..., self.rank_expert].to(h.dtype)                    # [B, 1 | T, R_g]
            out = torch.addmm(y0, (h.view(*x.shape[:-1], -1) * s).view(h.shape), self.expand_raw)
        return out.view(*x.shape[:-1], O)


def contiguous_state(module: nn.Module, state_dict: dict, prefix: str, local_metadata: dict) -> None:
    """Checkpoints (safetensors) need contiguous tensors; loading copies back into the views in place."""
    for key, value in state_dict.items():
        if key.startswith(prefix) and isinstance(value, torch.Tensor) and not value.is_contiguous():
            state_dict[key] = value.contiguous()


def _rows(base: nn.Module) -> torch.Tensor:
    """A base layer's weight as [O, I] rows (a Conv1D stores [I, O])."""
    return base.weight if isinstance(base, nn.Linear) else base.weight.t()
