"""A routing atlas: every instruction of a set placed in 2-D by its routing, so that instructions routed alike sit
together. A trained router shows one cluster per skill combination; an untrained one a single point.

    alpha, beta = stacked routings [N, L, G], [N, L, E] (from `route_batch` traces or a `routes.py` export)
    frame, fit = atlas(alpha, beta, layout, labels=categories)      # frame: x, y, label; fit: the PCA
    separation(frame[["x", "y"]].to_numpy(), frame["label"])        # how well the labels separate in the plane

Features (`features`): "mean" — the layer-mean α and β side by side, [G + E]; "full" — the effective weights
w = α·β of every layer, [L·E]. The projection is PCA by a singular value decomposition of the centred features
(numpy only): the first two right singular vectors are the axes, each sign fixed so that its largest entry is positive
(the same data gives the same picture).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import pandas as pd

from ..layout import GroupLayout
from ..trace import RoutingTrace

FEATURES = ("mean", "full")


@dataclass
class PCA:
    """A principal component fit of X [n, d]: coords = (X − mean) @ components.T."""

    mean: np.ndarray          # [d]
    components: np.ndarray    # [k, d] orthonormal rows, largest variance first
    explained: np.ndarray     # [k] share of the total variance along each component
    coords: np.ndarray        # [n, k]

    def transform(self, x: np.ndarray) -> np.ndarray:
        return (np.asarray(x, np.float64) - self.mean) @ self.components.T


def pca(x: np.ndarray, k: int = 2) -> PCA:
    """The first `k` principal components of the rows of `x` [n, d]. With fewer than k directions of variance the
    extra components have zero explained variance."""
    x = np.asarray(x, np.float64)
    if x.ndim != 2 or len(x) == 0:
        raise ValueError(f"pca needs a non-empty [n, d] array, got shape {x.shape}")
    mean = x.mean(0)
    centred = x - mean
    _, s, vt = np.linalg.svd(centred, full_matrices=False)
    vt = vt * np.where(vt[np.arange(len(vt)), np.abs(vt).argmax(1)] < 0, -1.0, 1.0)[:, None]   # sign convention
    total = float((s ** 2).sum())
    explained = (s ** 2) / total if total > 0 else np.zeros_like(s)
    comps = np.zeros((k, x.shape[1]))
    ratio = np.zeros(k)
    n = min(k, len(vt))
    comps[:n], ratio[:n] = vt[:n], explained[:n]
    return PCA(mean, comps, ratio, centred @ comps.T)


def stack(traces: Sequence[RoutingTrace]) -> tuple[np.ndarray, np.ndarray]:
    """Used α [N, L, G] and β [N, L, E] of a list of traces."""
    return (np.stack([t.group_weights for t in traces]).astype(np.float64),
            np.stack([t.expert_weights for t in traces]).astype(np.float64))


def features(alpha: np.ndarray, beta: np.ndarray, layout: GroupLayout, kind: str = "mean") -> np.ndarray:
    """[N, G + E] ("mean": layer-mean α, then layer-mean β) or [N, L·E] ("full": every layer's w = α·β)."""
    alpha, beta = np.asarray(alpha, np.float64), np.asarray(beta, np.float64)
    if kind == "mean":
        return np.concatenate([alpha.mean(1), beta.mean(1)], axis=1)
    if kind == "full":
        w = alpha[..., list(layout.group_index)] * beta
        return w.reshape(len(w), -1)
    raise ValueError(f"kind must be one of {FEATURES}, got {kind!r}")


def atlas(alpha: np.ndarray, beta: np.ndarray, layout: GroupLayout, labels: Sequence[str] | None = None,
          kind: str = "mean") -> tuple[pd.DataFrame, PCA]:
    """Each row's place in the plane of the first two principal components of its routing: a frame with `x`, `y`,
    `label` (or "—"), and the fit (its `explained` says how much of the variance the plane shows)."""
    fit = pca(features(alpha, beta, layout, kind), 2)
    labels = list(labels) if labels is not None else ["—"] * len(fit.coords)
    if len(labels) != len(fit.coords):
        raise ValueError(f"{len(labels)} labels for {len(fit.coords)} rows")
    return pd.DataFrame({"x": fit.coords[:, 0], "y": fit.coords[:, 1], "label": labels}), fit


def separation(coords: np.ndarray, labels: Sequence[str]) -> dict[str, float]:
    """How well the labels separate in the plane: leave-one-out nearest-centroid accuracy (each point against the
    centroids of the labels computed without it), next to chance (the share of the most frequent label). Labels
    with a single point are left out (no centroid without them)."""
    coords, labels = np.asarray(coords, np.float64), np.asarray(list(labels), dtype=object)
    names, counts = np.unique(labels, return_counts=True)
    keep = np.isin(labels, names[counts > 1])
    coords, labels = coords[keep], labels[keep]
    names = [n for n, c in zip(*np.unique(labels, return_counts=True)) if c > 1]
    if len(names) < 2:
        return {"accuracy": float("nan"), "chance": float("nan"), "points": int(len(labels)), "labels": len(names)}
    sums = {n: coords[labels == n].sum(0) for n in names}
    sizes = {n: int((labels == n).sum()) for n in names}
    right = 0
    for p, own in zip(coords, labels):
        centroids = [(sums[n] - (p if n == own else 0)) / (sizes[n] - (n == own)) for n in names]
        right += names[int(np.argmin([np.sum((p - c) ** 2) for c in centroids]))] == own
    return {"accuracy": right / len(labels), "chance": max(sizes.values()) / len(labels), "points": int(len(labels)),
            "labels": len(names)}


__all__ = ["PCA", "atlas", "features", "pca", "separation", "stack"]
