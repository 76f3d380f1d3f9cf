"""Freeze one routing into one standard PEFT LoRA adapter.

In sequence mode the AT-MoE update of a fused module at layer l is a fixed sum once the prompt is routed:

    ΔW = Σ_e w[l, e] · s_e · B_e A_e = B_cat · diag(w[l, e(r)] · s_{e(r)}) · A_cat

so one LoRA with A = A_cat [R, I], B = B_cat · diag(scale) [O, R] and scaling 1 (lora_alpha = r) reproduces it exactly.
R (the stacked rank) differs per module, hence `rank_pattern` / `alpha_pattern` keyed by the full module name.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch
from transformers.pytorch_utils import Conv1D

from ..fused import FusedLoRA
from ..load.files import atomic_directory, atomic_save_safetensors, atomic_write_json

if TYPE_CHECKING:
    from ..model import ATMoE
    from ..trace import RoutingTrace

USES = ("used", "router")


def routing_weights(m: ATMoE, trace: RoutingTrace, use: str = "used") -> np.ndarray:
    """The effective weights w [L, E] of `trace` (after overrides for use="used", the router's own for "router")."""
    if use not in USES:
        raise ValueError(f"use must be one of {USES}, got {use!r}")
    if trace.granularity != "sequence":
        raise ValueError("only a sequence-level routing can be frozen into one adapter (token-level weights change "
                         "at every token); route the prompt with granularity='sequence'")
    if list(trace.experts) != list(m.experts) or trace.num_layers != m.num_layers:
        raise ValueError(f"the trace was made for experts {trace.experts} on {trace.num_layers} layers, this model "
                         f"has {m.experts} on {m.num_layers} layers")
    w = trace.effective_weights if use == "used" else trace.router_effective_weights
    w = np.asarray(w, dtype=np.float64)
    if w.shape != (m.num_layers, len(m.experts)) or not np.isfinite(w).all():
        raise ValueError(f"trace weights have shape {w.shape} or non-finite values; expected finite "
                         f"[{m.num_layers}, {len(m.experts)}]")
    return w


def export_adapter(m: ATMoE, trace: RoutingTrace, out_dir: str | Path, *, use: str = "used") -> Path:
    """Write `out_dir` (atomically) as a PEFT LoRA adapter equal to `m` routed as in `trace`. Returns `out_dir`."""
    w = torch.as_tensor(routing_weights(m, trace, use))                     # [L, E]
    names = {module: name for name, module in m.model.named_modules() if isinstance(module, FusedLoRA)}
    tensors: dict[str, torch.Tensor] = {}
    ranks: dict[str, int] = {}
    conv1d = set()
    for module, name in sorted(names.items(), key=lambda kv: kv[1]):
        if module.lora_A.shape[0] == 0:   # a projection fused only to launch with its siblings: no expert here
            continue
        scale = w[module.layer_idx].to(module.rank_expert.device)[module.rank_expert]  # [R]  (lora_B holds B·s)
        A = module.lora_A.double()                                          # [R, I]
        B = (module.lora_B.double() * scale[None, :].to(module.lora_B.device)).contiguous()  # [O, R]
        dtype = module.lora_A.dtype
        tensors[f"base_model.model.{name}.lora_A.weight"] = A.to(dtype).cpu()
        tensors[f"base_model.model.{name}.lora_B.weight"] = B.to(dtype).cpu()
        ranks[name] = int(A.shape[0])
        if isinstance(module.base_layer, Conv1D):
            conv1d.add(name)
    if not ranks:
        raise ValueError("this model has no fused expert modules to export")
    if conv1d and len(conv1d) != len(ranks):
        raise ValueError("cannot export a model that mixes Conv1D and Linear expert modules into one PEFT adapter")
    r = max(ranks.values())
    # Keys of rank/alpha patterns are regexes in PEFT: escape the dots so each names exactly one module.
    patterns = {re.escape(name): rank for name, rank in ranks.items()}
    config = {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": _base_name(m),
        "r": r, "lora_alpha": r, "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
        "fan_in_fan_out": bool(conv1d), "init_lora_weights": True, "inference_mode": True,
        "target_modules": sorted(ranks), "rank_pattern": patterns, "alpha_pattern": dict(patterns),
        "modules_to_save": None, "layers_to_transform": None, "layers_pattern": None,
    }
    meta = {"format": "atmoe-frozen-routing-v1", "use": use, "groups": json.dumps(trace.groups),
            "experts": json.dumps(trace.experts), "weights": json.dumps(w.tolist())}
    out_dir = Path(out_dir)
    with atomic_directory(out_dir) as tmp:
        atomic_write_json(tmp / "adapter_config.json", config)
        atomic_save_safetensors(tensors, tmp / "adapter_model.safetensors", metadata=meta)
        atomic_write_json(tmp / "atmoe_routing.json", {"use": use, "overrides": trace.to_dict()["overrides"],
                                                       "groups": trace.groups, "experts": trace.experts,
                                                       "effective_weights": w.tolist()})
    return out_dir


def _base_name(m: ATMoE) -> str | None:
    if m.manifest is not None and m.manifest.base_model:
        return m.manifest.base_model
    return getattr(m.model.config, "_name_or_path", None) or None


__all__ = ["export_adapter", "routing_weights"]
