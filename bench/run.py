"""`python -m bench.run`: build the base, experts, AT-MoE and its peers once, run the selected sections, write
bench/results/<name>.json and bench/results/README.md."""

from __future__ import annotations

import argparse
import copy
import os
import platform
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import costs, inference
from .models import MODELS, PEER_LABELS, PEERS, TARGETS, build_atmoe, build_base, build_peers, write_experts
from .report import checks, write_json, write_readme

SECTIONS = ("prefill", "decode", "scaling", "memory", "train")
RESULTS = Path(__file__).parent / "results"


@dataclass
class BenchConfig:
    """One run's settings; `quick` shrinks every grid (for tests and loaded CPUs)."""

    model: str = "smollm2"
    device: str = "cpu"
    dtype: str = "auto"              # auto: bfloat16 on CUDA, float32 on CPU
    quick: bool = False
    only: tuple[str, ...] = SECTIONS
    threads: int | None = None       # CPU threads (None: torch's default)
    experts: int = 7
    rank: int = 8
    warmup: int = 2
    repeats: int = 5
    prefill_tokens: tuple[int, ...] = (64, 256, 1024)
    prefill_batches: tuple[int, ...] = (1, 8)
    decode_batches: tuple[int, ...] = (1, 8)
    decode_prompt: int = 64
    new_tokens: int = 128
    xlora_new_tokens: int = 32       # X-LoRA decodes without a KV cache: its own, shorter row
    scaling_tokens: int = 256
    scaling_experts: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    scaling_ranks: tuple[int, ...] = (4, 8, 16, 32, 64)
    train_batch: int = 4
    train_tokens: int = 128
    out: str = str(RESULTS)
    name: str = ""

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        bad = [s for s in self.only if s not in SECTIONS]
        if bad:
            raise ValueError(f"unknown section(s) {bad}; choose from {SECTIONS}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        if self.quick:
            self.warmup, self.repeats = min(self.warmup, 1), min(self.repeats, 3)
            self.prefill_tokens, self.prefill_batches, self.decode_batches = (64, 256), (1, 2), (1, 2)
            self.new_tokens, self.scaling_experts, self.scaling_ranks = 32, (1, 4, 16), (4, 16, 64)
            self.xlora_new_tokens = 8
            self.train_batch, self.train_tokens = 2, 64
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError("repeats must be ≥ 1 and warmup ≥ 0")
        self.name = self.name or f"{self.model}-{self.device.split(':')[0]}{'-quick' if self.quick else ''}"


@dataclass
class Context:
    """Everything the sections share: built once per run."""

    cfg: BenchConfig
    device: torch.device
    dtype: torch.dtype
    base: torch.nn.Module            # pristine; every other model is a deepcopy of it
    tokenizer: Any
    tmp: Path
    atmoe: Any = None
    peers: dict = field(default_factory=dict)
    peer_errors: dict = field(default_factory=dict)
    build_rss_delta: int | None = None
    started: float = field(default_factory=time.perf_counter)

    @property
    def vocab(self) -> int:
        return self.base.config.get_text_config().vocab_size

    def log(self, msg: str) -> None:
        print(f"[bench {time.perf_counter() - self.started:6.1f}s] {msg}", file=sys.stderr, flush=True)


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    p = argparse.ArgumentParser(prog="python -m bench.run", description=__doc__)
    p.add_argument("--device", default="cpu")
    p.add_argument("--model", default="smollm2", choices=MODELS)
    p.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"])
    p.add_argument("--quick", action="store_true", help="small grids: 64/256 tokens, batch 1/2, 32 new tokens")
    p.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of {','.join(SECTIONS)}")
    p.add_argument("--threads", type=int, default=None, help="CPU threads (1 is steadiest on a shared machine)")
    p.add_argument("--repeats", type=int, default=None)
    p.add_argument("--warmup", type=int, default=None)
    p.add_argument("--prefill-tokens", default=None, help="comma list of prompt lengths (default 64,256,1024)")
    p.add_argument("--prefill-batches", default=None, help="comma list of batch sizes (default 1,8)")
    p.add_argument("--out", default=str(RESULTS), help="results folder")
    p.add_argument("--name", default="", help="result file stem (default <model>-<device>[-quick])")
    a = p.parse_args(argv)
    extra = {k: v for k, v in (("repeats", a.repeats), ("warmup", a.warmup)) if v is not None}
    for key, text in (("prefill_tokens", a.prefill_tokens), ("prefill_batches", a.prefill_batches)):
        if text is not None:
            try:
                extra[key] = tuple(int(v) for v in text.split(","))
            except ValueError:
                p.error(f"--{key.replace('_', '-')} must be a comma list of integers, got {text!r}")
            if not extra[key] or min(extra[key]) < 1:
                p.error(f"--{key.replace('_', '-')} values must be ≥ 1, got {text!r}")
    cfg = BenchConfig(model=a.model, device=a.device, dtype=a.dtype, quick=a.quick, threads=a.threads,
                      only=tuple(s.strip() for s in a.only.split(",") if s.strip()), out=a.out, name=a.name)
    for k, v in extra.items():  # explicit counts win over --quick's
        setattr(cfg, k, v)
    return cfg


def _resolve(cfg: BenchConfig) -> tuple[torch.device, torch.dtype]:
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    if cfg.dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, getattr(torch, cfg.dtype)


def run(cfg: BenchConfig) -> dict:
    import peft
    import transformers
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device, dtype = _resolve(cfg)
    with tempfile.TemporaryDirectory(prefix="atmoe-bench-") as tmp:
        base, tok = build_base(cfg.model, device, dtype)
        ctx = Context(cfg, device, dtype, base, tok, Path(tmp))
        ctx.log(f"base {cfg.model} on {device} {dtype}, threads {torch.get_num_threads()}")
        experts = write_experts(base, ctx.tmp / "experts", cfg.experts, cfg.rank)
        model = copy.deepcopy(base)
        rss = costs.rss()
        ctx.atmoe = build_atmoe(model, tok, experts)
        ctx.build_rss_delta = None if rss is None else costs.rss() - rss
        if {"prefill", "decode", "memory"} & set(cfg.only):
            ctx.peers, ctx.peer_errors = build_peers(base, experts)
        ctx.log(f"AT-MoE with {len(experts)} experts; peers {sorted(ctx.peers)}; errors {ctx.peer_errors}")

        sections: dict[str, Any] = {}
        runners = dict(prefill=inference.prefill, decode=inference.decode_section, scaling=costs.scaling,
                       memory=costs.memory, train=costs.train)
        for name in SECTIONS:
            if name in cfg.only:
                sections[name] = runners[name](ctx)
        runtime = {f"{s}/{p}": e for s, body in sections.items() for p, e in body.get("errors", {}).items()}
        sections["peers"] = dict(labels={p: PEER_LABELS[p] for p in PEERS}, built=["base", "atmoe", *ctx.peers],
                                 build_errors=ctx.peer_errors, runtime_errors=runtime,
                                 notes={"base": "the AT-MoE model called outside a routing call (same weights)",
                                        "copies": "each PEFT peer is built on its own deepcopy of the base",
                                        "adapters": "PEFT adapters loaded with autocast_adapter_dtype=False so "
                                                    "they run in the model's dtype, like AT-MoE's fused buffers"})
        device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
            f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
        result = dict(
            meta=dict(model=cfg.model, device=str(device), device_name=device_name, dtype=str(dtype).split(".")[-1],
                      threads=torch.get_num_threads(), quick=cfg.quick, experts=cfg.experts, rank=cfg.rank,
                      targets=TARGETS, torch=torch.__version__, transformers=transformers.__version__,
                      peft=peft.__version__, date=time.strftime("%Y-%m-%d %H:%M:%S"),
                      seconds=time.perf_counter() - ctx.started, config=asdict(cfg)),
            sections=sections)
        result["checks"] = checks(result)
    out = Path(cfg.out)
    write_json(result, out / f"{cfg.name}.json")
    write_readme(out)
    ctx.log(f"wrote {out / (cfg.name + '.json')}")
    return result


def main(argv: list[str] | None = None) -> None:
    run(parse_args(argv))


if __name__ == "__main__":
    main()
