"""What the benchmarks run on: a base model, random PEFT experts written to disk, AT-MoE and its PEFT peers.

"base" is the pristine checkpoint: loaded by transformers on its own (`build_base` called once for it) and never
wrapped by atmoe. AT-MoE wraps a second load of the same checkpoint; every PEFT peer is built on its own deepcopy of
the pristine base, so no two peers share modules. "atmoe_unrouted" is AT-MoE's model called outside a routing call
(the wrapped base): its distance from "base" is what the wrappers alone cost.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

import torch
from peft import LoraConfig, PeftModel, get_peft_model
from safetensors.torch import save_file
from torch import nn
from transformers import AutoModelForCausalLM, LlamaConfig, Qwen2Config

from atmoe.load.experts import decoder_layers
from atmoe.model import ATMoE

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
MODELS = ("tiny", "smollm2", "qwen2.5-0.5b", "qwen2.5-1.5b")
# The real shapes of the Qwen2.5 checkpoints (random init: timing depends on shapes, not on trained values).
QWEN_SHAPES = {
    "qwen2.5-0.5b": dict(hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2),
    "qwen2.5-1.5b": dict(hidden_size=1536, intermediate_size=8960, num_hidden_layers=28, num_attention_heads=12,
                         num_key_value_heads=2),
}
PEFT_PEERS = ("peft_one", "peft_all", "peft_cat", "xlora")
PEERS = ("base", "atmoe", "atmoe_merged", "atmoe_unrouted", *PEFT_PEERS)
PEER_LABELS = {
    "base": "pristine base (transformers, never wrapped)",
    "atmoe": "AT-MoE (grouped router, fused experts)",
    "atmoe_merged": "AT-MoE, merge=True (merged weights, batch 1)",
    "atmoe_unrouted": "AT-MoE model outside a routing call (wrapped base)",
    "atmoe_override": "AT-MoE with one group override",
    "atmoe_token": "AT-MoE, token routing",
    "peft_one": "PEFT, one LoRA active",
    "peft_all": "PEFT, all experts active (plain sum)",
    "peft_cat": "PEFT add_weighted_adapter(cat), one merged LoRA",
    "xlora": "PEFT X-LoRA",
}


def label(peer: str) -> str:
    """A peer's label; "<peer>+compile" is that peer run through torch.compile."""
    name, _, compiled = peer.partition("+")
    return PEER_LABELS[name] + (" + torch.compile" if compiled else "")


def build_base(name: str, device: torch.device, dtype: torch.dtype) -> tuple[nn.Module, Any]:
    """(model in eval mode on device/dtype, tokenizer or None). Only `smollm2` has real weights and a tokenizer."""
    if name == "smollm2":
        from atmoe.load.base import load_base
        model, tok = load_base(None, device=str(device), dtype=dtype)
        return model.eval(), tok
    if name == "tiny":
        # The shape of tests/tiny_models.tiny_llama, every LoRA target present, but written out here: bench does not
        # import tests/ (not a package, not installed), and it wants a 2048-token context and HF's default init.
        cfg = LlamaConfig(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=2048, pad_token_id=0,
                          tie_word_embeddings=False)
    elif name in QWEN_SHAPES:
        cfg = Qwen2Config(vocab_size=151936, max_position_embeddings=32768, tie_word_embeddings=True,
                          rope_theta=1_000_000.0, **QWEN_SHAPES[name])
    else:
        raise ValueError(f"--model must be one of {MODELS}, got {name!r}")
    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(cfg, dtype=dtype)
    return model.eval(), None


def write_expert(model: nn.Module, folder: Path, rank: int, seed: int, targets: list[str] = TARGETS) -> Path:
    """A PEFT LoRA adapter folder (adapter_config.json + adapter_model.safetensors) with random non-zero A and B on
    every `targets` Linear inside a decoder layer. Written directly: building a PeftModel per expert would cost a
    deepcopy of the base each time."""
    prefix, _ = decoder_layers(model)
    gen = torch.Generator().manual_seed(seed)
    tensors = {}
    for name, module in model.named_modules():
        if name.startswith(prefix + ".") and name.rsplit(".", 1)[-1] in targets and isinstance(module, nn.Linear):
            i, o = module.in_features, module.out_features
            tensors[f"base_model.model.{name}.lora_A.weight"] = torch.randn(rank, i, generator=gen) / math.sqrt(i)
            tensors[f"base_model.model.{name}.lora_B.weight"] = torch.randn(o, rank, generator=gen) * 0.02
    folder.mkdir(parents=True, exist_ok=True)
    LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets, lora_dropout=0.0).save_pretrained(folder)
    save_file(tensors, folder / "adapter_model.safetensors")
    return folder


def write_experts(model: nn.Module, folder: Path, n: int, rank: int) -> list[tuple[str, str, str, str]]:
    """n experts in min(n, 3) groups: [(group, name, folder, description)] for `ATMoE.from_experts`."""
    groups = [f"g{i % min(n, 3)}" for i in range(n)]
    experts = [(g, f"e{i}", str(write_expert(model, folder / f"r{rank}_e{i}", rank, seed=1000 * rank + i)), "")
               for i, g in enumerate(groups)]
    return sorted(experts, key=lambda e: e[0])  # the router wants experts ordered by group


def build_atmoe(base: nn.Module, tokenizer: Any, experts: list[tuple[str, str, str, str]]) -> ATMoE:
    return ATMoE.from_experts(base, tokenizer, experts, router_mode="softmax")


def _peft(base: nn.Module, experts: list[tuple[str, str, str, str]]) -> PeftModel:
    (_, first, path, _), *rest = experts
    pm = PeftModel.from_pretrained(copy.deepcopy(base), path, adapter_name=first, autocast_adapter_dtype=False)
    for _, name, path, _ in rest:
        pm.load_adapter(path, adapter_name=name, autocast_adapter_dtype=False)
    return pm.eval()


def build_peers(base: nn.Module, experts: list[tuple[str, str, str, str]], which: tuple[str, ...] = PEFT_PEERS
                ) -> tuple[dict[str, nn.Module], dict]:
    """The PEFT peers of AT-MoE named in `which` ({peer: model}), and {peer: error} for any that cannot be built in
    this version."""
    peers, errors = {}, {}
    names = [name for _, name, _, _ in experts]

    def attempt(peer: str, fn) -> None:
        if peer not in which:
            return
        try:
            peers[peer] = fn()
        except Exception as e:  # a peer that cannot run is recorded, never faked
            errors[peer] = f"{type(e).__name__}: {e}"

    attempt("peft_one", lambda: _peft(base, experts[:1]))

    def peft_all() -> PeftModel:
        pm = _peft(base, experts)
        pm.base_model.set_adapter(names)  # PeftModel.set_adapter takes one name; the tuner takes a list
        return pm

    def peft_cat() -> PeftModel:
        pm = _peft(base, experts)
        pm.add_weighted_adapter(names, [1.0] * len(names), adapter_name="cat", combination_type="cat")
        pm.set_adapter("cat")
        for n in names:
            pm.delete_adapter(n)
        return pm

    def xlora() -> nn.Module:
        from peft import XLoraConfig
        model = copy.deepcopy(base)
        model.config.use_cache = False  # X-LoRA refuses a KV cache (its scaling pass re-runs the whole sequence)
        # Keys must be "0".."n-1": XLoraModel loads adapter i under the name str(i) but then activates the dict's
        # keys, so any other names fail with KeyError in disable_adapter_layers (peft 0.21.2).
        cfg = XLoraConfig(task_type="CAUSAL_LM", hidden_size=model.config.hidden_size, xlora_depth=1,
                          adapters={str(i): path for i, (_, _, path, _) in enumerate(experts)})
        xm = get_peft_model(model, cfg, autocast_adapter_dtype=False)
        param = next(base.parameters())
        return xm.to(param.device, param.dtype).eval()

    attempt("peft_all", peft_all)
    attempt("peft_cat", peft_cat)
    attempt("xlora", xlora)
    return peers, errors


def nbytes(*modules: nn.Module) -> int:
    """Bytes of the parameters and buffers of `modules` (each tensor counted once)."""
    seen, total = set(), 0
    for m in modules:
        for t in [*m.parameters(), *m.buffers()]:
            if t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total
