"""Why did the router choose this: each routing logit split exactly into one term per token the router read.

Shape legend:  L layers · N tokens read (the instruction's, or the prompt's) · D hidden size · G groups · E experts.

At layer l the router pools the hidden states h_t entering l over the tokens it reads (I, |I| = N), normalises the
pooled vector with one RMS scale r, and applies linear heads (see `router.py`):

    p   = (1/N) Σ_{t∈I} h_t                                   pooled hidden state ("mean" pooling)   [D]
    r   = 1 / sqrt(mean_d(p_d²) + ε)                          ONE scalar for the pooled vector
    z   = W·(g ⊙ r·p)/τ + b/τ                                 group (W = Wg, [G, D]) or expert (W = We, [E, D]) logits

Everything between h_t and z is linear once r is fixed, so the logit is a sum over tokens plus the bias term:

    z   = Σ_{t∈I} c_t + b/τ,         c_t = r · W·(g ⊙ h_t) / (N τ)                                       [G] or [E]

This is exact, not an approximation (no gradients, no baseline): `contributions` summed over tokens plus `bias`
give the router's own logits (`GroupedRouter.logits`) to float rounding. r is shared by every token, so a token's term
is its direct share given the others (r itself depends on all of them). With "last" pooling the router reads only
the last token of I: c_last = r·W·(g ⊙ h_last)/τ and every other token's contribution is 0. With "attention"
pooling each group g pools with its own weights a_gt (fixed by the hidden states, like r), so for g's gate and its
experts p_g = Σ_t a_gt h_t, r_g its RMS scale, and c_t = r_g · a_gt · W·(g ⊙ h_t)/τ: still exact.

Shift invariance. Softmax weights do not change when one constant is added to all the logits they normalise, so an
absolute contribution to one softmax logit means nothing alone. For softmax-normalised levels — groups in mode
"softmax", experts within their group in modes "softmax" and "sigmoid", experts over all experts in mode "flat" —
`contribution`, `bias` and `logit` are therefore given relative to the mean over the members normalised together
(c_t[k] − mean_{k'} c_t[k'], and so on); they still sum exactly (Σ_t c_t + bias = logit), and a positive value pushes
that member's weight up against the others'. Sigmoid group gates are not shift invariant: their contributions are
absolute. The untransformed terms are kept as `raw`, `raw_bias`, `raw_logit`. In mode "flat" the group head is not
used (α is a sum of expert weights), so there are no group rows.

What this is not: it is the direct effect of each token at that layer's router, *given* the hidden states. It is not
the effect of a word on the answer, and not the effect of removing the word: every h_t at layer l > 0 already
depends on earlier tokens (attention) and on the experts chosen at earlier layers.

The hidden states come from one routed forward pass (no overrides): the routing call keeps what enters each layer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch

from .router import EPS, attention_weights
from .tokens import token_labels

if TYPE_CHECKING:
    from .call import RoutingCall
    from .router import GroupedRouter
    from .trace import RoutingTrace


@dataclass
class Explanation:
    """Per-token contributions to every routing logit of one prompt, and the terms they add up to.

    `contributions`: one row per (token read, layer, group or expert) with columns
        token (position in the prompt), text (its label), word (word id: word pieces merged), word_text, layer,
        level ("group" | "expert"), group, name, contribution (relative where softmax-normalised), raw.
    `logits`: one row per (layer, group or expert) with columns
        layer, level, group, name, bias, logit (relative where softmax-normalised), raw_bias, raw_logit.
    Σ_tokens contribution + bias = logit, and Σ_tokens raw + raw_bias = raw_logit = the router's logit.
    """

    contributions: pd.DataFrame
    logits: pd.DataFrame
    token_positions: list[int]     # positions (in the prompt) of the tokens the router read
    tokens: list[str]              # their labels
    words: list[str]               # the words they form, by word id
    relative: dict[str, bool]      # level → contributions are relative to the mean of the members normalised together
    mode: str
    pooling: str
    reads: str
    trace: RoutingTrace            # the routing of this same forward pass
    attention: pd.DataFrame | None = None   # attention pooling only: layer, group, token, word, weight (Σ_token = 1)

    def attention_by_word(self, layers: tuple[int, int] | None = None) -> pd.DataFrame:
        """[group × word id] how much of each group's attention falls on each word (its tokens summed), averaged over
        layers a..b (inclusive). Attention pooling only: each row sums to 1."""
        if self.attention is None:
            raise ValueError(f"this router pools by {self.pooling!r}: there are no attention weights")
        rows = self.attention if layers is None else self.attention[self.attention.layer.between(*layers)]
        if rows.empty:
            raise ValueError(f"no explained layer in {layers}")
        per_layer = rows.pivot_table(index=["group", "layer"], columns="word", values="weight", aggfunc="sum")
        matrix = per_layer.groupby(level="group").mean().reindex(columns=range(len(self.words)), fill_value=0.0)
        return matrix.reindex([g for g in dict.fromkeys(self.attention.group)])

    @property
    def targets(self) -> list[str]:
        """What can be explained: "group:<g>" (not in mode flat) and "expert:<e>"."""
        names = self.logits[["level", "name"]].drop_duplicates()
        return [f"{lv}:{n}" for lv, n in names.itertuples(index=False)]

    def _rows(self, target: str) -> pd.DataFrame:
        level, _, name = target.partition(":")
        rows = self.contributions[(self.contributions.level == level) & (self.contributions.name == name)]
        if rows.empty:
            raise ValueError(f"nothing to explain for {target!r}; choose one of {self.targets}")
        return rows

    def word_matrix(self, target: str) -> pd.DataFrame:
        """[layer × word id] each word's contribution (its tokens summed) to `target`'s logit."""
        matrix = self._rows(target).pivot_table(index="layer", columns="word", values="contribution", aggfunc="sum")
        return matrix.reindex(columns=range(len(self.words)), fill_value=0.0)

    def by_word(self, target: str, layers: tuple[int, int] | None = None) -> pd.DataFrame:
        """word, text, contribution: each word's contribution to `target`, averaged over layers a..b (inclusive)."""
        matrix = self.word_matrix(target)
        if layers is not None:
            matrix = matrix.loc[layers[0]:layers[1]]
        if matrix.empty:
            raise ValueError(f"no explained layer in {layers}")
        return pd.DataFrame({"word": range(len(self.words)), "text": self.words, "contribution": matrix.mean().values})

    @classmethod
    def from_call(cls, call: RoutingCall, token_ids: Sequence[int], tokenizer: Any, trace: RoutingTrace,
                  layers: Sequence[int] | None = None) -> Explanation:
        """Explain batch row 0 of a finished sequence-mode call that kept its layer inputs (`call.inputs`)."""
        if call.inputs is None or call.granularity != "sequence":
            raise ValueError("explaining needs a sequence-mode call that kept its layer inputs")
        router, cfg = call.router, call.router.config
        layers = sorted(call.inputs) if layers is None else list(layers)
        bad = [l for l in layers if l not in call.inputs]
        if bad:
            raise ValueError(f"layers {bad} are not in this model's 0..{len(call.inputs) - 1}")
        positions = torch.nonzero(call.prompt_mask[0]).flatten().tolist()
        labels = token_labels(tokenizer, list(token_ids))
        special = set(getattr(tokenizer, "all_special_ids", []) or [])
        word_of, words = _words([labels[i] for i in positions], [token_ids[i] in special for i in positions])
        layout = cfg.layout
        levels = {"expert": (list(layout.experts), list(layout.expert_groups),
                             [list(range(len(layout.experts)))] if cfg.mode == "flat"
                             else [list(range(len(layout.experts)))[s] for s in layout.slices])}
        if cfg.mode != "flat":  # the flat router never reads its group head
            levels = {"group": (list(layout.groups), list(layout.groups),
                                [list(range(len(layout.groups)))] if cfg.mode == "softmax" else []), **levels}
        relative = {level: bool(members) for level, (_, _, members) in levels.items()}
        contrib_parts, logit_parts, attention_parts = [], [], []
        for l in layers:
            a = (attention_weights(call.inputs[l][:1], call.prompt_mask[:1], router.query[l])[0][:, positions]
                 if cfg.pooling == "attention" else None)                  # [G, N] each group's token weights
            if a is not None:
                G, N = a.shape
                attention_parts.append(pd.DataFrame({
                    "layer": l, "group": np.repeat(list(layout.groups), N), "token": np.tile(positions, G),
                    "word": np.tile(word_of, G), "weight": a.double().cpu().numpy().ravel()}))
            terms = _layer_terms(router, l, call.inputs[l], call.prompt_mask, positions, a)
            for level, (names, groups, members) in levels.items():
                raw_c, raw_b, raw_z = terms[level]                             # [N, K], [K], [K]
                c, b, z = (_centre(x, members) for x in (raw_c, raw_b, raw_z))
                N, K = raw_c.shape
                contrib_parts.append(pd.DataFrame({
                    "token": np.repeat(positions, K), "text": np.repeat([labels[i] for i in positions], K),
                    "word": np.repeat(word_of, K), "word_text": np.repeat([words[w] for w in word_of], K),
                    "layer": l, "level": level, "group": np.tile(groups, N), "name": np.tile(names, N),
                    "contribution": c.ravel(), "raw": raw_c.ravel()}))
                logit_parts.append(pd.DataFrame({"layer": l, "level": level, "group": groups, "name": names,
                                                 "bias": b, "logit": z, "raw_bias": raw_b, "raw_logit": raw_z}))
        return cls(pd.concat(contrib_parts, ignore_index=True), pd.concat(logit_parts, ignore_index=True),
                   positions, [labels[i] for i in positions], words, relative, cfg.mode, cfg.pooling, cfg.reads,
                   trace, pd.concat(attention_parts, ignore_index=True) if attention_parts else None)


def _layer_terms(router: GroupedRouter, layer: int, hidden: torch.Tensor, mask: torch.Tensor,
                 positions: list[int], attention: torch.Tensor | None
                 ) -> dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """level → (per-token contributions [N, K], bias [K], the router's logits [K]) at one layer (batch row 0);
    `attention` [G, N]: each group's weights over the tokens read (attention pooling), else None."""
    cfg = router.config
    h = hidden[0, positions].double()                                    # [N, D] the tokens read
    if attention is not None:                                            # one reader per group: its own weights
        share = attention.double()[..., None] * h                        # [G, N, D]
    elif cfg.pooling == "last":
        share = torch.zeros_like(h)[None]
        share[0, -1] = h[-1]                                             # only the last token is read
    else:
        share = (h / len(positions))[None]                               # [1, N, D] each token's part of the mean
    p = share.sum(1, keepdim=True)                                       # [R, 1, D] the pooled vector(s)
    r = torch.rsqrt(p.pow(2).mean(-1, keepdim=True) + EPS)               # one RMS scale per pooled vector
    x = r * share * router.norm_weight[layer].double()                   # [R, N, D]: Σ_t x_t = RMSNorm(p)
    tau = cfg.temperature
    group_logits, expert_logits = router.logits(layer, router.pool(layer, hidden, mask))  # the router's own
    readers = {"group": torch.arange(len(cfg.groups), device=x.device), "expert": router.group_index.to(x.device)}
    out = {}
    for level, weight, bias, logits in (("group", router.group_weight, router.group_bias, group_logits),
                                        ("expert", router.expert_weight, router.expert_bias, expert_logits)):
        xs = x[readers[level]] if attention is not None else x.expand(len(readers[level]), -1, -1)  # [K, N, D]
        c = torch.einsum("knd,kd->nk", xs, weight[layer].double()) / tau  # [N, K]
        out[level] = (c.cpu().numpy(), (bias[layer].double() / tau).cpu().numpy(),
                      logits[0].double().cpu().numpy())
    return out


def _centre(x: np.ndarray, members: list[list[int]]) -> np.ndarray:
    """Subtract, over the last axis, the mean of each set of members normalised together (none: unchanged)."""
    out = x.copy()
    for idx in members:
        out[..., idx] -= x[..., idx].mean(-1, keepdims=True)
    return out


def _words(labels: list[str], special: list[bool]) -> tuple[list[int], list[str]]:
    """Merge word pieces into whitespace-separated words: once a word has text, a token that starts with whitespace
    (or follows one that ends with it) starts the next word, so a lone space token joins the word after it; a special
    token is a word of its own; a token with no text of its own ("": part of a character) joins the next token's
    word. Returns (word id of each token, each word's text, stripped)."""
    word_of: list[int] = []
    pending: list[int] = []
    texts: list[str] = []
    previous = ""
    for i, (label, sp) in enumerate(zip(labels, special)):
        if label == "" and not sp and i + 1 < len(labels):
            pending.append(i)
            continue
        separated = label[:1].isspace() or previous[-1:].isspace()
        starts = not texts or sp or special[i - 1] or (texts[-1].strip() != "" and separated)
        if starts:
            texts.append("")
        for _ in range(len(pending) + 1):
            word_of.append(len(texts) - 1)
        pending = []
        texts[-1] += label
        previous = label
    return word_of, [t.strip() or t for t in texts]


__all__ = ["Explanation"]
