"""The fused expert layer: one base Linear/Conv1D plus every expert's LoRA pair, stacked.

    y = W0·x + Σ_e w[l, e] · s_e · B_e(A_e(x))
      = W0·x + B_cat( (A_cat·x) ⊙ scale ),      scale[r] = w[l, e(r)] · s_{e(r)}

Shape legend: R = Σ_e r_e (total rank of the experts that target this module), I in, O out features.
Two matmuls whatever the number of experts. The weights w arrive per call through `call.current_call()`;
outside a routed call the layer is exactly the base layer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .call import current_call


class FusedLoRA(nn.Module):
    """Wraps `base_layer` (never subclasses it), so it works on any loaded Hugging Face model."""

    def __init__(self, base_layer: nn.Module, layer_idx: int, lora_A: torch.Tensor, lora_B: torch.Tensor,
                 rank_expert: torch.Tensor, rank_scale: torch.Tensor) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.layer_idx = layer_idx
        # Experts are frozen data, not parameters: buffers follow .to() and stay out of optimisers.
        self.register_buffer("lora_A", lora_A, persistent=False)          # [R, I]
        self.register_buffer("lora_B", lora_B, persistent=False)          # [O, R]
        self.register_buffer("rank_expert", rank_expert, persistent=False)  # [R] expert index of each rank
        self.register_buffer("rank_scale", rank_scale, persistent=False)    # [R] s_e of each rank

    def unfreeze_experts(self) -> tuple[nn.Parameter, nn.Parameter]:
        """Co-adaptation: the stacked pairs become trainable parameters of this layer, still split by `rank_expert`
        (so `expert_pair` reads each expert back out)."""
        for name in ("lora_A", "lora_B"):
            if not isinstance(getattr(self, name), nn.Parameter):
                setattr(self, name, nn.Parameter(self._buffers.pop(name).detach().clone()))
        return self.lora_A, self.lora_B

    def expert_pair(self, expert: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Expert `expert`'s (A [r, I], B [O, r]) in this module, or None where it targets no rank here."""
        rows = self.rank_expert == expert
        if not bool(rows.any()):
            return None
        return self.lora_A.detach()[rows], self.lora_B.detach()[:, rows]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        kind, factor = self._factor(x.dtype)
        if kind == "base":
            return self.base_layer(x)
        if kind == "merged":                                        # W0 + Σ w·s·B·A: this call's own copy
            return F.linear(x, factor, self.base_layer.bias)
        # factor = the per-rank scale w[e(r)]·s_e: [B, 1, R] (sequence mode) or [B, T, R] (token mode)
        return self._add_delta(self.base_layer(x), F.linear(x, self.lora_A) * factor)

    @torch.compiler.disable
    def _factor(self, dtype: torch.dtype) -> tuple[str, torch.Tensor | None]:
        """This call's factor for this module (outside any compiled graph: overrides only ever change its values)."""
        call = current_call()
        if call is None:
            return "base", None
        if call.granularity == "token":
            w = call.weights[self.layer_idx]                                     # [B, T, E]
            return "scale", (w[..., self.rank_expert] * self.rank_scale).to(dtype)   # [B, T, R]
        # Sequence mode: w is fixed for the whole call, so the factor is prepared once and reused by every decode step.
        prepared = call.prepared.get(self)
        if prepared is None:
            prepared = call.prepared[self] = self._prepare(call.weights[self.layer_idx], dtype, call.merge)
        return prepared

    def _add_delta(self, out: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
        """out + h·Bᵀ, accumulated into `out` by the GEMM itself (no extra [.., O] tensor, no separate add)."""
        if torch.is_autocast_enabled(out.device.type):  # mixed dtypes: autocast picks the GEMM's, out of place
            return out + F.linear(h, self.lora_B)
        return out.reshape(-1, out.shape[-1]).addmm_(h.reshape(-1, h.shape[-1]), self.lora_B.t()).view(out.shape)

    def _prepare(self, w: torch.Tensor, dtype: torch.dtype, merge: bool = False) -> tuple[str, torch.Tensor]:
        """w [B, E] → ("scale", [B, 1, R]) with scale[r] = w[e(r)]·s_e — a few bytes per call; nothing the size of
        an expert is copied (a folded copy of A per call would cost the experts' A bytes again and, being fresh
        memory each call, ~15 ms of page faults in a 64-token SmolLM2 prefill). With `merge` (batch 1, Linear
        base): ("merged", [O, I]), the weighted experts merged into a copy of the base weight."""
        scale = (w[..., self.rank_expert] * self.rank_scale).to(dtype)    # [B, R]
        if merge and scale.shape[0] == 1 and isinstance(self.base_layer, nn.Linear):
            return "merged", torch.addmm(self.base_layer.weight, self.lora_B, self.lora_A * scale[0, :, None])
        return "scale", scale[:, None, :]

    def extra_repr(self) -> str:
        return f"layer={self.layer_idx}, rank={self.lora_A.shape[0]}, experts={int(self.rank_expert.unique().numel())}"
