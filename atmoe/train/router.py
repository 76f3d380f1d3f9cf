"""Train the AT-MoE router: base model and experts frozen, only the per-layer routers learn.
With `--train-experts` (co-adaptation, a second stage): the experts' LoRA pairs learn with it, on the same loss, and
are written as standard PEFT adapters with their router and a manifest naming both; add `--freeze-router` (with
`--init-router`) and only the experts learn, under that router as it is; `--train-only E …` and only those experts.

    loss = LM loss on the answers                        (learns *where* in depth each expert acts)
         + aux_weight     · label loss on the experts a row needs, where rows are labelled (*which* experts)
         + balance_weight · KL(batch-mean β of each group ‖ uniform)     (keeps every expert in use)

The label loss judges a group's routing over all layers at once (see `routing_losses`), so it never fights the LM
loss over the layer profile. Trained with the Hugging Face `Trainer` (resume, logging, accelerate), optionally with
gradient checkpointing.

    python -m atmoe.train.router --manifest assets/experts.json --data runs/suite/router_train.jsonl
    python -m atmoe.train.router --nproc-per-node N ...         # data parallel: N processes, batch_size rows each
    torchrun --nproc_per_node N -m atmoe.train.router ...      # the same, started by hand (launch.py: the difference)

Data parallel, the update is the one-process update on the global batch (N × batch_size rows): every loss is
normalised by global counts (answer tokens, labelled rows) and the balance term reads the global batch-mean β, so
each process's loss is N × its share and DDP's gradient average is the global gradient (`tests/test_distributed.py`).
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.nn.functional as F
from accelerate import PartialState
from torch import nn
from transformers import Trainer, TrainingArguments

from ..call import RoutingCall
from ..cliargs import dataclass_parser
from ..load.files import atomic_write_bytes
from ..load.manifest import ExpertEntry, GroupEntry, Manifest
from ..fused import contiguous_state
from ..model import ATMoE, enable_gradient_checkpointing, forward_routed, new_router, save_experts
from ..model import expert as expert_details
from ..router import GroupedRouter, MODES, POOLINGS, load_router, save_router
from .checkpoints import resume_point
from .data import PadCollator, encode_dataset, load_jsonl
from .expert import OUT_DTYPES, process_device
from .launch import run_command


@dataclass
class RouterTrainConfig:
    manifest: str
    data: str
    out: str | None = None             # default: router.safetensors next to the manifest (and the manifest updated)
    base: str | None = None
    mode: str = "softmax"
    temperature: float = 1.0
    reads: str = "instruction"         # the router pools the instruction's tokens, or the whole "prompt"
    pooling: str = "mean"              # "mean" | "last" | "attention" (a learnt query per layer and group)
    steps: int = 100
    batch_size: int = 8
    lr: float = 5e-3
    warmup_ratio: float = 0.1
    max_length: int = 256
    aux_weight: float = 1.0
    balance_weight: float = 0.01
    pool_dropout: float = 0.0          # training only: drop this share of the tokens the router pools (≥ 1 kept)
    gradient_checkpointing: bool = False
    shard_base: bool = False           # FSDP2: each of N processes holds 1/N of the frozen base (distributed.py)
    bf16: bool = False                 # bf16 autocast (faster on CPUs with AVX512-BF16 and on GPUs; router fp32)
    resume: bool = True                # relaunching resumes from the last complete checkpoint (checkpoints.py)
    seed: int = 0
    logging_steps: int = 5
    save_steps: int = 25
    checkpoints: str | None = None     # default: <out>.checkpoints/
    update_manifest: bool = True
    init_router: str | None = None     # start from this router's weights (e.g. stage 1's) instead of small random ones
    train_experts: bool = False        # co-adaptation: the experts' LoRA pairs train too, at expert_lr
    freeze_router: bool = False        # co-adaptation: only the experts train; the router stays as `init_router`
    train_only: tuple[str, ...] = ()   # co-adaptation: only these experts' pairs train (the others stay as loaded)
    expert_lr: float = 5e-4
    experts_out: str | None = None     # co-adaptation: experts, router and manifest go here (<manifest>/coadapted)
    experts_dtype: str = "float16"     # co-adaptation: the stored experts' dtype (as `train_expert --dtype-out`)

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {self.mode!r}")
        if self.pooling not in POOLINGS:
            raise ValueError(f"pooling must be one of {POOLINGS}, got {self.pooling!r}")
        for k in ("steps", "batch_size", "max_length", "logging_steps", "save_steps"):
            if getattr(self, k) < 1:
                raise ValueError(f"{k} must be ≥ 1, got {getattr(self, k)}")
        if not self.lr > 0 or self.aux_weight < 0 or self.balance_weight < 0:
            raise ValueError("lr must be > 0 and the loss weights ≥ 0")
        if not 0 <= self.pool_dropout < 1:
            raise ValueError(f"pool_dropout must be in [0, 1), got {self.pool_dropout}")
        if self.freeze_router and not (self.train_experts and self.init_router):
            raise ValueError("freeze_router needs train_experts and an init_router: otherwise nothing trains, or the "
                             "router stays random")
        if self.train_only and not self.train_experts:
            raise ValueError("train_only names experts to train: it needs train_experts")
        if self.experts_dtype not in OUT_DTYPES:
            raise ValueError(f"experts_dtype must be one of {sorted(OUT_DTYPES)}, got {self.experts_dtype!r}")
        if self.train_experts:
            self.experts_out = self.experts_out or str(Path(self.manifest).parent / "coadapted")
            self.update_manifest = False   # the source manifest's experts are not the ones this router is trained for
        if self.out is None:
            self.out = str(Path(self.experts_out if self.train_experts else Path(self.manifest).parent)
                           / "router.safetensors")
        if self.checkpoints is None:
            self.checkpoints = str(Path(self.out).with_suffix(".checkpoints"))


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _SumOverProcesses(torch.autograd.Function):
    """All-reduce (sum) with a backward that sums the processes' gradients: a term computed from the sum, identical
    on every process, then gets N × its gradient on each, and DDP's average of the N gradients is its own."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor) -> torch.Tensor:  # noqa: ANN401
        x = x.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(x)
        return x

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> torch.Tensor:  # noqa: ANN401
        grad = grad.clone(memory_format=torch.contiguous_format)
        dist.all_reduce(grad)
        return grad


def sum_over_processes(x: torch.Tensor) -> torch.Tensor:
    """Σ of `x` over the data-parallel processes (itself in one process), differentiable."""
    return _SumOverProcesses.apply(x) if world_size() > 1 else x


def routing_losses(router: GroupedRouter, call: RoutingCall, expert_labels: torch.Tensor, labelled: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(aux, balance). expert_labels [B, E] multi-hot; labelled [B] (False: the row has no labels at all).
    Data parallel, both are taken over the global batch: aux is this process's rows' share of the mean over all
    processes' scored rows, balance the KL of the β averaged over every process's rows (the same on each).

    The group labels judge each group's routing over all layers at once, never layer by layer: a per-layer target
    would pull every layer to the same weight and erase the layer profile that composition needs (style on the top
    layers, the task below), which the LM loss is left free to learn. Sigmoid gates: the layer-max gate of a needed
    group → 1, every layer's gate of an unneeded group → 0 (its max → 0; a row needing no expert turns all off).
    Softmax / flat (a shared budget): the layer-mean weights → the needed groups (experts) equally. Within a needed
    group, the labelled expert's β at every layer → 1 (which expert a group uses should not flip between layers)."""
    cfg, slices = router.config, router.layout.slices
    needed = torch.stack([expert_labels[:, s].amax(-1) for s in slices], -1)                  # [B, G]
    alpha, beta = call.stacked("alpha"), call.stacked("beta")                                 # [L, B, G], [L, B, E]
    if cfg.mode == "sigmoid":
        group_loss = F.binary_cross_entropy(alpha.amax(0).clamp(1e-6, 1 - 1e-6), needed, reduction="none").mean(-1)
        rows = labelled
    elif cfg.mode == "softmax":
        target = needed / needed.sum(-1, keepdim=True).clamp(min=1)
        group_loss = -(target * alpha.mean(0).clamp(min=1e-9).log()).sum(-1)
        rows = labelled & (needed.sum(-1) > 0)   # a budget that sums to 1 cannot turn every group off
    else:  # flat: one distribution over all experts
        w = (alpha[..., router.group_index] * beta).mean(0)
        target = expert_labels / expert_labels.sum(-1, keepdim=True).clamp(min=1)
        group_loss = -(target * w.clamp(min=1e-9).log()).sum(-1)
        rows = labelled & (needed.sum(-1) > 0)
    within = torch.zeros_like(group_loss)
    if cfg.mode != "flat":
        for gi, s in enumerate(slices):
            t = expert_labels[:, s] / expert_labels[:, s].sum(-1, keepdim=True).clamp(min=1)
            within = within + needed[:, gi] * -(t * beta[..., s].clamp(min=1e-9).log()).sum(-1).mean(0)
    aux = ((group_loss + within) * rows).sum() / sum_over_processes(rows.sum()).clamp(min=1)
    n_rows = sum_over_processes(beta.new_tensor(beta.shape[1]))
    balance = []
    for s in slices:
        if s.stop - s.start > 1:
            p = sum_over_processes(beta[..., s].sum(1)) / n_rows                               # [L, |g|] global mean
            balance.append((p * (p.clamp(min=1e-9) * p.shape[-1]).log()).sum(-1).mean())
    return aux, (torch.stack(balance).sum() if balance else beta.new_zeros(()))


class RouterTrainingModule(nn.Module):
    """What the Trainer sees: only the router (and, co-adapting, the experts' pairs) — so only they are optimised
    and checkpointed."""

    accepts_loss_kwargs = False  # the Trainer must not rescale the loss: `forward` normalises over processes itself

    def __init__(self, m: ATMoE, router: GroupedRouter, aux_weight: float, balance_weight: float,
                 experts: list[nn.Parameter] | None = None, pool_dropout: float = 0.0) -> None:
        super().__init__()
        self.router, self.pool_dropout = router, pool_dropout
        if experts:  # co-adaptation: the fused layers' LoRA pairs (shared with them, trained in place)
            self.experts = nn.ParameterList(experts)
            self._register_state_dict_hook(contiguous_state)   # co-adapted pairs are views (fused.py)
        self.__dict__["atmoe"] = m  # plain attribute: the frozen base is not part of this module's state
        self.aux_weight, self.balance_weight = aux_weight, balance_weight

    def train(self, mode: bool = True) -> RouterTrainingModule:
        self.atmoe.model.train(mode)  # gradient checkpointing only runs in training mode
        return super().train(mode)

    def gradient_checkpointing_enable(self, gradient_checkpointing_kwargs: dict | None = None, **_: Any) -> None:
        """Called by the Trainer; our own kwargs replace its (the recompute must re-enter the routing call)."""
        enable_gradient_checkpointing(self.atmoe)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, labels: torch.Tensor,
                prompt_mask: torch.Tensor, instruction_mask: torch.Tensor, expert_labels: torch.Tensor,
                labelled: torch.Tensor) -> dict[str, torch.Tensor]:
        """Data parallel, each term is this process's share of the global batch's value (tokens and rows counted
        over every process), times N: DDP averages the N gradients, so the step is the global batch's."""
        if self.training and self.pool_dropout > 0:
            prompt_mask, instruction_mask = (drop_tokens(mask, self.pool_dropout) for mask in (prompt_mask,
                                                                                               instruction_mask))
        out, call = forward_routed(self.atmoe, input_ids, attention_mask, prompt_mask, instruction_mask=instruction_mask,
                                   router=self.router, use_cache=False, gate_floor=0.0)
        targets = labels[:, 1:]                                   # position t predicts token t + 1
        n_tokens = sum_over_processes((targets != -100).sum()).clamp(min=1)
        lm = F.cross_entropy(out.logits[:, :-1].flatten(0, 1).float(), targets.flatten(), ignore_index=-100,
                             reduction="sum") / n_tokens
        aux, balance = routing_losses(self.router, call, expert_labels.float(), labelled.bool())
        n = world_size()
        loss = n * (lm + self.aux_weight * aux) + self.balance_weight * balance
        return {"loss": loss, "lm_loss": n * lm.detach(), "aux_loss": n * aux.detach()}


def drop_tokens(mask: torch.Tensor, p: float) -> torch.Tensor:
    """`mask` [B, T] with each set token dropped with probability p; a row that would lose them all keeps them.
    Word dropout for the router's pool: no single cue word may carry a decision (wordings it never saw)."""
    kept = mask.bool() & (torch.rand(mask.shape, device=mask.device) >= p)
    kept = torch.where(kept.any(-1, keepdim=True), kept, mask.bool())
    return kept.to(mask.dtype)


class _RouterTrainer(Trainer):
    """The HF Trainer, also logging the LM and routing parts of the loss."""

    def __init__(self, *args: Any, expert_lr: float | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._parts: list[tuple[float, float]] = []
        self.expert_lr = expert_lr

    def create_optimizer(self, *args: Any, **kwargs: Any) -> torch.optim.Optimizer:
        """AdamW, with the experts (when co-adapting) in their own group at their own learning rate."""
        if self.optimizer is None:
            router = [p for p in self.model.router.parameters() if p.requires_grad]   # none: frozen
            groups = [{"params": router, "lr": self.args.learning_rate}] if router else []
            if hasattr(self.model, "experts"):
                groups.append({"params": list(self.model.experts), "lr": self.expert_lr})
            self.optimizer = torch.optim.AdamW(groups, lr=self.args.learning_rate, weight_decay=0.0)
        return self.optimizer

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):  # noqa: ANN001
        out = model(**inputs)
        self._parts.append((float(out["lm_loss"]), float(out["aux_loss"])))
        return (out["loss"], out) if return_outputs else out["loss"]

    def log(self, logs: dict[str, float], *args: Any, **kwargs: Any) -> None:
        if self._parts and "loss" in logs:  # every process logs at the same steps: average the parts over them
            parts = torch.tensor(self._parts, device=self.args.device).mean(0)
            logs["lm_loss"], logs["aux_loss"] = self.accelerator.reduce(parts, "mean").tolist()
            self._parts.clear()
        super().log(logs, *args, **kwargs)


@dataclass
class _Collator:
    pad: PadCollator
    experts: list[str]

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.pad(features)
        labels = torch.zeros(len(features), len(self.experts))
        for i, f in enumerate(features):
            for e in f["experts"] or []:
                labels[i, self.experts.index(e)] = 1.0
        batch["expert_labels"] = labels
        batch["labelled"] = torch.tensor([f["experts"] is not None for f in features])
        return batch


def train_router(cfg: RouterTrainConfig, m: ATMoE | None = None) -> tuple[Path, list[dict[str, float]]]:
    """Train a router for `cfg.manifest`'s experts; returns (router path, the Trainer's log history)."""
    if m is None and cfg.shard_base:
        from .distributed import load_sharded
        m = load_sharded(cfg.manifest, cfg.base, device=process_device())
    m = m or ATMoE.load(cfg.manifest, base=cfg.base, device=process_device())
    examples = load_jsonl(cfg.data)
    unknown = sorted({e for ex in examples for e in ex.experts or []} - set(m.experts))
    if unknown:
        raise ValueError(f"{cfg.data}: expert labels {unknown} are not experts of this model ({m.experts})")
    features, n_truncated = encode_dataset(m.tokenizer, examples, cfg.max_length)
    for f, ex in zip(features, examples):
        f["experts"] = ex.experts
    print(f"router training: {len(features)} rows ({n_truncated} answers truncated to {cfg.max_length} tokens)")
    torch.manual_seed(cfg.seed)
    router = new_router(m, mode=cfg.mode, temperature=cfg.temperature, reads=cfg.reads, pooling=cfg.pooling)
    if cfg.init_router:
        start = load_router(cfg.init_router, expected=router.config)
        was, now = start.config, router.config
        if (was.mode, was.reads) != (now.mode, now.reads) or was.pooling not in (now.pooling, "mean"):
            raise ValueError(f"--init-router {cfg.init_router} is a {was.mode} router reading the {was.reads} "
                             f"({was.pooling} pooling); this run trains a {now.mode} router reading the {now.reads} "
                             f"({now.pooling} pooling)")
        if was.stay_out:   # the head reads the input embeddings only, so training the gates leaves it as valid: kept
            router = new_router(m, mode=cfg.mode, temperature=cfg.temperature, reads=cfg.reads, pooling=cfg.pooling,
                                stay_out=True, stay_out_threshold=was.stay_out_threshold)
        # a mean-pooling start for an attention router: its queries stay zero, i.e. the same router to begin with
        router.load_state_dict(start.state_dict(), strict=was.pooling == now.pooling)
    else:
        with torch.no_grad():  # small random heads: zero heads give identical gradients to every expert of a group
            router.group_weight.normal_(0, 0.01)
            router.expert_weight.normal_(0, 0.01)
    experts = [p for layer in m.fused for p in layer.unfreeze_experts()] if cfg.train_experts else None
    if cfg.train_only:
        _train_only(m, cfg.train_only)
    module = RouterTrainingModule(m, router.requires_grad_(not cfg.freeze_router), cfg.aux_weight, cfg.balance_weight,
                                  experts, cfg.pool_dropout)
    args = TrainingArguments(
        output_dir=cfg.checkpoints, max_steps=cfg.steps, per_device_train_batch_size=cfg.batch_size,
        learning_rate=cfg.lr, lr_scheduler_type="cosine", warmup_steps=max(1, round(cfg.warmup_ratio * cfg.steps)),
        weight_decay=0.0,
        logging_steps=cfg.logging_steps, save_strategy="steps", save_steps=cfg.save_steps, save_total_limit=1,
        seed=cfg.seed, data_seed=cfg.seed, report_to=[], remove_unused_columns=False, dataloader_num_workers=0,
        gradient_checkpointing=cfg.gradient_checkpointing, use_cpu=m.device.type == "cpu", bf16=cfg.bf16,
        ddp_find_unused_parameters=cfg.mode == "flat",  # only a flat router leaves parameters (its group heads) unused
    )
    pad = m.tokenizer.pad_token_id if m.tokenizer.pad_token_id is not None else m.tokenizer.eos_token_id
    trainer = _RouterTrainer(model=module, args=args, train_dataset=features, expert_lr=cfg.expert_lr,
                             data_collator=_Collator(PadCollator(pad, with_prompt_mask=True), m.experts))
    trainer.train(resume_from_checkpoint=resume_point(cfg.checkpoints, cfg.resume))
    router.trained = True
    module.requires_grad_(False)
    path, state = Path(cfg.out), PartialState()
    state.wait_for_everyone()
    if state.is_main_process:  # data parallel, every process holds the same router: one writes, the others wait
        if cfg.train_experts:  # the experts first: the manifest naming them and the router is written last
            save_experts(m, Path(cfg.experts_out) / "experts", {"coadapted": {
                "with_router": Path(path).name, "data": cfg.data, "steps": cfg.steps, "expert_lr": cfg.expert_lr}},
                OUT_DTYPES[cfg.experts_dtype])
        path = save_router(router, path)
        log = "".join(json.dumps(entry) + "\n" for entry in trainer.state.log_history)
        atomic_write_bytes(Path(path).with_suffix(".log.jsonl"), log.encode())  # the loss log, next to the router
        if cfg.train_experts:
            coadapted_manifest(m, Path(cfg.experts_out), path).save(Path(cfg.experts_out) / "experts.json")
        if cfg.update_manifest and m.manifest is not None:
            m.manifest.router = str(Path(path).resolve().relative_to(m.manifest.root.resolve()))
            m.manifest.save(m.manifest.path or m.manifest.root / "experts.json")
        shutil.rmtree(cfg.checkpoints, ignore_errors=True)  # only needed to resume an interrupted run
    state.wait_for_everyone()
    return path, trainer.state.log_history


def _train_only(m: ATMoE, names: tuple[str, ...]) -> None:
    """Zero, in every fused module, the gradient of each rank that belongs to an expert not in `names`: with no
    gradient and no weight decay, AdamW leaves those ranks exactly as loaded."""
    unknown = sorted(set(names) - set(m.experts))
    if unknown:
        raise ValueError(f"train_only: {', '.join(unknown)} not among the experts ({', '.join(m.experts)})")
    wanted = torch.tensor([m.experts.index(n) for n in names])
    for layer in m.fused:
        keep = torch.isin(layer.rank_expert, wanted.to(layer.rank_expert.device))
        layer.lora_A.register_hook(lambda g, k=keep: g * k[:, None].to(g.dtype))    # A [R, I]
        layer.lora_B.register_hook(lambda g, k=keep: g * k[None, :].to(g.dtype))    # B [O, R]


def coadapted_manifest(m: ATMoE, root: Path, router: Path) -> Manifest:
    """The manifest of co-adapted experts (`root/experts/<name>`) and their router: same groups, base and order."""
    src = m.manifest
    base = src.base_model if src else None
    if base and not Path(base).is_absolute() and (src.root / base).is_dir():  # a base folder beside the source
        base = str(src.resolve(base, "base model"))
    values = {e.name: e.values for _, e in src.experts} if src else {}
    return Manifest(
        [GroupEntry(g, [ExpertEntry(e, f"experts/{e}", description=expert_details(m, e).description,
                                    values=values.get(e)) for e in m.layout.experts_of(g)]) for g in m.groups],
        base_model=base, base_signature=src.base_signature if src else None,
        description=((src.description + " — " if src and src.description else "") + "co-adapted with its router"),
        router=str(Path(router).resolve().relative_to(root.resolve())), root=root)


def main(argv: list[str] | None = None) -> None:
    """`python -m atmoe.train.router` (see `launch.py` for `--nproc-per-node` and refusals)."""
    parser = dataclass_parser(RouterTrainConfig, "Train an AT-MoE router (base and experts frozen).")
    run_command("atmoe train-router", "atmoe.train.router", argv,
                lambda args: RouterTrainConfig(**vars(parser.parse_args(args))),
                lambda cfg: f"router written to {train_router(cfg)[0]}")


if __name__ == "__main__":
    main()


__all__ = ["RouterTrainConfig", "RouterTrainingModule", "routing_losses", "train_router"]
