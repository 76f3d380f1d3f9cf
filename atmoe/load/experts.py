"""LoRA experts: read PEFT adapters (safetensors only), validate them against the base model's decoder layers, fuse
them in place."""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft.utils.other import get_pattern_key
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..fused import FusedLoRA, ProjectionGroup
from ..state import LayerExperts, RoutingState
from .files import LoadError, atomic_directory, atomic_save_safetensors, atomic_write_json, read_json, read_safetensors

_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<ab>[AB])(?:\.[^.]+)?\.weight$")


@dataclass
class Expert:
    """One validated expert: per targeted module, its LoRA pair and scaling s_e."""

    name: str
    group: str
    description: str = ""
    source: str = ""
    config: dict[str, Any] = field(default_factory=dict)
    # A [r, I], B [O, r], s per module — handed to the fused layers, then released (experts are stored once).
    modules: dict[str, tuple[torch.Tensor, torch.Tensor, float]] = field(default_factory=dict)
    layout: dict[str, tuple[int, int, int, float]] = field(default_factory=dict)  # module → (r, I, O, s), kept
    card: dict[str, Any] = field(default_factory=dict)

    @property
    def rank(self) -> int:
        return max((r for r, *_ in self.layout.values()), default=0)

    @property
    def target_modules(self) -> list[str]:
        return sorted({m.rsplit(".", 1)[-1] for m in self.layout})

    @property
    def num_parameters(self) -> int:
        return sum(r * (i + o) for r, i, o, _ in self.layout.values())


def adapter_files(source: str | Path, name: str) -> Path:
    """A local PEFT folder, or a hub id fetched (safetensors + config only) into the local HF cache."""
    path = Path(source)
    if path.is_dir():
        return path
    if path.exists() or str(source).startswith((".", "/")) or str(source).count("/") != 1:
        raise LoadError(f"expert '{name}': adapter folder not found: {source}")
    try:
        from huggingface_hub import snapshot_download
        return Path(snapshot_download(str(source), allow_patterns=["adapter_config.json", "adapter_model.safetensors",
                                                                   "README.md", "atmoe_expert.json"]))
    except Exception as e:  # network, auth, missing repo: one clear line
        raise LoadError(f"expert '{name}': cannot fetch hub adapter '{source}': {type(e).__name__}: {e}") from None


def read_expert(name: str, group: str, source: str | Path, model: nn.Module, layer_of: dict[str, int],
                description: str = "") -> Expert:
    """Read and validate one adapter against `model`; `layer_of` maps module names to decoder-layer indices."""
    folder = adapter_files(source, name)
    cfg_path, weights_path = folder / "adapter_config.json", folder / "adapter_model.safetensors"
    if not cfg_path.is_file():
        raise LoadError(f"expert '{name}': {folder} has no adapter_config.json (expected a PEFT LoRA adapter folder)")
    if not weights_path.is_file():
        pickled = [p.name for p in folder.glob("*.bin")] + [p.name for p in folder.glob("*.pt")]
        why = f" (found {pickled}: pickle files are refused, convert them to safetensors)" if pickled else ""
        raise LoadError(f"expert '{name}': {folder} has no adapter_model.safetensors{why}")
    config = read_json(cfg_path, f"expert '{name}' config")
    _check_config(name, cfg_path, config)
    tensors, _ = read_safetensors(weights_path, f"expert '{name}' weights")

    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        m = _KEY.match(key)
        if m is None:
            raise LoadError(f"expert '{name}': {weights_path} has tensor '{key}', which is not a LoRA A/B weight "
                            "(only LoRA on Linear/Conv1D layers is supported)")
        pairs.setdefault(m["module"], {})[m["ab"]] = t
    if not pairs:
        raise LoadError(f"expert '{name}': {weights_path} holds no LoRA weights")

    expert = Expert(name, group, description, str(source), config)
    modules = dict(model.named_modules())
    for module_name, ab in sorted(pairs.items()):
        where = f"expert '{name}', module '{module_name}'"
        if set(ab) != {"A", "B"}:
            raise LoadError(f"{where}: has only lora_{''.join(ab)}, expected both lora_A and lora_B")
        base = modules.get(module_name)
        if isinstance(base, FusedLoRA):
            base = base.base_layer
        if base is None:
            raise LoadError(f"{where}: no such module in the base model (was it trained on another base?)")
        if isinstance(base, nn.Linear):
            in_f, out_f = base.in_features, base.out_features
        elif isinstance(base, Conv1D):
            in_f, out_f = base.weight.shape  # Conv1D stores [in, out]
        else:
            raise LoadError(f"{where}: is a {type(base).__name__}; only Linear and Conv1D layers can hold experts")
        if module_name not in layer_of:
            raise LoadError(f"{where}: is not inside a decoder layer, so no router can weight it")
        A, B = ab["A"], ab["B"]
        key = get_pattern_key(list(config.get("rank_pattern") or {}), module_name)
        r = int((config.get("rank_pattern") or {}).get(key, config["r"]))
        if A.shape != (r, in_f) or B.shape != (out_f, r):
            raise LoadError(f"{where}: lora_A {tuple(A.shape)} / lora_B {tuple(B.shape)} do not fit; expected "
                            f"({r}, {in_f}) / ({out_f}, {r}) for rank {r} on a {in_f}→{out_f} layer")
        akey = get_pattern_key(list(config.get("alpha_pattern") or {}), module_name)
        alpha = float((config.get("alpha_pattern") or {}).get(akey, config["lora_alpha"]))
        scale = alpha / math.sqrt(r) if config.get("use_rslora") else alpha / r
        expert.modules[module_name] = (A, B, scale)
        expert.layout[module_name] = (r, in_f, out_f, scale)
    _check_targets(name, config, expert.modules, modules)
    card = folder / "atmoe_expert.json"
    if card.is_file():
        expert.card = read_json(card, f"expert '{name}' card")
    return expert


def _check_config(name: str, path: Path, config: Any) -> None:
    if not isinstance(config, dict):
        raise LoadError(f"expert '{name}': {path} must hold a JSON object")
    if config.get("peft_type", "LORA") != "LORA":
        raise LoadError(f"expert '{name}': {path} is a {config.get('peft_type')} adapter; only LoRA is supported")
    for k in ("r", "lora_alpha"):
        v = config.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or v <= 0:
            raise LoadError(f"expert '{name}': {path} field '{k}' must be a positive number, got {v!r}")
    unsupported = {"use_dora": config.get("use_dora"), "modules_to_save": config.get("modules_to_save"),
                   "bias": config.get("bias", "none") != "none" and config.get("bias")}
    bad = [k for k, v in unsupported.items() if v]
    if bad:
        raise LoadError(f"expert '{name}': {path} uses {bad}, which atmoe does not support (plain LoRA only)")


def _check_targets(name: str, config: dict, found: dict, modules: dict) -> None:
    targets = config.get("target_modules")
    if isinstance(targets, list):
        leaf_names = {n.rsplit(".", 1)[-1] for n in modules} | set(modules)
        unknown = [t for t in targets if t not in leaf_names]
        if unknown:
            raise LoadError(f"expert '{name}': target_modules {unknown} do not exist in the base model")


def decoder_layers(model: nn.Module) -> tuple[str, nn.ModuleList]:
    """The model's stack of decoder layers, found by structure: the outermost ModuleList of num_hidden_layers."""
    n = model.config.get_text_config().num_hidden_layers
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return name, module
    raise LoadError(f"cannot find the {n} decoder layers of {type(model).__name__}")


def layer_index(model: nn.Module) -> tuple[list[str], dict[str, int]]:
    """Names of the decoder layers, and the decoder-layer index of every module inside one."""
    prefix, layers = decoder_layers(model)
    layer_of = {f"{prefix}.{i}.{sub}": i for i, layer in enumerate(layers) for sub, _ in layer.named_modules()}
    return [f"{prefix}.{i}" for i in range(len(layers))], layer_of


# Projections that read the same input, in the order the decoder layer calls them (Llama, Qwen2, Mistral, …); each
# such set is launched as one GEMM when its members are plain Linear layers of the same input width.
SHARED_INPUT = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))


def fuse_experts(model: nn.Module, experts: Sequence[Expert], layer_of: dict[str, int],
                 state: RoutingState) -> list[FusedLoRA]:
    """Wrap every module any expert targets (and its shared-input siblings), once, with all experts' pairs stacked
    (experts indexed by order); group them per decoder layer (see `fused.py`)."""
    param = next(model.parameters())
    to = dict(device=param.device, dtype=param.dtype)
    by_module: dict[str, list[tuple[int, torch.Tensor, torch.Tensor, float]]] = {}
    for ei, ex in enumerate(experts):
        for module_name, (A, B, s) in ex.modules.items():
            by_module.setdefault(module_name, []).append((ei, A, B, s))
    for ex in experts:
        ex.modules = {}  # the fused layers now hold the only copy
    modules = dict(model.named_modules())
    for name in list(by_module):            # a targeted q_proj brings k_proj and v_proj along (rank 0)
        parent, _, child = name.rpartition(".")
        for names in SHARED_INPUT:
            if child in names:
                for sibling in names:
                    full = f"{parent}.{sibling}"
                    if full in modules and full not in by_module and isinstance(modules[full], nn.Linear):
                        by_module[full] = []
    fused: dict[str, FusedLoRA] = {}
    for module_name, parts in by_module.items():
        parent_name, _, child = module_name.rpartition(".")
        parent = model.get_submodule(parent_name)
        base = getattr(parent, child)
        if isinstance(base, FusedLoRA):
            raise LoadError(f"module '{module_name}' already holds experts; load all experts in one call")
        in_f, out_f = (base.in_features, base.out_features) if isinstance(base, nn.Linear) else base.weight.shape
        to = dict(device=_execution_device(base, param.device), dtype=param.dtype)   # beside this layer's weights
        layer = FusedLoRA(
            base, layer_of[module_name],
            lora_A=torch.cat([A for _, A, _, _ in parts]).to(**to) if parts else torch.zeros(0, in_f, **to),
            lora_B=(torch.cat([B * s for _, _, B, s in parts], dim=1).to(**to) if parts
                    else torch.zeros(out_f, 0, **to)),
            rank_expert=torch.cat([torch.full((A.shape[0],), ei) for ei, A, _, _ in parts]).to(to["device"])
            if parts else torch.zeros(0, dtype=torch.long, device=to["device"]),
            rank_scale=torch.cat([torch.full((A.shape[0],), s) for _, A, _, s in parts]).to(to["device"])
            if parts else torch.zeros(0, device=to["device"]))
        layer.__dict__["state"] = state
        setattr(parent, child, layer)
        fused[module_name] = layer
    if all(_stackable(f.base_layer) for f in fused.values()):
        _group(fused, state, len(experts))
    else:
        state.stackable = False     # offloaded or quantized bases: the base layers run as they are, LoRA beside
    return list(fused.values())


def _execution_device(base: nn.Module, default: torch.device) -> torch.device:
    """Where a base layer computes: its weight's device, or accelerate's execution device for an offloaded one."""
    hook = getattr(base, "_hf_hook", None)
    if getattr(hook, "execution_device", None) is not None:
        return torch.device(hook.execution_device)
    return base.weight.device if base.weight.device.type != "meta" else default


def _stackable(base: nn.Module) -> bool:
    """A base layer whose weight can become a view into a stacked tensor: a plain Linear or Conv1D (not a subclass
    such as bitsandbytes' Linear4bit, whose packed weight is no matrix) with a plain floating-point weight (not a
    sharded DTensor), resident, not hooked by accelerate."""
    return (type(base) in (nn.Linear, Conv1D) and type(base.weight) is nn.Parameter   # not an FSDP2 DTensor shard
            and base.weight.dtype.is_floating_point and base.weight.device.type != "meta"
            and not hasattr(base, "_hf_hook"))


def _group(fused: dict[str, FusedLoRA], state: RoutingState, num_experts: int) -> None:
    """Per decoder layer: shared-input sets become one ProjectionGroup, every other projection its own; their expands
    are stored as rows of one width in the layer's LayerExperts."""
    by_layer: dict[int, list[list[FusedLoRA]]] = {}
    done: set[str] = set()
    for name, f in fused.items():
        if name in done:
            continue
        parent, _, child = name.rpartition(".")
        members = [f]
        for names in SHARED_INPUT:
            if child in names:
                siblings = [fused.get(f"{parent}.{n}") for n in names]
                if all(s is not None and isinstance(s.base_layer, nn.Linear) for s in siblings) and \
                        len({s.in_features for s in siblings}) == 1:
                    members = siblings
        done.update(f"{parent}.{n}" for n in ([child] if len(members) == 1 else
                                               next(ns for ns in SHARED_INPUT if child in ns)))
        by_layer.setdefault(f.layer_idx, []).append(members)
    for layer_idx in range(len(state.layers)):
        sets = by_layer.get(layer_idx, [])
        expands, experts = [], []
        for members in sets:
            R, O = sum(m.lora_A.shape[0] for m in members), sum(m.out_features for m in members)
            block = members[0].lora_B.new_zeros(R, O)                      # (B·s)ᵀ, block-diagonal over members
            r = o = 0
            for m in members:
                block[r:r + m.lora_A.shape[0], o:o + m.out_features] = m.lora_B.t()
                r, o = r + m.lora_A.shape[0], o + m.out_features
            expands.append(block)
            experts.append(torch.cat([m.rank_expert for m in members]))
        width = math.gcd(*[b.shape[1] for b in expands]) if expands else 1
        raw = torch.cat([b.reshape(-1, width) for b in expands]) if expands else torch.zeros(0, 1)
        row_expert = torch.cat([e.repeat_interleave(b.shape[1] // width) for b, e in zip(expands, experts)]) \
            if expands else torch.zeros(0, dtype=torch.long)
        holder = LayerExperts(raw, row_expert.clamp(max=num_experts - 1))
        state.layers[layer_idx] = holder
        start = 0
        for members, block in zip(sets, expands):
            n = block.numel() // width
            group = ProjectionGroup(state, members, holder.raw[start:start + n].view(block.shape),
                                    holder.scaled[start:start + n].view(block.shape))
            holder.groups.append(group)
            start += n


def save_fused_expert(model: nn.Module, expert: Expert, index: int, out_dir: str | Path, card: dict[str, Any],
                      dtype: torch.dtype = torch.float32) -> Path:
    """Write expert `index` as the fused layers now hold it (e.g. after co-adaptation) as a standard PEFT adapter
    folder, atomically: its own adapter config, its weights, and its card updated with `card`."""
    tensors = {}
    for name, module in model.named_modules():
        pair = module.expert_pair(index) if isinstance(module, FusedLoRA) else None
        if pair is not None:
            tensors[f"base_model.model.{name}.lora_A.weight"] = pair[0].to(dtype)
            tensors[f"base_model.model.{name}.lora_B.weight"] = pair[1].to(dtype)
    with atomic_directory(out_dir) as tmp:
        atomic_write_json(tmp / "adapter_config.json", expert.config)
        atomic_save_safetensors(tensors, tmp / "adapter_model.safetensors", {"format": "pt"})
        atomic_write_json(tmp / "atmoe_expert.json", {**expert.card, **card})
    return Path(out_dir)
