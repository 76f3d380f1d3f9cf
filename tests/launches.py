"""Counting what a forward launches, on CPU: a `TorchDispatchMode` sees every aten op the model sends (what a GPU
would launch one kernel each for), views and allocations excluded; host syncs are the ops that read a tensor's value
back to Python. Per decoder layer = (count with 6 layers − count with 2 layers) / 4, so per-call constants cancel.

Shared by the structural speed tests (tests/test_speed.py) and the benchmark (bench/)."""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

SYNCS = ("_local_scalar_dense", "item", "is_nonzero", "nonzero")
FREE = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "lift_fresh")   # allocations


class Launches(TorchDispatchMode):
    """ops: Counter of aten op names launched; syncs: how many of them block the host (incl. boolean-mask indexing)."""

    def __init__(self) -> None:
        super().__init__()
        self.ops: Counter[str] = Counter()
        self.syncs = 0
        self.inputs: list[tuple] = []     # (op, input shapes) in order, for shape-stability checks

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001, ANN204
        name = func.overloadpacket.__name__
        if not func.is_view and name not in FREE:
            self.ops[name] += 1
            self.inputs.append((name, tuple(tuple(a.shape) for a in args if isinstance(a, torch.Tensor))))
        masks = args[1] if name == "index" and len(args) > 1 else ()
        if name in SYNCS or any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in masks):
            self.syncs += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


def count(fn: Callable[[], object]) -> Launches:
    with torch.inference_mode(), Launches() as mode:
        fn()
    return mode


def per_layer(make: Callable[[int], Callable[[], object]]) -> tuple[float, float]:
    """(ops, syncs) per decoder layer: `make(layers)` builds a model with that many layers and returns the call."""
    counts = {n: count(make(n)) for n in (2, 6)}
    return ((counts[6].total - counts[2].total) / 4, (counts[6].syncs - counts[2].syncs) / 4)


def qwen2_experts(folder: Path, layers: int, seed: int = 0):  # noqa: ANN201
    """A tiny Qwen2-shaped base and 7 rank-8 experts on all 7 projections in 3 groups (the issue's measured shape):
    returns (manifest path, pristine base loaded separately, never wrapped)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    from atmoe.load.manifest import ExpertEntry, GroupEntry, Manifest
    from tiny_models import save_adapter, tiny_tokenizer

    tok = tiny_tokenizer()
    torch.manual_seed(seed)
    cfg = Qwen2Config(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=layers,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    base = AutoModelForCausalLM.from_config(cfg).eval()
    base.save_pretrained(folder / "base")
    tok.save_pretrained(folder / "base")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
    groups = {"task": ["a", "b", "c"], "knowledge": ["d", "e"], "style": ["f", "g"]}
    entries = []
    for gi, (group, names) in enumerate(groups.items()):
        items = []
        for ei, name in enumerate(names):
            save_adapter(base, folder / "experts" / name, targets, r=8, alpha=16, seed=10 * gi + ei)
            items.append(ExpertEntry(name, f"experts/{name}"))
        entries.append(GroupEntry(group, items))
    path = Manifest(entries, base_model="base", root=folder).save(folder / "experts.json")
    pristine = AutoModelForCausalLM.from_pretrained(folder / "base").eval()
    return path, pristine
