"""`RoutingTrace`: what the router decided for one sequence, and what was actually used after overrides."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .layout import GroupLayout
from .overrides import Overrides
from .tokens import token_labels

if TYPE_CHECKING:
    from .call import RoutingCall

# Issue 24's bar: a group whose weight stays at most this on every layer (and every token) is not engaged.
STAY_OUT = 0.3
# What `to_dict` adds that the fields already determine (`from_dict` drops them).
_DERIVED = ("effective_weights", "stay_out_threshold", "engaged_groups", "stays_out", "kept_out")


@dataclass
class RoutingTrace:
    """Routing of one sequence. Arrays are [L, G] (groups) or [L, E] (experts); experts are ordered by group.

    `*_weights` are the weights used (after overrides); `router_*` the router's own. In token mode the [L, ·] arrays
    are means over the tokens and `token_*` hold one row per token ([T, L, ·]).

    `stays_out()` says whether the routing kept the experts out (every gate ≤ `STAY_OUT` on every layer, sigmoid
    router), `engaged_groups()` which groups opened; `to_dict` records both at `STAY_OUT`.

    The router at layer l reads the hidden state entering l, so an override on an earlier layer changes what the
    later routers see: `router_*` is what the router proposed *in this call*, not the weights of a call without
    overrides (route again without overrides for those).
    """

    layers: list[str]
    groups: list[str]
    experts: list[str]
    expert_groups: list[str]
    router_group_weights: np.ndarray
    router_expert_weights: np.ndarray
    group_weights: np.ndarray
    expert_weights: np.ndarray
    mode: str
    granularity: str = "sequence"
    router_trained: bool = True
    overrides: Overrides | None = None          # what the user fixed (a dict only in to_dict / JSON)
    group_overridden: np.ndarray | None = None   # [L, G] bool
    expert_overridden: np.ndarray | None = None  # [L, E] bool
    fallback_layers: list[int] = field(default_factory=list)
    tokens: list[str] | None = None
    token_group_weights: np.ndarray | None = None   # [T, L, G] used
    token_expert_weights: np.ndarray | None = None  # [T, L, E] used
    head_score: float | None = None              # the router's stay-out head, when it has one (`kept_out`)
    head_threshold: float | None = None

    def __post_init__(self) -> None:
        L, G, E = len(self.layers), len(self.groups), len(self.experts)
        if self.group_overridden is None:
            self.group_overridden = np.zeros((L, G), dtype=bool)
        if self.expert_overridden is None:
            self.expert_overridden = np.zeros((L, E), dtype=bool)

    @classmethod
    def from_call(cls, call: RoutingCall, row: int, token_ids: Sequence[int], layers: Sequence[str],
                  tokenizer: Any) -> RoutingTrace:
        """The trace of batch row `row` of a finished call. `token_ids`: the row's tokens without padding (prompt,
        then any generated ones; token mode labels them with `tokenizer`); `layers`: the decoder layers' names."""
        if len(call.records) != len(layers):
            raise RuntimeError(f"routing ran on {len(call.records)} of {len(layers)} layers")
        token_mode = call.granularity == "token"

        def weights(name: str) -> np.ndarray:  # → [L, ·] (sequence) or [T, L, ·] (token)
            w = call.stacked(name)[:, row].detach().float().cpu().numpy()
            return np.moveaxis(w, 0, 1) if token_mode else w

        arrays = {k: weights(k) for k in ("router_alpha", "router_beta", "alpha", "beta")}
        fallback = call.stacked("fallback")[:, row]
        extra: dict[str, Any] = {}
        if token_mode:
            # Drop left padding: keep the positions of this row's real tokens.
            keep = np.arange(arrays["alpha"].shape[0])[-len(token_ids):]
            arrays = {k: v[keep] for k, v in arrays.items()}
            extra = dict(tokens=token_labels(tokenizer, token_ids)[: len(keep)],
                         token_group_weights=arrays["alpha"], token_expert_weights=arrays["beta"])
            arrays = {k: v.mean(0) for k, v in arrays.items()}
        cfg, ov = call.router.config, call.overrides
        layout = cfg.layout
        L, G, E = len(layers), len(layout.groups), len(layout.experts)
        g_over = np.zeros((L, G), bool) if ov is None else (ov.layer_mask[:, None] & ov.group_fixed[None, :]).numpy()
        e_over = np.zeros((L, E), bool) if ov is None else (ov.layer_mask[:, None] & ov.expert_fixed[None, :]).numpy()
        return cls(
            layers=list(layers), groups=list(layout.groups), experts=list(layout.experts),
            expert_groups=list(layout.expert_groups),
            router_group_weights=arrays["router_alpha"], router_expert_weights=arrays["router_beta"],
            group_weights=arrays["alpha"], expert_weights=arrays["beta"], mode=cfg.mode,
            granularity=call.granularity, router_trained=call.router.trained,
            overrides=ov and ov.source, group_overridden=g_over, expert_overridden=e_over,
            fallback_layers=[l for l in range(L) if bool(fallback[l].any())],
            head_score=None if call.stay_scores is None else float(call.stay_scores[row]),
            head_threshold=cfg.stay_out_threshold if call.stay_scores is not None else None, **extra)

    @cached_property
    def layout(self) -> GroupLayout:
        """The groups and their experts, built once."""
        return GroupLayout(self.groups, self.experts, self.expert_groups)

    @property
    def group_index(self) -> np.ndarray:
        """[E] the index of each expert's group."""
        return np.array(self.layout.group_index)

    @property
    def effective_weights(self) -> np.ndarray:
        """w = α·β, [L, E]: the weight each expert's LoRA update actually received."""
        return self.group_weights[:, self.group_index] * self.expert_weights

    @property
    def router_effective_weights(self) -> np.ndarray:
        return self.router_group_weights[:, self.group_index] * self.router_expert_weights

    @property
    def num_layers(self) -> int:
        return len(self.layers)

    @property
    def _used_group_weights(self) -> np.ndarray:   # [T, L, G] in token mode, [1, L, G] in sequence mode
        return self.token_group_weights if self.token_group_weights is not None else self.group_weights[None]

    @property
    def highest_group_weights(self) -> np.ndarray:
        """[G] each group's highest used weight over layers — and over tokens in token mode (not the [L, G] means:
        one token that opens a gate engages its group)."""
        return self._used_group_weights.max(axis=(0, 1))

    def engaged_groups(self, threshold: float = STAY_OUT) -> list[str]:
        """The groups whose used weight (a gate; with a softmax or flat router, a share of the budget) exceeds
        `threshold` on some layer (some token, in token mode)."""
        return [g for g, w in zip(self.groups, self.highest_group_weights) if w > threshold]

    def stays_out(self, threshold: float = STAY_OUT) -> bool:
        """Whether the routing kept every expert out: no layer (no token, in token mode) gives the experts more than
        `threshold` of a full update.

        Sigmoid router (independent gates): every group gate is ≤ `threshold` — no group is engaged, issue 24's
        "every gate ≤ 0.3 on every layer". Softmax and flat routers: α is a budget that sums to 1, so low shares
        (e.g. 0.25 each over four groups) still add a whole update; there the groups' weights must *sum* to
        ≤ `threshold`, which only overrides reach (disabling every expert gives 0). Either way the experts still add
        their updates at these weights unless `effective_weights` is all zero."""
        if self.mode == "sigmoid":
            return not self.engaged_groups(threshold)
        return bool(self._used_group_weights.sum(-1).max() <= threshold)

    @property
    def kept_out(self) -> bool:
        """Whether the router's stay-out head judged the request outside every expert's skill (its score at or
        above its threshold): every expert weight the router proposed is then 0 (overrides still apply)."""
        return self.head_score is not None and self.head_score >= self.head_threshold

    @property
    def experts_off(self) -> bool:
        """Whether every expert's used weight α·β is 0 on every layer (every token: the means are 0 only if each
        token's weight is): the experts add nothing, the output is the base model's within float rounding."""
        return not self.effective_weights.any()

    def to_frame(self) -> pd.DataFrame:
        """Tidy table: one row per (layer, group or expert, level, source) with columns
        `layer, group, expert, level, source, weight` (level: group / expert / effective; source: router / used)."""
        rows = []
        for source, (a, b, w) in {
            "router": (self.router_group_weights, self.router_expert_weights, self.router_effective_weights),
            "used": (self.group_weights, self.expert_weights, self.effective_weights),
        }.items():
            for l in range(self.num_layers):
                for gi, g in enumerate(self.groups):
                    rows.append((l, g, None, "group", source, float(a[l, gi])))
                for ei, e in enumerate(self.experts):
                    g = self.expert_groups[ei]
                    rows.append((l, g, e, "expert", source, float(b[l, ei])))
                    rows.append((l, g, e, "effective", source, float(w[l, ei])))
        return pd.DataFrame(rows, columns=["layer", "group", "expert", "level", "source", "weight"])

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for k in (f.name for f in fields(self)):
            v = getattr(self, k)
            out[k] = v.tolist() if isinstance(v, np.ndarray) else v.to_dict() if isinstance(v, Overrides) else v
        out["effective_weights"] = self.effective_weights.tolist()
        out["stay_out_threshold"] = STAY_OUT
        out["engaged_groups"] = self.engaged_groups()
        out["stays_out"] = self.stays_out()
        out["kept_out"] = self.kept_out
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), ensure_ascii=False)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> RoutingTrace:
        d = {k: v for k, v in d.items() if k not in _DERIVED}
        if d.get("overrides") is not None:
            d["overrides"] = Overrides.from_dict(d["overrides"])
        for k in ("router_group_weights", "router_expert_weights", "group_weights", "expert_weights",
                  "group_overridden", "expert_overridden", "token_group_weights", "token_expert_weights"):
            if d.get(k) is not None:
                d[k] = np.asarray(d[k], dtype=bool if k.endswith("overridden") else np.float64)
        return cls(**d)
