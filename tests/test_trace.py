"""The trace reports what the engine used and what the router proposed, each from its own arrays.

Tiny demo model (6 experts in 3 groups, 4 layers) with a random softmax router.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from tiny_models import tiny_demo

from atmoe import ATMoE, Overrides, RoutingTrace
from atmoe.trace import STAY_OUT

pytestmark = pytest.mark.usefixtures("one_torch_thread")

PROMPT = "List the lab results. Use bullet points."
NOTE = "72 yo M with shortness of breath.\nLabs: Na 128, K 4.1."


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> ATMoE:
    return ATMoE.load(tiny_demo(tmp_path_factory.mktemp("trace")), device="cpu")


def test_router_effective_weights_are_the_routers_own_on_an_overridden_trace(model):
    ov = Overrides(groups={"task": 1.0}, experts={"bullets": 1.0})
    tr = model.route(PROMPT, ov, input=NOTE)
    gi = tr.group_index
    np.testing.assert_allclose(tr.router_effective_weights, tr.router_group_weights[:, gi] * tr.router_expert_weights)
    np.testing.assert_allclose(tr.effective_weights, tr.group_weights[:, gi] * tr.expert_weights)
    # The override really moved α and β away from the router's, so the two properties differ.
    assert np.abs(tr.group_weights - tr.router_group_weights).min(0).max() > 0.05
    assert np.abs(tr.effective_weights - tr.router_effective_weights).max() > 0.05
    frame = tr.to_frame().query("level == 'effective'")
    for source, w in (("router", tr.router_effective_weights), ("used", tr.effective_weights)):
        np.testing.assert_allclose(frame[frame.source == source].weight.to_numpy().reshape(w.shape), w)


@pytest.mark.parametrize("overrides", [None, Overrides(groups={"style": 0.0}, experts={"labs": 0.9}, layers=(1, 3))])
def test_per_token_arrays_are_the_used_weights_token_by_token(model, overrides):
    out = model.generate(PROMPT, input=NOTE, max_new_tokens=5, granularity="token", overrides=overrides)
    tr = out.trace
    T, L, G, E = len(tr.tokens), tr.num_layers, len(tr.groups), len(tr.experts)
    # every token that went through the model: the last generated one is never fed back (N tokens, N − 1 steps)
    assert T == out.prompt_tokens + len(out.token_ids) - 1
    assert tr.token_group_weights.shape == (T, L, G)     # α per token
    assert tr.token_expert_weights.shape == (T, L, E)    # β per token
    np.testing.assert_allclose(tr.token_group_weights.mean(0), tr.group_weights, atol=1e-6)
    np.testing.assert_allclose(tr.token_expert_weights.mean(0), tr.expert_weights, atol=1e-6)
    # Each token's weights are normalised like the router's: Σ_g α = 1 (softmax), Σ_{e∈g} β = 1.
    np.testing.assert_allclose(tr.token_group_weights.sum(-1), 1, atol=1e-5)
    for g in range(G):
        np.testing.assert_allclose(tr.token_expert_weights[..., tr.group_index == g].sum(-1), 1, atol=1e-5)
    assert np.abs(np.diff(tr.token_group_weights, axis=0)).max() > 1e-3  # token routing: rows really differ
    if overrides is not None:
        style, labs = tr.groups.index("style"), tr.experts.index("labs")
        np.testing.assert_allclose(tr.token_group_weights[:, 1:, style], 0, atol=1e-6)
        np.testing.assert_allclose(tr.token_expert_weights[:, 1:, labs], 0.9, atol=1e-6)


# ---------------------------------------------------------------- does the routing stay out (issue 24)
def _gates(alpha: list[list[float]], mode: str = "sigmoid", tokens: list[list[list[float]]] | None = None):
    """A hand-made trace, α [L, G] over groups g0, g1, … of two experts each (β = 0.5); `tokens`: per-token α
    [T, L, G] (token mode)."""
    a = np.array(alpha, dtype=np.float64)
    L, G = a.shape
    groups = [f"g{i}" for i in range(G)]
    b = np.full((L, 2 * G), 0.5)
    extra = {} if tokens is None else dict(granularity="token", tokens=[f"t{i}" for i in range(len(tokens))],
                                           token_group_weights=np.array(tokens),
                                           token_expert_weights=np.full((len(tokens), L, 2 * G), 0.5))
    return RoutingTrace(layers=[f"l{i}" for i in range(L)], groups=groups, experts=[f"e{i}" for i in range(2 * G)],
                        expert_groups=[g for g in groups for _ in range(2)], router_group_weights=a,
                        router_expert_weights=b, group_weights=a, expert_weights=b, mode=mode, **extra)


def test_sigmoid_gates_stay_out_only_while_every_gate_is_at_most_the_bar_on_every_layer():
    assert STAY_OUT == 0.3
    closed = _gates([[0.1, 0.3], [0.05, 0.2]])                     # 0.3 itself is "at most"
    assert closed.stays_out() and closed.engaged_groups() == []
    np.testing.assert_allclose(closed.highest_group_weights, [0.1, 0.3])
    assert not closed.experts_off                                  # low gates still add the experts' updates
    one_layer = _gates([[0.1, 0.2], [0.05, 0.31]])                 # style opens on the last layer only
    assert not one_layer.stays_out() and one_layer.engaged_groups() == ["g1"]
    assert one_layer.stays_out(threshold=0.5) and one_layer.engaged_groups(threshold=0.5) == []


def test_token_mode_reads_every_token_not_the_means():
    # Layer means 0.1 / 0.2 (closed), but the third token opens task on layer 1: that token engaged the group.
    tokens = [[[0.0, 0.2], [0.0, 0.2]], [[0.0, 0.2], [0.0, 0.2]], [[0.0, 0.2], [0.3 + 0.4, 0.2]]]
    tr = _gates(np.mean(tokens, 0).tolist(), tokens=tokens)
    assert tr.group_weights.max() <= STAY_OUT
    assert tr.engaged_groups() == ["g0"] and not tr.stays_out()


def test_a_softmax_budget_stays_out_only_when_the_groups_sum_to_at_most_the_bar():
    shares = _gates([[0.25, 0.25, 0.25, 0.25]] * 2, mode="softmax")
    assert shares.engaged_groups() == []          # no share above 0.3 …
    assert not shares.stays_out()                 # … but together they add a whole update


def test_disabling_every_expert_stays_out_on_a_softmax_model_and_the_experts_add_nothing(model):
    plain = model.route(PROMPT, input=NOTE)
    assert not plain.stays_out() and plain.engaged_groups() and not plain.experts_off
    off = model.route(PROMPT, Overrides(disabled=list(model.experts)), input=NOTE)
    assert off.stays_out() and off.engaged_groups() == [] and off.experts_off


def test_sigmoid_gates_fixed_low_stay_out_but_the_experts_still_add_something(tmp_path):
    m = ATMoE.load(tiny_demo(tmp_path, mode="sigmoid"), device="cpu")
    assert m.route(PROMPT, input=NOTE).engaged_groups()                  # the random router opens some gate
    low = Overrides(groups={g: 0.2 for g in m.groups})
    for granularity in ("sequence", "token"):
        tr = m.route(PROMPT, low, input=NOTE, granularity=granularity)
        assert tr.stays_out() and not tr.experts_off
    tr = m.route(PROMPT, Overrides(groups={**low.groups, "style": 0.4}), input=NOTE)
    assert tr.engaged_groups() == ["style"] and not tr.stays_out()


def test_the_json_says_whether_the_routing_stayed_out_and_reads_back(model):
    for ov in (None, Overrides(disabled=list(model.experts))):
        tr = model.route(PROMPT, ov, input=NOTE)
        d = json.loads(tr.to_json())
        assert d["stays_out"] is tr.stays_out() and d["engaged_groups"] == tr.engaged_groups()
        assert d["stay_out_threshold"] == STAY_OUT
        back = RoutingTrace.from_dict(d)
        np.testing.assert_array_equal(back.group_weights, tr.group_weights)
        assert back.stays_out() is tr.stays_out() and back.engaged_groups() == tr.engaged_groups()
