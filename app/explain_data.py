"""The Why tab's figures and numbers (`app/views/explain.py` lays them out): the word attributions of an
`Explanation` (`Service.explain`, `atmoe.explain`). No Streamlit here.

Figures are diverging (RdBu) and centred at 0: a word pushing the chosen logit up is blue, down is red; the colour
range is symmetric per figure, so colours compare within a figure, not across prompts.
"""

from __future__ import annotations

import html

import numpy as np
import plotly.graph_objects as go

from atmoe.explain import Explanation

DIVERGING = "RdBu"
CAPTION = ("Each word's term in the router's logit for the chosen group or expert, at that layer: the logit is exactly "
           "the sum of these terms plus a bias. This is the *direct* effect of the word at that layer's router, given "
           "the hidden states it reads. It is **not** the word's effect on the answer, and not what removing the word "
           "would do: the hidden states themselves depend on earlier words (attention) and on the experts chosen at "
           "earlier layers.")


def target_label(target: str) -> str:
    level, _, name = target.partition(":")
    return f"{name} ({level})"


def _words(ex: Explanation) -> list[str]:
    """Unique, literal axis labels: plotly reads a few HTML tags in text, so a word's own "<" is escaped."""
    return [f"{i}·{html.escape(w, quote=False) or '∅'}" for i, w in enumerate(ex.words)]


def _range(z: np.ndarray) -> float:
    return float(np.abs(z).max()) or 1.0


def words_figure(ex: Explanation, target: str, layers: tuple[int, int]) -> go.Figure:
    """The words in order, coloured by their contribution to `target`, averaged over layers a..b."""
    frame = ex.by_word(target, layers)
    z = frame.contribution.to_numpy()[None, :]
    labels = _words(ex)
    lim = _range(z)
    fig = go.Figure(go.Heatmap(
        z=z, x=labels, y=[""], zmin=-lim, zmax=lim, colorscale=DIVERGING, text=[[html.escape(w, quote=False)
                                                                                 for w in ex.words]],
        texttemplate="%{text}", hovertemplate="%{x}<br>contribution %{z:+.4f}<extra></extra>",
        colorbar=dict(title="logit", thickness=10)))
    a, b = layers
    where = f"layer {a}" if a == b else f"mean over layers {a}–{b}"
    fig.update_layout(title=f"Words → {target_label(target)} logit ({where})", height=190,
                      margin=dict(l=10, r=10, t=40, b=10), xaxis=dict(type="category", showticklabels=False))
    return fig


def heatmap_figure(ex: Explanation, target: str) -> go.Figure:
    """Layer × word: each word's contribution to `target`'s logit at every explained layer."""
    matrix = ex.word_matrix(target)
    z = matrix.to_numpy()
    lim = _range(z)
    fig = go.Figure(go.Heatmap(z=z, x=_words(ex), y=[f"L{l}" for l in matrix.index], zmin=-lim, zmax=lim,
                               colorscale=DIVERGING, colorbar=dict(title="logit"),
                               hovertemplate="layer %{y}<br>%{x}<br>contribution %{z:+.4f}<extra></extra>"))
    fig.update_layout(title=f"Layer × word contributions to {target_label(target)}",
                      height=max(300, 26 * len(matrix) + 150), margin=dict(l=10, r=10, t=40, b=10),
                      xaxis=dict(type="category", tickangle=-45), yaxis=dict(type="category", autorange="reversed"))
    return fig


def attention_figure(ex: Explanation, layers: tuple[int, int]) -> go.Figure:
    """Group × word: the share of each group's attention on each word (attention pooling), mean over layers a..b."""
    matrix = ex.attention_by_word(layers)
    a, b = layers
    where = f"layer {a}" if a == b else f"mean over layers {a}–{b}"
    fig = go.Figure(go.Heatmap(z=matrix.to_numpy(), x=_words(ex), y=list(matrix.index), zmin=0,
                               colorscale="Blues", colorbar=dict(title="share"),
                               hovertemplate="%{y}<br>%{x}<br>attention %{z:.3f}<extra></extra>"))
    fig.update_layout(title=f"Where each group looks ({where})", height=120 + 40 * len(matrix),
                      margin=dict(l=10, r=10, t=40, b=10), xaxis=dict(type="category", tickangle=-45))
    return fig


def terms(ex: Explanation, target: str, layers: tuple[int, int]) -> dict[str, float]:
    """Mean over layers a..b of `target`'s bias and logit (relative where softmax-normalised, like the words)."""
    level, _, name = target.partition(":")
    rows = ex.logits[(ex.logits.level == level) & (ex.logits.name == name) & ex.logits.layer.between(*layers)]
    return {"bias": float(rows.bias.mean()), "logit": float(rows.logit.mean()), "relative": ex.relative[level]}
