"""The trace reports what the engine used and what the router proposed, each from its own arrays.

Tiny demo model (6 experts in 3 groups, 4 layers) with a random softmax router.
"""

from __future__ import annotations

import numpy as np
import pytest
from tiny_models import tiny_demo

from atmoe import ATMoE, Overrides

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
