"""`python -m bench.run`: build the base, experts, AT-MoE and its peers once, run the selected sections, write
bench/results/<name>.json and bench/results/README.md."""

from __future__ import annotations

import argparse
import os
import platform
import shlex
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from . import costs, flops, inference, launches
from .models import (MODELS, PEER_LABELS, PEERS, PEFT_PEERS, TARGETS, build_atmoe, build_base, build_peers,
                     write_experts)
from .report import checks, write_json, write_readme

SECTIONS = ("flops", "launches", "prefill", "decode", "scaling", "memory", "train")
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
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
    prefill_shapes: tuple[tuple[int, int], ...] = ()   # (batch, tokens) pairs: replace the tokens × batches grid
    decode_batches: tuple[int, ...] = (1, 8)
    decode_prompt: int = 64
    new_tokens: int = 128
    xlora_new_tokens: int = 32       # X-LoRA decodes without a KV cache: its own, shorter row
    scaling_tokens: int = 256
    scaling_experts: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
    scaling_ranks: tuple[int, ...] = (4, 8, 16, 32, 64)
    train_batch: int = 4
    train_tokens: int = 128
    compile: str = ""                # a torch.compile mode: adds "<peer>+compile" twins (decode step in this mode)
    compile_backend: str = "inductor"
    peers: tuple[str, ...] = PEFT_PEERS   # the PEFT peers to build
    out: str = str(RESULTS)
    name: str = ""
    note: str = ""
    command: str = ""                # the command line that made this run (set by parse_args)

    def __post_init__(self) -> None:
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {MODELS}, got {self.model!r}")
        bad = [s for s in self.only if s not in SECTIONS]
        if bad:
            raise ValueError(f"unknown section(s) {bad}; choose from {SECTIONS}")
        if self.device not in ("cpu", "cuda") and not self.device.startswith("cuda:"):
            raise ValueError(f"device must be cpu or cuda, got {self.device!r}")
        bad = [p for p in self.peers if p not in PEFT_PEERS]
        if bad:
            raise ValueError(f"unknown peer(s) {bad}; choose from {PEFT_PEERS}")
        if self.compile and self.compile not in COMPILE_MODES:
            raise ValueError(f"compile must be one of {COMPILE_MODES}, got {self.compile!r}")
        if self.quick:
            self.warmup, self.repeats = min(self.warmup, 1), min(self.repeats, 3)
            self.prefill_tokens, self.prefill_batches, self.decode_batches = (64, 256), (1, 2), (1, 2)
            self.new_tokens, self.scaling_experts, self.scaling_ranks = 32, (1, 4, 16), (4, 16, 64)
            self.xlora_new_tokens = 8
            self.train_batch, self.train_tokens = 2, 64
        if self.repeats < 1 or self.warmup < 0:
            raise ValueError("repeats must be ≥ 1 and warmup ≥ 0")
        if self.new_tokens < 2 or self.xlora_new_tokens < 1:
            raise ValueError("new_tokens must be ≥ 2 (a decode step needs a prefill before it)")
        self.name = self.name or f"{self.model}-{self.device.split(':')[0]}{'-quick' if self.quick else ''}"


@dataclass
class Context:
    """Everything the sections share: built once per run."""

    cfg: BenchConfig
    device: torch.device
    dtype: torch.dtype
    base: torch.nn.Module            # pristine (never wrapped); the PEFT peers are deepcopies of it
    tokenizer: Any
    tmp: Path
    atmoe: Any = None
    peers: dict = field(default_factory=dict)
    peer_errors: dict = field(default_factory=dict)
    build_rss_delta: int | None = None
    compiled: dict = field(default_factory=dict)          # torch.compile'd twins, one per key for the run
    decode_buffers: dict = field(default_factory=dict)    # (peer, batch, length) → DecodeBuffers
    started: float = field(default_factory=time.perf_counter)

    @property
    def prefill_grid(self) -> list[tuple[int, int]]:
        """(batch, tokens) of every prefill point."""
        cfg = self.cfg
        return list(cfg.prefill_shapes) or [(b, t) for b in cfg.prefill_batches for t in cfg.prefill_tokens]

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
    p.add_argument("--prefill-shapes", default=None,
                   help="comma list of BATCHxTOKENS prefill points, e.g. 1x512,8x1024 (replaces the grid)")
    p.add_argument("--decode-batches", default=None, help="comma list of batch sizes (default 1,8)")
    p.add_argument("--peers", default=",".join(PEFT_PEERS),
                   help=f"PEFT peers to build: comma list of {','.join(PEFT_PEERS)}, or none")
    p.add_argument("--decode-prompt", type=int, default=None, help="prompt tokens before a decode (default 64)")
    p.add_argument("--new-tokens", type=int, default=None, help="new tokens per timed decode (default 128)")
    p.add_argument("--xlora-new-tokens", type=int, default=None, help="X-LoRA's decode row (default 32)")
    p.add_argument("--compile", default="", choices=["", *COMPILE_MODES],
                   help="also time torch.compile'd twins: prefill in the default mode, the decode step in this one")
    p.add_argument("--compile-backend", default="inductor", help="torch.compile backend (eager: a fast check)")
    p.add_argument("--note", default="", help="a note written into the results (shown in the README table)")
    p.add_argument("--out", default=str(RESULTS), help="results folder")
    p.add_argument("--name", default="", help="result file stem (default <model>-<device>[-quick])")
    argv = sys.argv[1:] if argv is None else list(argv)
    a = p.parse_args(argv)
    extra = {k: v for k, v in (("repeats", a.repeats), ("warmup", a.warmup), ("decode_prompt", a.decode_prompt),
                               ("new_tokens", a.new_tokens), ("xlora_new_tokens", a.xlora_new_tokens))
             if v is not None}
    for key, text in (("prefill_tokens", a.prefill_tokens), ("prefill_batches", a.prefill_batches),
                      ("decode_batches", a.decode_batches)):
        if text is not None:
            try:
                extra[key] = tuple(int(v) for v in text.split(","))
            except ValueError:
                p.error(f"--{key.replace('_', '-')} must be a comma list of integers, got {text!r}")
            if not extra[key] or min(extra[key]) < 1:
                p.error(f"--{key.replace('_', '-')} values must be ≥ 1, got {text!r}")
    cfg = BenchConfig(model=a.model, device=a.device, dtype=a.dtype, quick=a.quick, threads=a.threads,
                      only=tuple(s.strip() for s in a.only.split(",") if s.strip()), out=a.out, name=a.name,
                      compile=a.compile, compile_backend=a.compile_backend, note=a.note,
                      command=shlex.join(["python", "-m", "bench.run", *argv]),
                      peers=() if a.peers == "none" else tuple(x.strip() for x in a.peers.split(",") if x.strip()))
    for k, v in extra.items():  # explicit counts win over --quick's
        setattr(cfg, k, v)
    if cfg.new_tokens < 2:
        p.error("--new-tokens must be ≥ 2")
    if a.prefill_shapes:
        try:
            cfg.prefill_shapes = tuple(tuple(int(x) for x in v.lower().split("x")) for v in a.prefill_shapes.split(","))
        except ValueError:
            p.error(f"--prefill-shapes must be a comma list of BATCHxTOKENS, got {a.prefill_shapes!r}")
        if any(len(v) != 2 or min(v) < 1 for v in cfg.prefill_shapes):
            p.error(f"--prefill-shapes must be a comma list of BATCHxTOKENS (each ≥ 1), got {a.prefill_shapes!r}")
    return cfg


def _resolve(cfg: BenchConfig) -> tuple[torch.device, torch.dtype]:
    device = torch.device(cfg.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: CUDA is not available on this machine")
    if cfg.dtype == "auto":
        return device, torch.bfloat16 if device.type == "cuda" else torch.float32
    return device, getattr(torch, cfg.dtype)


def run(cfg: BenchConfig) -> dict:
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    device, dtype = _resolve(cfg)
    with tempfile.TemporaryDirectory(prefix="atmoe-bench-") as tmp:
        base, tok = build_base(cfg.model, device, dtype)    # the pristine base: never wrapped
        ctx = Context(cfg, device, dtype, base, tok, Path(tmp))
        ctx.log(f"base {cfg.model} on {device} {dtype}, threads {torch.get_num_threads()}")
        experts = write_experts(base, ctx.tmp / "experts", cfg.experts, cfg.rank)
        model, _ = build_base(cfg.model, device, dtype)      # the same checkpoint loaded again, for AT-MoE to wrap
        rss = costs.rss()
        ctx.atmoe = build_atmoe(model, tok, experts)
        ctx.build_rss_delta = None if rss is None else costs.rss() - rss
        if {"prefill", "decode", "memory"} & set(cfg.only):
            ctx.peers, ctx.peer_errors = build_peers(base, experts, cfg.peers)
        ctx.log(f"AT-MoE with {len(experts)} experts; peers {sorted(ctx.peers)}; errors {ctx.peer_errors}")

        sections: dict[str, Any] = {}
        runners = dict(flops=flops.flops, launches=launches.launches, prefill=inference.prefill,
                       decode=inference.decode_section, scaling=costs.scaling, memory=costs.memory, train=costs.train)
        out = Path(cfg.out)
        for name in cfg.only:   # in the order given (a time-limited run puts what matters most first)
            if name not in sections:
                sections[name] = runners[name](ctx)
                # written after every section: a run cut short (a lent GPU's time limit) keeps what it measured
                write_json(_result(ctx, sections, partial=True), out / f"{cfg.name}.json")
        result = _result(ctx, sections, partial=False)
    write_json(result, out / f"{cfg.name}.json")
    write_readme(out)
    ctx.log(f"wrote {out / (cfg.name + '.json')}")
    return result


def _result(ctx: Context, sections: dict[str, Any], partial: bool) -> dict:
    import peft
    import transformers
    cfg, device = ctx.cfg, ctx.device
    runtime = {f"{s}/{p}": e for s, body in sections.items() for p, e in body.get("errors", {}).items()}
    peers = dict(labels={p: PEER_LABELS[p] for p in PEERS}, built=["base", "atmoe", *ctx.peers],
                 build_errors=ctx.peer_errors, runtime_errors=runtime,
                 notes={"base": "the pristine checkpoint, loaded by transformers on its own and never wrapped; "
                                "AT-MoE wraps a second load of it",
                        "atmoe_unrouted": "AT-MoE's model called outside a routing call",
                        "copies": "each PEFT peer is built on its own deepcopy of the pristine base",
                        "adapters": "PEFT adapters loaded with autocast_adapter_dtype=False so they run in the "
                                    "model's dtype, like AT-MoE's fused buffers"})
    device_name = torch.cuda.get_device_name(device) if device.type == "cuda" else \
        f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores)"
    result = dict(
        meta=dict(model=cfg.model, device=str(device), device_name=device_name, dtype=str(ctx.dtype).split(".")[-1],
                  threads=torch.get_num_threads(), quick=cfg.quick, experts=cfg.experts, rank=cfg.rank,
                  targets=TARGETS, torch=torch.__version__, transformers=transformers.__version__,
                  peft=peft.__version__, date=time.strftime("%Y-%m-%d %H:%M:%S"),
                  seconds=time.perf_counter() - ctx.started, config=asdict(cfg), note=cfg.note,
                  command=cfg.command, partial=partial),
        sections={**sections, "peers": peers})
    result["checks"] = checks(result)
    return result


def main(argv: list[str] | None = None) -> dict:
    return run(parse_args(argv))


if __name__ == "__main__":
    main()
