"""Tiny random-init causal LMs and PEFT adapters for fast tests (no downloads)."""

from __future__ import annotations

import copy
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

TARGETS = {
    "llama": ["q_proj", "v_proj", "o_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "qwen2": ["q_proj", "k_proj", "up_proj"],
}


def tiny_model(arch: str = "llama", seed: int = 0, vocab_size: int = 128, layers: int = 3) -> torch.nn.Module:
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=layers, n_head=4, n_positions=256)
    elif arch == "qwen2":
        cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    else:
        raise ValueError(arch)
    return AutoModelForCausalLM.from_config(cfg).eval()


def save_adapter(model: torch.nn.Module, path: Path, targets: list[str], r: int = 4, alpha: float = 8,
                 seed: int = 1, **lora: object) -> Path:
    """A PEFT LoRA adapter with random, non-zero A and B, saved in the standard format."""
    torch.manual_seed(seed)
    fan = any(t.startswith("c_") for t in targets)  # GPT-2 Conv1D
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False,
                     fan_in_fan_out=fan, **lora)
    peft_model = get_peft_model(copy.deepcopy(model), cfg)
    with torch.no_grad():  # larger B so the experts visibly change the logits
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(path)
    return path


def tiny_demo(folder: Path, mode: str = "softmax", trained: bool = True, seed: int = 0) -> Path:
    """A complete tiny AT-MoE on disk: base (with tokenizer), the 6 demo experts, a router, the manifest.
    Returns the manifest path. Used by app, CLI and reliability tests."""
    from atmoe.manifest import ExpertEntry, GroupEntry, Manifest
    from atmoe.demo.suite import EXPERT_DESCRIPTIONS, GROUPS
    from atmoe.model import ATMoE
    from atmoe.router import save_router
    from helpers_tiny import tiny_llama, tiny_tokenizer

    folder = Path(folder)
    tok = tiny_tokenizer()
    base = tiny_llama(len(tok), seed=seed, layers=4)
    base.save_pretrained(folder / "base")
    tok.save_pretrained(folder / "base")
    targets = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    groups = []
    for gi, (group, names) in enumerate(GROUPS.items()):
        entries = []
        for ei, name in enumerate(names):
            save_adapter(base, folder / "experts" / name, targets[(gi + ei) % 2:], r=4, alpha=8,
                         seed=seed + 100 * gi + ei)
            entries.append(ExpertEntry(name, f"experts/{name}", description=EXPERT_DESCRIPTIONS[name]))
        groups.append(GroupEntry(group, entries))
    manifest = Manifest(groups, base_model="base", root=folder)
    path = manifest.save(folder / "experts.json")
    if trained:
        m = ATMoE.load(path, device="cpu")
        router = m.new_router(mode=mode)
        torch.manual_seed(seed)
        with torch.no_grad():
            for p in router.parameters():
                p.normal_(0, 0.5)
        router.trained = True
        save_router(router, folder / "router.safetensors")
        manifest.router = "router.safetensors"
        manifest.save(path)
    return path
