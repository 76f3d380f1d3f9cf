"""Interleaved timing: peers run in turn (A, B, C, A, B, C, ...) on the same inputs, so load spikes on a shared
machine hit every peer alike; each round gives a paired ratio and the reported ratio is the median of those."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import torch


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


@dataclass
class Timings:
    """Seconds of every round, per peer (`samples[peer][round]`)."""

    samples: dict[str, list[float]] = field(default_factory=dict)

    def median(self, peer: str) -> float:
        return statistics.median(self.samples[peer])

    def ratio(self, peer: str, ref: str) -> float:
        """Median over rounds of time(peer) / time(ref) — paired, so a slow round cancels out."""
        return statistics.median(a / b for a, b in zip(self.samples[peer], self.samples[ref], strict=True))


def interleaved(fns: dict[str, Callable[[], object]], *, warmup: int, repeats: int,
                device: torch.device | str) -> Timings:
    """Run every fn `warmup` times, then `repeats` rounds; the order rotates each round so no peer always goes first.
    A fn that returns a float has timed itself (e.g. only the decode steps after an untimed prefill): that float is
    its sample; any other return value is ignored and the call's wall time is the sample."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
        sync(device)
    out = Timings({n: [] for n in names})
    for r in range(repeats):
        for name in names[r % len(names):] + names[: r % len(names)]:
            sync(device)
            t0 = time.perf_counter()
            own = fns[name]()
            sync(device)
            out.samples[name].append(own if isinstance(own, float) else time.perf_counter() - t0)
    return out
