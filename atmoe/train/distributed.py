"""Router training on a base sharded across processes: PyTorch's FSDP2 (`torch.distributed.fsdp.fully_shard`).

    torchrun --nproc-per-node N -m atmoe.train.router --shard-base ...     (or: python -m atmoe.train.router
                                                                             --nproc-per-node N --shard-base ...)

Data parallel (`router.py`), every process holds the whole frozen base; with `--shard-base` each holds 1/N of it:
every decoder layer is its own FSDP2 unit (gathered for its forward and again for its backward, then freed), and the
root unit holds the embeddings, final norm and LM head. So a process needs base/N + about one layer gathered, instead
of the whole base (`docs/scale.md`; `tests/test_distributed.py` measures each process's share).

What stays replicated, and why:
- the router: a few heads per layer (kilobytes to a few MB even at 70B), trained. Sharding it would add a collective
  per layer per step for nothing; it stays in the module the Trainer wraps, so DDP averages its gradients exactly as
  in the unsharded data-parallel run, and the checkpoint is the same `router.safetensors`, written by the main
  process only (the base is frozen: nothing of it is ever written).
- the experts: frozen buffers of the fused layers (FSDP shards parameters only); rank-r pairs are ~1% of the base.

The losses are the data-parallel ones, unchanged (global normalisation, `router.py`), so N sharded processes take
the one-process step on the same global batch. Sharded layers are not resident plain weights: the engine runs them
on its "separate" path (base layer as it is, LoRA beside it) — the path every training step takes anyway.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from ..load import experts as expert_loading
from ..load.base import check_signature, load_base
from ..load.experts import decoder_layers
from ..load.manifest import Manifest
from ..model import ATMoE


def shard_base(model: nn.Module) -> nn.Module:
    """Shard `model` over the default process group: one FSDP2 unit per decoder layer, the rest in the root unit."""
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("--shard-base needs several processes: launch with torchrun or --nproc-per-node")
    _, layers = decoder_layers(model)
    for layer in layers:
        fully_shard(layer)
    fully_shard(model)
    return model


def base_share(model: nn.Module) -> tuple[int, int]:
    """(elements of the base's parameters this process holds, elements of the whole base)."""
    local = total = 0
    for p in model.parameters():
        held = p.to_local() if isinstance(p, DTensor) else p
        local, total = local + held.numel(), total + p.numel()
    return local, total


def _plain_stackable(base: nn.Module) -> bool:
    return type(base.weight) is nn.Parameter and _engine_stackable(base)


_engine_stackable = expert_loading._stackable


@contextmanager
def plain_weights_stacked_only() -> Iterator[None]:
    """Stopgap until the engine's `load/experts.py::_stackable` refuses FSDP2's sharded weights itself: a sharded
    Linear keeps its class and a floating-point dtype, but its weight is a DTensor shard, never to be stacked into
    [W0; A]; the layer must run as it is. Wrap the `ATMoE` construction in it."""
    expert_loading._stackable = _plain_stackable
    try:
        yield
    finally:
        expert_loading._stackable = _engine_stackable


def load_sharded(manifest: str | Path, base: str | None = None, device: str = "cpu") -> ATMoE:
    """`ATMoE.load` with the base sharded before the experts are fused into it (so no layer is ever stacked)."""
    m = Manifest.load(manifest)
    base = base if base is not None else m.base_model
    if base and not Path(base).is_absolute() and (m.root / base).is_dir():
        base = str(m.resolve(base, "base model"))
    model, tokenizer = load_base(base, device=device)
    if m.base_signature:
        check_signature(m.base_signature, model, what=f"experts of manifest {m.root}")
    shard_base(model)
    with plain_weights_stacked_only():
        return ATMoE.from_experts(model, tokenizer, [(g, e.name, m.expert_source(e), e.description)
                                                     for g, e in m.experts],
                                  groups=[g.name for g in m.groups], router=m.router_path(), manifest=m)


__all__ = ["base_share", "load_sharded", "plain_weights_stacked_only", "shard_base"]
