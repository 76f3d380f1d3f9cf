"""How much of an answer each expert wrote: the answer's log-probability with an expert (or a whole group) removed on
a layer range, teacher-forced on the same answer, against the answer as it was routed.

    a = attribute(m, "List the lab results", input=note, answer=g.token_ids,
                  targets=["expert:labs", "group:style"], ranges=layer_ranges(m.num_layers, 3))
    a.delta      [K, R, T]  Δ log p of each answer token, target k removed on range r (ablated − as routed)
    a.total      [K, R]     Δ log p(answer), the sum over the answer's tokens
    a.estimate   [K, R]     first-order estimate Σ_l Σ_e ∂log p/∂w[l, e] · Δw[l, e]   (first_order=True)

Removing is the overrides' `disabled` on that range (see overrides.py): the removed expert's weight is 0 and the other
experts of its group share its β in proportion; a group whose experts are all removed is switched off (in a softmax
budget the other groups share its α). It is exactly `Overrides(disabled=[...], layers=range)`, what a user sets.

Teacher forcing: prompt + answer in one forward per ablation (rows of a data set batched together, right-padded so
that every real token keeps its position). The router reads the prompt's tokens (its instruction) as generation
does; in a causal model the prompt's hidden states never see the answer, so the routing is the generation's.
`ATMoE.score` reads every token it is given, the answer too; `reads="all"` reproduces that.

The first-order estimate differentiates the answer's log-prob with respect to the weights w = α·β each layer used
(one backward pass, through a trainable copy of the router so that w is part of the graph) and multiplies by the
change the removal makes to w given the router's proposal (`CompiledOverrides.apply`). It ignores how later routers
react to earlier changes; `agreement` says how well it tracks the exact ablation.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from ..model import encode_prompt, forward_routed
from ..overrides import Overrides
from ..tokens import EncodedPrompt, token_labels
from ..trace import RoutingTrace

if TYPE_CHECKING:
    from ..model import ATMoE

Range = tuple[int, int]
READS = ("prompt", "all")


@dataclass
class Attribution:
    """The attribution of one answer: targets (rows) × layer ranges (columns) × answer tokens."""

    targets: list[str]            # "expert:<e>" | "group:<g>"
    ranges: list[Range]           # inclusive layer ranges
    tokens: list[str]             # the answer's token labels
    logprobs: np.ndarray          # [T] log p of each answer token as routed
    delta: np.ndarray             # [K, R, T] ablated − as routed
    estimate: np.ndarray | None = None   # [K, R] first-order estimate of `total`

    @property
    def total(self) -> np.ndarray:
        """[K, R] Δ log p(answer)."""
        return self.delta.sum(-1)

    def agreement(self) -> dict[str, float]:
        """How the first-order estimate tracks the exact Δ over this answer's (target, range) cells."""
        if self.estimate is None:
            raise ValueError("no first-order estimate: call attribute(..., first_order=True)")
        return agreement(self.total.ravel(), self.estimate.ravel())

    def to_frame(self) -> pd.DataFrame:
        """One row per (target, range): `target, first, last, delta, delta_per_token[, estimate]`."""
        rows = []
        T = max(len(self.tokens), 1)
        for k, target in enumerate(self.targets):
            for r, (a, b) in enumerate(self.ranges):
                row = {"target": target, "first": a, "last": b, "delta": float(self.total[k, r]),
                       "delta_per_token": float(self.total[k, r]) / T}
                if self.estimate is not None:
                    row["estimate"] = float(self.estimate[k, r])
                rows.append(row)
        return pd.DataFrame(rows)


def layer_ranges(num_layers: int, parts: int = 1) -> list[Range]:
    """`parts` contiguous inclusive ranges covering every layer, as equal as possible."""
    if not 1 <= parts <= num_layers:
        raise ValueError(f"parts must be in 1..{num_layers}, got {parts}")
    edges = np.linspace(0, num_layers, parts + 1).round().astype(int)
    return [(int(a), int(b) - 1) for a, b in zip(edges[:-1], edges[1:])]


def removal(m: ATMoE, target: str, layers: Range, base: Overrides | None = None) -> Overrides:
    """The overrides that remove `target` ("expert:<e>" | "group:<g>") on `layers`, on top of the answer's own
    overrides `base`. An `Overrides` holds one layer range, so `base` must cover the same layers (or be empty)."""
    level, name = m.layout.parse_target(target)
    removed = m.layout.experts_of(name) if level == "group" else [name]
    base = base or Overrides()
    if not base.is_empty() and _span(m, base.layers) != _span(m, layers):
        raise ValueError(f"the answer's overrides apply to layers {_span(m, base.layers)}; a removal on {layers} "
                         "cannot be combined with them (an Overrides holds one layer range)")
    zero = [e for e, v in base.experts.items() if v == 0]    # fixed at 0 is disabled: both give it no weight
    return Overrides(groups={g: v for g, v in base.groups.items() if not (level == "group" and g == name)},
                     experts={e: v for e, v in base.experts.items() if e not in removed and v != 0},
                     disabled=list(dict.fromkeys([*base.disabled, *zero, *removed])), layers=tuple(layers))


def _span(m: ATMoE, layers: Sequence[int] | None) -> Range:
    return (0, m.num_layers - 1) if layers is None else (int(layers[0]), int(layers[1]))


def _batch(m: ATMoE, rows: Sequence[tuple[EncodedPrompt, list[int]]], reads: str
           ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Right-padded prompt + answer → input_ids, attention_mask, read_mask, instruction_mask [B, W]."""
    width = max(len(p.ids) + len(a) for p, a in rows)
    pad = m.tokenizer.pad_token_id if m.tokenizer.pad_token_id is not None else 0
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask, read, instruction = (torch.zeros((len(rows), width), dtype=torch.long) for _ in range(3))
    for b, (p, a) in enumerate(rows):
        n = len(p.ids) + len(a)
        ids[b, :n] = torch.tensor(p.ids + list(a))
        mask[b, :n] = 1
        read[b, :n if reads == "all" else len(p.ids)] = 1
        instruction[b, p.instruction[0]:p.instruction[1]] = 1
    dev = m.device
    return ids.to(dev), mask.to(dev), read.to(dev), (instruction.to(dev) if reads == "prompt" else None)


def _answer_logprobs(m: ATMoE, rows: Sequence[tuple[EncodedPrompt, list[int]]], overrides: Overrides | None,
                     reads: str, granularity: str | None, router: Any = None) -> tuple[list[torch.Tensor], Any]:
    """One teacher-forced forward of `rows` → per row the log-prob of each answer token [T_b], and the call."""
    ids, mask, read, instruction = _batch(m, rows, reads)
    out, call = forward_routed(m, ids, mask, read, instruction_mask=instruction, overrides=overrides, router=router,
                                 granularity=granularity, use_cache=False)
    logprobs = []
    for b, (p, a) in enumerate(rows):
        n = len(p.ids)
        logits = out.logits[b, n - 1:n - 1 + len(a)].float()     # position t predicts token t + 1
        target = ids[b, n:n + len(a)]
        logprobs.append(logits.log_softmax(-1).gather(-1, target[:, None])[:, 0])
    return logprobs, call


def _encode(m: ATMoE, prompt: str, input: str, answer: Sequence[int]) -> tuple[EncodedPrompt, list[int]]:
    p = encode_prompt(m, prompt, input)
    answer = [int(t) for t in answer]
    if not answer:
        raise ValueError("the answer is empty: nothing to attribute")
    if len(p.ids) + len(answer) > m.context_length:
        raise ValueError(f"prompt and answer are {len(p.ids) + len(answer)} tokens, more than the model's context "
                         f"({m.context_length})")
    return p, answer


def attribute_rows(m: ATMoE, prompts: Sequence[str], answers: Sequence[Sequence[int]], *,
                   inputs: Sequence[str] | None = None, targets: Sequence[str] | None = None,
                   ranges: Sequence[Range] | None = None, overrides: Overrides | None = None,
                   first_order: bool = False, reads: str = "prompt", granularity: str | None = None,
                   batch_size: int = 8, progress: Callable[[int, int], None] | None = None) -> list[Attribution]:
    """`attribute` for many answers: per chunk of `batch_size` rows, one forward as routed and one per
    (target, range). `answers[i]`: the answer's token ids (e.g. `Generation.token_ids`); `overrides`: the ones the
    answers were generated with (the same for every row). `progress(done, total)` is called after each chunk."""
    if reads not in READS:
        raise ValueError(f"reads must be one of {READS}, got {reads!r}")
    targets = list(targets) if targets is not None else [f"expert:{e}" for e in m.experts]
    ranges = [tuple(r) for r in (ranges if ranges is not None else [(0, m.num_layers - 1)])]
    if not targets or not ranges:
        raise ValueError("give at least one target and one layer range")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    inputs = list(inputs) if inputs is not None else [""] * len(prompts)
    rows = [_encode(m, p, i, a) for p, i, a in zip(prompts, inputs, answers, strict=True)]
    m.check_overrides(overrides)
    base = overrides if overrides is not None and not overrides.is_empty() else None
    ablations = [[removal(m, t, r, base) for r in ranges] for t in targets]   # checked before any forward
    for row in ablations:
        for ov in row:
            m.check_overrides(ov)
    results = []
    with torch.inference_mode():
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            as_routed, _ = _answer_logprobs(m, chunk, base, reads, granularity)
            deltas = [[_answer_logprobs(m, chunk, ov, reads, granularity)[0] for ov in row] for row in ablations]
            for b, (_, answer) in enumerate(chunk):
                delta = np.array([[(d[b] - as_routed[b]).cpu().numpy() for d in row] for row in deltas],
                                 dtype=np.float64)                                              # [K, R, T]
                results.append(Attribution(targets, list(ranges), token_labels(m.tokenizer, answer),
                                           as_routed[b].cpu().numpy().astype(np.float64), delta))
            if progress is not None:
                progress(min(start + batch_size, len(rows)), len(rows))
    if first_order:
        for a, row in zip(results, rows):
            a.estimate = _first_order(m, row, base, [ov for r in ablations for ov in r], reads,
                                      granularity).reshape(len(targets), len(ranges))
    return results


def attribute(m: ATMoE, prompt: str, answer: Sequence[int], *, input: str = "", targets: Sequence[str] | None = None,
              ranges: Sequence[Range] | None = None, overrides: Overrides | None = None, first_order: bool = False,
              reads: str = "prompt", granularity: str | None = None) -> Attribution:
    """Δ log p of `answer` (token ids, e.g. `Generation.token_ids`) when each target is removed on each layer
    range. `targets` default to every expert, `ranges` to the whole model; `overrides`: the answer's own."""
    return attribute_rows(m, [prompt], [answer], inputs=[input], targets=targets, ranges=ranges, overrides=overrides,
                          first_order=first_order, reads=reads, granularity=granularity)[0]


def first_order(m: ATMoE, prompt: str, answer: Sequence[int], changes: Sequence[Overrides], *, input: str = "",
                overrides: Overrides | None = None, reads: str = "prompt", granularity: str | None = None
                ) -> np.ndarray:
    """[n] first-order estimates of Δ log p(answer) for each override in `changes` (each replacing the answer's own
    `overrides`): Σ_l Σ_e ∂log p/∂w[l, e] · (w_change − w)[l, e], w given the router's proposal. One forward and one
    backward, whatever the number of changes."""
    row = _encode(m, prompt, input, answer)
    base = overrides if overrides is not None and not overrides.is_empty() else None
    return _first_order(m, row, base, list(changes), reads, granularity)


def _first_order(m: ATMoE, row: tuple[EncodedPrompt, list[int]], base: Overrides | None,
                 changes: list[Overrides], reads: str, granularity: str | None) -> np.ndarray:
    router = copy.deepcopy(m.router).requires_grad_(True)   # w becomes part of the graph; the shared one is frozen
    compiled = [m.check_overrides(ov, router) for ov in [base, *changes]]
    with torch.enable_grad():
        logprobs, call = _answer_logprobs(m, [row], base, reads, granularity, router=router)
        grads = torch.autograd.grad(logprobs[0].sum(), list(call.weights))  # per layer [1, 1 | T, E]
    grad = torch.stack([g[0] for g in grads]).detach().float()               # [L, N, E]
    alpha = call.stacked("router_alpha")[:, 0].detach()                     # [L, G] or [L, T, G]
    beta = call.stacked("router_beta")[:, 0].detach()                       # [L, E] or [L, T, E]
    index = torch.as_tensor(m.layout.group_index, device=alpha.device)

    def used(ov: Any) -> torch.Tensor:                                       # → w [L, N, E] under `ov`
        per_layer = []
        for layer in range(m.num_layers):
            a, b = (alpha[layer], beta[layer]) if ov is None else ov.apply(layer, alpha[layer], beta[layer])
            per_layer.append((a[..., index] * b).reshape(-1, b.shape[-1]))
        return torch.stack(per_layer).float()

    now = used(compiled[0])
    return np.array([float((grad * (used(ov) - now)).sum()) for ov in compiled[1:]])


@dataclass
class TeacherForced:
    """One answer scored under one routing: what `attribute` compares."""

    logprobs: np.ndarray    # [T] log p of each answer token
    predicted: list[int]    # [T] the most likely token at each answer position (a greedy answer predicts itself)
    trace: Any              # the RoutingTrace of prompt + answer


def teacher_forced(m: ATMoE, prompt: str, answer: Sequence[int], *, input: str = "",
                   overrides: Overrides | None = None, reads: str = "prompt", granularity: str | None = None
                   ) -> TeacherForced:
    """The answer's token log-probs in one forward of prompt + answer, routed as generation routes it
    (`reads="prompt"`) or as `ATMoE.score` does (`reads="all"`)."""
    if reads not in READS:
        raise ValueError(f"reads must be one of {READS}, got {reads!r}")
    p, a = _encode(m, prompt, input, answer)
    with torch.inference_mode():
        ids, mask, read, instruction = _batch(m, [(p, a)], reads)
        out, call = forward_routed(m, ids, mask, read, instruction_mask=instruction, overrides=overrides,
                                     granularity=granularity, use_cache=False)
        logits = out.logits[0, len(p.ids) - 1:len(p.ids) - 1 + len(a)].float().log_softmax(-1)
        logprobs = logits.gather(-1, torch.tensor(a, device=logits.device)[:, None])[:, 0]
        trace = RoutingTrace.from_call(call, 0, p.ids + a, m.layer_names, m.tokenizer)
    return TeacherForced(logprobs.cpu().numpy().astype(np.float64), logits.argmax(-1).tolist(), trace)



def agreement(exact: np.ndarray, estimate: np.ndarray) -> dict[str, float]:
    """Pearson and Spearman correlation and sign agreement between exact Δ and the first-order estimate."""
    x, y = np.asarray(exact, float).ravel(), np.asarray(estimate, float).ravel()

    def corr(u: np.ndarray, v: np.ndarray) -> float:
        if len(u) < 2 or u.std() == 0 or v.std() == 0:
            return float("nan")
        return float(np.corrcoef(u, v)[0, 1])

    def ranks(u: np.ndarray) -> np.ndarray:
        return pd.Series(u).rank().to_numpy()

    return {"pearson": corr(x, y), "spearman": corr(ranks(x), ranks(y)),
            "sign_agreement": float(np.mean(np.sign(x) == np.sign(y))) if len(x) else float("nan"), "cells": len(x)}


def wilson(successes: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """95% Wilson score interval of a rate."""
    if n == 0:
        return float("nan"), float("nan")
    p = successes / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return centre - half, centre + half


def labelled_rate(attributions: Sequence[Attribution], labels: Sequence[Sequence[str]], range_index: int = 0
                  ) -> dict[str, Any]:
    """Over rows whose labelled experts are among the targets and that have an unlabelled expert target: the share
    of rows where removing a labelled expert lowers the answer's log-prob more (mean Δ lower) than removing an
    unlabelled one, and the same over every (labelled, unlabelled) pair. A property of a working model, not an
    identity: an untrained router or experts that learnt nothing score about 0.5."""
    wins = pairs = pair_wins = n = 0
    for a, labelled in zip(attributions, labels, strict=True):
        total = dict(zip(a.targets, a.total[:, range_index]))
        experts = {t.partition(":")[2]: v for t, v in total.items() if t.startswith("expert:")}
        lab = [experts[e] for e in labelled if e in experts]
        unl = [v for e, v in experts.items() if e not in labelled]
        if not lab or not unl:
            continue
        n += 1
        wins += int(np.mean(lab) < np.mean(unl))
        pairs += len(lab) * len(unl)
        pair_wins += sum(x < y for x in lab for y in unl)
    low, high = wilson(wins, n)
    return {"rows": n, "rate": wins / n if n else float("nan"), "interval": (low, high),
            "pairs": pairs, "pair_rate": pair_wins / pairs if pairs else float("nan")}


__all__ = ["Attribution", "TeacherForced", "agreement", "attribute", "attribute_rows", "first_order", "labelled_rate",
           "layer_ranges", "removal", "teacher_forced", "wilson"]
