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

from pathlib import Path

import torch.distributed as dist
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor import DTensor

from ..load.experts import decoder_layers
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


def load_sharded(manifest: str | Path, base: str | None = None, device: str = "cpu") -> ATMoE:
    """`ATMoE.load` with the base sharded (FSDP2, per decoder layer) before the experts are fused into it: a sharded
    layer is never stacked, its experts run beside it."""
    return ATMoE.load(manifest, base=base, device=device, prepare_base=shard_base)


__all__ = ["base_share", "load_sharded", "shard_base"]
