"""Pure figure builders: RoutingTrace (numpy) → plotly Figure. No Streamlit; unit-testable on tiny traces.

Weights are probabilities, so sequential heatmaps use a FIXED colour range [0, 1] (colours mean the same value in every
figure) on a colour-blind-safe scale; differences use a diverging scale centred at 0.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import plotly.graph_objects as go

from atmoe import RoutingTrace

SEQUENTIAL = "Viridis"
DIVERGING = "RdBu"
# Okabe–Ito: distinguishable with the common colour-vision deficiencies.
CATEGORICAL = ["#0072B2", "#E69F00", "#009E73", "#CC79A7", "#56B4E9", "#D55E00", "#F0E442", "#000000"]
TOKEN_TICK_SIZE = 14   # token labels under the per-token heatmap: plotly's default 12 px is too small to read
MARK = dict(symbol="circle", size=9, color="white", line=dict(color="black", width=2))


def layer_labels(trace: RoutingTrace) -> list[str]:
    return [f"L{i}" for i in range(trace.num_layers)]


def _customdata(router: np.ndarray, used: np.ndarray, overridden: np.ndarray) -> np.ndarray:
    flag = np.where(overridden, "yes", "no")
    return np.dstack([np.round(router, 4).astype(object), np.round(used, 4).astype(object), flag.astype(object)])


def _heatmap(z: np.ndarray, router: np.ndarray, overridden: np.ndarray, x: list[str], y: list[str],
             col_title: str, value_name: str) -> go.Figure:
    hover = (f"layer %{{y}}<br>{col_title} %{{x}}<br>router {value_name} %{{customdata[0]}}"
             f"<br>used {value_name} %{{customdata[1]}}<br>overridden: %{{customdata[2]}}<extra></extra>")
    fig = go.Figure(go.Heatmap(z=z, x=x, y=y, zmin=0.0, zmax=1.0, colorscale=SEQUENTIAL,
                               customdata=_customdata(router, z, overridden), hovertemplate=hover,
                               colorbar=dict(title=value_name), name="used"))
    rows, cols = np.nonzero(overridden)
    if len(rows):
        fig.add_trace(go.Scatter(x=[x[c] for c in cols], y=[y[r] for r in rows], mode="markers", marker=MARK,
                                 name="overridden", hoverinfo="skip", showlegend=False))
    fig.update_layout(margin=dict(l=10, r=10, t=40, b=10), height=max(360, 30 * len(y) + 170),
                      xaxis=dict(title=col_title, type="category"),
                      yaxis=dict(title="decoder layer", autorange="reversed", type="category"))
    return fig


def group_heatmap(trace: RoutingTrace) -> go.Figure:
    """Layers × groups, the α actually used; overridden cells marked."""
    fig = _heatmap(trace.group_weights, trace.router_group_weights, trace.group_overridden, list(trace.groups),
                   layer_labels(trace), "group", "α")
    fig.update_layout(title=_title("Group weights α (used)", trace.group_overridden))
    return fig


def _title(text: str, overridden: np.ndarray) -> str:
    return text + (" — ⚪ = overridden" if overridden.any() else "")


def _group_boundaries(fig: go.Figure, trace: RoutingTrace) -> None:
    """Vertical lines between groups and the group names above their columns."""
    layout = trace.layout
    for s in layout.slices[:-1]:
        fig.add_vline(x=s.stop - 0.5, line=dict(color="black", width=3))
    for name, s in zip(layout.groups, layout.slices):
        fig.add_annotation(x=(s.start + s.stop - 1) / 2, y=1.0, yref="paper", yanchor="bottom", text=f"<b>{name}</b>",
                           showarrow=False)


def expert_heatmap(trace: RoutingTrace, level: str = "effective") -> go.Figure:
    """Layers × experts (ordered by group): within-group β (`level="expert"`) or effective α·β."""
    if level == "expert":
        z, router, name = trace.expert_weights, trace.router_expert_weights, "β"
    elif level == "effective":
        z, router, name = trace.effective_weights, trace.router_effective_weights, "α·β"
    else:
        raise ValueError(f"level must be 'expert' or 'effective', got {level!r}")
    # An expert's effective weight is overridden when its own β or its group's α is fixed.
    over = trace.expert_overridden | (trace.group_overridden[:, trace.group_index] if level == "effective" else False)
    fig = _heatmap(z, router, over, list(trace.experts), layer_labels(trace), "expert", name)
    # Expert boundaries use numeric positions: category axes place column i at x=i.
    _group_boundaries(fig, trace)
    fig.update_layout(title=dict(text=_title(f"Expert weights {name} (used)", over), y=0.98), margin=dict(t=70))
    return fig


def delta_heatmap(trace: RoutingTrace, level: str = "group") -> go.Figure:
    """Used − router weights (diverging, centred at 0): what the overrides changed, layer by layer."""
    if level == "group":
        z, x = trace.group_weights - trace.router_group_weights, list(trace.groups)
    else:
        z, x = trace.effective_weights - trace.router_effective_weights, list(trace.experts)
    fig = go.Figure(go.Heatmap(z=z, x=x, y=layer_labels(trace), zmid=0.0, colorscale=DIVERGING,
                               colorbar=dict(title="Δ"), hovertemplate="layer %{y}<br>%{x}<br>used − router "
                                                                       "%{z:+.4f}<extra></extra>"))
    if level != "group":
        _group_boundaries(fig, trace)
    fig.update_layout(title=f"Change in {'α' if level == 'group' else 'α·β'}: used − router",
                      margin=dict(l=10, r=10, t=70, b=10), height=max(260, 28 * trace.num_layers + 120),
                      yaxis=dict(autorange="reversed", type="category"), xaxis=dict(type="category"))
    return fig


def token_heatmap(trace: RoutingTrace, prompt_tokens: int, layers: tuple[int, int], expert: str | None = None,
                  answer_only: bool = False) -> go.Figure:
    """Per-token weights (token granularity), averaged over `layers`: one row per group, or one expert's α·β.
    Columns are token positions (prompt, then answer); `answer_only` drops the prompt's columns."""
    if trace.tokens is None or trace.token_group_weights is None:
        raise ValueError("this trace has no per-token weights: generate with granularity 'token'")
    a, b = layers
    alpha = trace.token_group_weights[:, a:b + 1]                              # [T, l, G]
    if expert is None:
        z, rows = alpha.mean(1).T, list(trace.groups)                          # [G, T]
    else:
        e = trace.experts.index(expert)
        g = trace.layout.group_index[e]
        z, rows = (alpha[..., g] * trace.token_expert_weights[:, a:b + 1, e]).mean(1)[None, :], [f"{expert} α·β"]
    T = z.shape[1]
    first = min(prompt_tokens, T) if answer_only else 0
    z = z[:, first:]
    labels = [_token_label(t) for t in trace.tokens[first:T]]
    x = list(range(first, T))
    kind = np.array(["prompt" if i < prompt_tokens else "answer" for i in x], dtype=object)
    custom = np.stack([np.array(labels, dtype=object)[None, :].repeat(len(rows), 0),
                       kind[None, :].repeat(len(rows), 0)], axis=-1)
    fig = go.Figure(go.Heatmap(z=z, x=x, y=rows, zmin=0.0, zmax=1.0, colorscale=SEQUENTIAL, customdata=custom,
                               hovertemplate="token #%{x} %{customdata[0]} (%{customdata[1]})<br>%{y}: %{z:.3f}"
                                             "<extra></extra>"))
    if first < prompt_tokens < T:
        fig.add_vline(x=prompt_tokens - 0.5, line=dict(color="black", width=2, dash="dash"),
                      annotation_text="answer →", annotation_position="top right")
    fig.update_layout(title=f"Per-token weights (layers {a}–{b})", height=160 + 40 * len(rows),
                      margin=dict(l=10, r=10, t=50, b=10),
                      xaxis=dict(tickmode="array", tickvals=x, ticktext=labels, tickangle=-60,
                                 tickfont=dict(size=TOKEN_TICK_SIZE)))
    return fig


def _token_label(token: str) -> str:
    return token.replace("\n", "↵").replace(" ", "·") or "∅"


def dominant_groups(trace: RoutingTrace, layers: tuple[int, int]) -> list[tuple[str, str, float]]:
    """(token, dominant group, its α) per token, α averaged over `layers`."""
    a, b = layers
    alpha = trace.token_group_weights[:, a:b + 1].mean(1)                      # [T, G]
    best = alpha.argmax(-1)
    return [(t, trace.groups[g], float(alpha[i, g])) for i, (t, g) in enumerate(zip(trace.tokens, best))]


def batch_layer_lines(per_layer: pd.DataFrame) -> go.Figure:
    """Mean group weight per layer over a batch (columns layer, group, weight)."""
    fig = go.Figure()
    for i, (g, d) in enumerate(per_layer.groupby("group", sort=False)):
        fig.add_trace(go.Scatter(x=d["layer"], y=d["weight"], mode="lines+markers", name=str(g),
                                 line=dict(color=CATEGORICAL[i % len(CATEGORICAL)])))
    fig.update_layout(title="Mean group weight α per layer", xaxis_title="decoder layer", yaxis_title="mean α",
                      yaxis_range=[0, 1], margin=dict(l=10, r=10, t=50, b=10), height=340)
    return fig


def batch_category_bars(per_category: pd.DataFrame) -> go.Figure:
    """Mean α (over layers and rows) per category and group (columns category, group, weight)."""
    fig = go.Figure()
    for i, (g, d) in enumerate(per_category.groupby("group", sort=False)):
        fig.add_trace(go.Bar(x=d["category"].astype(str), y=d["weight"], name=str(g),
                             marker_color=CATEGORICAL[i % len(CATEGORICAL)]))
    fig.update_layout(barmode="group", title="Mean group weight α per category", yaxis_range=[0, 1],
                      margin=dict(l=10, r=10, t=50, b=10), height=360, xaxis=dict(type="category"))
    return fig
