"""Where the demo lives and what its build makes: one place, read by the build, the routers, the evaluation, the
demo's command line and the dashboard.

    assets/experts.json              stage 1: the experts trained apart, with their routers (`ROUTERS`)
    assets/coadapted/experts.json    stage 2, shipped: experts and router trained together (`COADAPTED`), then the
                                     router alone on an outside writer's wordings (the `reroute` stage, its record in
                                     reroute.json), then the experts alone on every combination (the `cover` stage,
                                     cover.json); `SHIPPED_MANIFEST`, what `python -m demo` and the dashboard load
                                     by default
    <work>/stay_out/                 the shipped folder, its router given a stay-out head for requests that need no
                                     expert (`ABSTAIN`, the `abstain` stage, not in the default stages:
                                     docs/abstention.md)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from .suite import EXPERT_DESCRIPTIONS

REPO = Path(__file__).resolve().parents[1]
ASSETS = "assets"   # the shipped demo, relative to the repository root (where `make app` and `make assets` run)


def train_bf16() -> bool:
    """Whether the build trains in bf16: only on a CPU that runs bf16 matmuls natively (AVX512-BF16 / AMX). On AVX2
    alone PyTorch's bf16 GEMM falls back to a scalar path: a 1024×576 @ 576×1536 matmul took 1.49 s against 0.032 s
    in fp32 on this project's 2-core machine, and a co-adaptation step 300 s instead of seconds. A GPU trains fp32."""
    import torch

    return not torch.cuda.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


@dataclass
class BuildConfig:
    """What `make assets` builds, and how long it trains."""

    out: str = str(REPO / ASSETS)
    work: str = "runs/demo"                 # generated data and training checkpoints
    base: str | None = None                 # None: the embedded SmolLM2-135M-Instruct
    expert_steps: float = 1.0               # × build.EXPERT_STEPS (a skill's steps grow with how much it must learn)
    expert_batch: int = 8
    expert_lr: float = 3e-3
    router_steps: int = 100
    router_batch: int = 8
    router_lr: float = 5e-3
    eval_n: int = 64
    gate_n: int = 50
    coadapt_steps: int = 300                # over coadapt.jsonl's 2,400 rows: one pass at batch 8
    coadapt_lr: float = 2e-3                # the router's, starting from the shipped stage-1 router
    coadapt_expert_lr: float = 1e-3
    reroute_steps: int = 150                # the shipped router alone, over writer.jsonl (half its 2,400 rows)
    reroute_lr: float = 1e-3
    cover_steps: int = 60                   # the co-adapted experts alone, over cover.jsonl (its 480 rows once)
    cover_experts: tuple[str, ...] = ()     # the experts the cover stage trains (the others stay); () = all six
    stages: tuple[str, ...] = ("suite", "experts", "routers", "coadapt", "reroute", "cover", "eval")
    quick: bool = False
    force: bool = False
    suite_sizes: dict[str, int] = field(default_factory=dict)
    abstain_everyday: int = 480             # everyday training requests (routing-only), 24 from each training family
    abstain_outside: int = 160              # clinical training requests outside the skills, half in each box
    abstain_validation: int = 80            # everyday training-family requests held back to choose the threshold
    abstain_validation_skill: int = 200     # in-skill rows in the router's wider phrasings, for the same choice
    abstain_steps: int = 1000               # the stay-out head's steps (batch 64; seconds on a CPU)

    def __post_init__(self) -> None:
        unknown = set(self.stages) - set(STAGES)
        if unknown:
            raise ValueError(f"unknown stage(s) {sorted(unknown)}; stages are {', '.join(STAGES)}")
        if not self.expert_steps > 0:
            raise ValueError(f"expert_steps must be > 0, got {self.expert_steps}")
        for k in ("expert_batch", "router_steps", "router_batch", "coadapt_steps", "reroute_steps", "cover_steps",
                  "eval_n", "gate_n", "abstain_everyday", "abstain_outside", "abstain_steps",
                  "abstain_validation_skill"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be >= 1, got {getattr(self, k)}")
        unknown = set(self.cover_experts) - set(EXPERT_DESCRIPTIONS)
        if unknown:
            raise ValueError(f"cover_experts: unknown expert(s) {sorted(unknown)}; the experts are "
                             f"{', '.join(EXPERT_DESCRIPTIONS)}")
        if not 0 <= self.abstain_validation < self.abstain_everyday:
            raise ValueError(f"abstain_validation must be in [0, abstain_everyday), got {self.abstain_validation}")
        if self.quick:
            self.suite_sizes = {"n_expert": 16, "n_gate": 4, "n_router": 24, "n_coadapt": 24, "n_writer": 24,
                                "n_cover": 24, "n_eval": 8, "n_abstain_everyday": 8, "n_abstain_outside": 4}
            self.gate_n, self.eval_n = 4, 8
            self.abstain_everyday, self.abstain_outside = 8, 4
            self.abstain_validation, self.abstain_validation_skill, self.abstain_steps = 2, 4, 20


# the default: all but "abstain"
STAGES = ("suite", "experts", "routers", "coadapt", "reroute", "cover", "eval", "abstain")


# Routers the demo trains: (name in the table, mode, file). The manifest's default is the first.
ROUTERS = (("grouped_sigmoid", "sigmoid", "router.safetensors"),
           ("grouped_softmax", "softmax", "routers/softmax.safetensors"),
           ("flat_router", "flat", "routers/flat.safetensors"))


@dataclass(frozen=True)
class Coadapted:
    """A second-stage variant: experts and router trained together, starting from the stage-1 experts and the
    stage-1 router `init` (a file under `out`). The shipped one lives in `out/folder`, the others in `work/folder`."""

    name: str
    mode: str
    init: str
    folder: str
    shipped: bool = False
    pooling: str = "mean"

    def path(self, cfg: BuildConfig) -> Path:
        return Path(cfg.out if self.shipped else cfg.work) / self.folder


# Layer-wise routing of the experts trained apart was measured short of composing them (issue 10), so the demo
# co-adapts: the grouped-sigmoid variant ships (the dashboard's default); the flat one is its ablation (no groups).
# Both pool the instruction with a learnt attention per group, starting from their stage-1 (mean-pooling) router;
# the mean-pooling variants are kept, with every answer, in assets/eval/ablations/.
COADAPTED = (Coadapted("coadapted_attention", "sigmoid", "router.safetensors", "coadapted", shipped=True,
                       pooling="attention"),
             Coadapted("coadapted_flat_attention", "flat", "routers/flat.safetensors", "coadapted_flat_attention",
                       pooling="attention"))


# The dashboard's line for granularity "token" (docs/abstention.md): the shipped router was trained on whole prompts.
TOKEN_MODE_NOTE = ("The shipped router is trained for sequence routing; token mode is an analysis view of the same "
                   "router, token by token, not a way to answer: its answers can lose the skills (flags, bullets).")

# The shipped router with a stay-out head for requests that need no expert (issue 24): built in the work folder from
# the shipped one, and measured (demo/abstention.py) before its router may ship.
ABSTAIN = Coadapted("stay_out", "sigmoid", "coadapted/router.safetensors", "stay_out", pooling="attention")

SHIPPED = next(v for v in COADAPTED if v.shipped)
SHIPPED_MANIFEST = f"{ASSETS}/{SHIPPED.folder}/experts.json"   # the demo's default model: CLI and dashboard
STAGE1_MANIFEST = f"{ASSETS}/experts.json"                     # the paper's recipe: experts trained apart
