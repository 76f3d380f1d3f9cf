"""A sigmoid router's gate floor (issue 24): a gate at or below `RouterConfig.gate_floor` reads as exactly 0 when
answering, so a request the router keeps out of is answered by the base model token for token; training reads the
gates unfloored (a closed gate still needs its gradient to open)."""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from launches import count
from tiny_models import tiny_demo

from atmoe import ATMoE, Overrides
from atmoe.model import forward_routed, new_router
from atmoe.router import RouterConfig, load_router, routing_weights, save_router

PROMPT = "Flag the abnormal labs as a dashed list."


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> ATMoE:
    m = ATMoE.load(tiny_demo(tmp_path_factory.mktemp("floor"), mode="sigmoid"), device="cpu")
    with torch.no_grad():  # every gate near sigmoid(-3) ≈ 0.047 except the first group's, near sigmoid(+3) ≈ 0.95
        m.router.group_weight.mul_(0.01)
        m.router.group_bias.fill_(-3.0)
        m.router.group_bias[:, 0] = 3.0
    return m


def _floored(m: ATMoE, floor: float) -> torch.nn.Module:
    r = new_router(m, gate_floor=floor)
    r.load_state_dict(m.router.state_dict())
    r.trained = True
    return r


def test_the_floor_is_checked_where_it_is_declared():
    cfg = dict(groups=["g"], experts=["a"], expert_groups=["g"], num_layers=2, hidden_size=4)
    with pytest.raises(ValueError, match="gate_floor needs sigmoid gates"):
        RouterConfig(**cfg, mode="softmax", gate_floor=0.1)
    for bad in (-0.1, 1.0, "0.2"):
        with pytest.raises(ValueError, match=r"gate_floor must be in \[0, 1\)"):
            RouterConfig(**cfg, mode="sigmoid", gate_floor=bad)
    assert RouterConfig(**cfg, mode="sigmoid", gate_floor=0.3).gate_floor == 0.3


def test_gates_at_or_below_the_floor_read_as_zero_and_the_rest_are_untouched():
    inf = float("-inf")     # [1, G=2, 1+E]: group 0 = experts 0, 1 (gate ≈ 0.047), group 1 = expert 2 (gate ≈ 0.95)
    z = torch.tensor([[[-3.0, 0.5, 0.0, inf], [3.0, inf, inf, 1.0]]])
    open_alpha, _, open_w = routing_weights(z, "sigmoid")
    alpha, _, w = routing_weights(z, "sigmoid", gate_floor=0.3)
    assert alpha[0, 0] == 0 and alpha[0, 1] == open_alpha[0, 1] > 0.9
    assert torch.all(w[0, :2] == 0) and open_w[0, :2].min() > 0 and w[0, 2] == open_w[0, 2]
    assert torch.equal(routing_weights(z, "sigmoid", gate_floor=0.0)[0], open_alpha)
    assert torch.equal(routing_weights(z, "sigmoid", gate_floor=0.04)[0], open_alpha)   # 0.047 > 0.04: stays


def test_every_gate_under_the_floor_answers_exactly_as_the_base(model):
    """The first group's gate (≈ 0.95) open, the rest (≈ 0.047) under a 0.1 floor: equal to the same call with those
    groups disabled, and different from the unfloored call (whose small gates still move the logits)."""
    m = model
    ids = torch.tensor([m.encode(PROMPT)])
    floored, free = _floored(m, 0.1), _floored(m, 0.0)
    shut = Overrides(groups={g: 0.0 for g in m.groups[1:]})
    a = m.generate(PROMPT, max_new_tokens=6, router=floored)
    b = m.generate(PROMPT, max_new_tokens=6, router=free, overrides=shut)
    assert a.text == b.text
    assert a.trace.group_weights[:, 1:].max() == 0.0 and a.trace.group_weights[:, 0].min() > 0.9
    assert a.trace.router_group_weights[:, 1:].max() == 0.0        # the floor is the router's own decision rule
    lf = _logits(m, ids, floored)
    assert torch.equal(lf, _logits(m, ids, free, shut))
    assert not torch.equal(lf, _logits(m, ids, free))


def _logits(m: ATMoE, ids, router, overrides=None) -> torch.Tensor:
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        out, _ = forward_routed(m, ids, mask, mask, router=router, overrides=overrides)
    return out.logits


def test_training_reads_the_gates_unfloored(model):
    """A gate under the floor still gets a gradient from the label loss and the LM loss while training."""
    m = model
    router = _floored(m, 0.5).requires_grad_(True)
    ids = torch.tensor([m.encode(PROMPT)])
    mask = torch.ones_like(ids)
    out, call = forward_routed(m, ids, mask, mask, router=router, gate_floor=0.0)
    assert call.stacked("alpha")[:, 0, 1:].min() > 0
    (out.logits.float().pow(2).mean() + call.stacked("alpha").sum()).backward()
    assert router.group_bias.grad[:, 1:].abs().min() > 0


def test_the_floor_travels_in_the_router_file_and_a_server_may_set_it_at_load(model, tmp_path):
    m = model
    path = save_router(_floored(m, 0.25), tmp_path / "r.safetensors")
    assert load_router(path, expected=m.router.config).config.gate_floor == 0.25
    assert m.router.config.gate_floor == 0.0                                  # tiny_demo's file has none
    manifest = tiny_demo(tmp_path / "sigmoid", mode="sigmoid")
    assert ATMoE.load(manifest, device="cpu", gate_floor=0.3).router.config.gate_floor == 0.3
    with pytest.raises(ValueError, match="gate_floor needs sigmoid gates"):
        ATMoE.load(tiny_demo(tmp_path / "softmax", mode="softmax"), device="cpu", gate_floor=0.3)


def test_the_floor_costs_one_op_per_layer_in_a_prefill_and_none_in_decode(model):
    m = model
    ids = torch.tensor([m.encode(PROMPT)])
    mask = torch.ones_like(ids)
    counts = {}
    for floor in (0.0, 0.1):
        r = _floored(m, floor)
        with torch.inference_mode():
            counts[floor] = count(lambda r=r: forward_routed(m, ids, mask, mask, router=r))
    assert counts[0.1].total - counts[0.0].total == m.num_layers
    assert counts[0.1].syncs == counts[0.0].syncs
    assert replace(m.router.config, gate_floor=0.1).gate_floor == 0.1


def test_the_demo_commands_name_a_bad_floor_in_one_line(tmp_path):
    from demo.abstention import main as abstention
    from demo.evaluate import main as evaluate

    softmax = tiny_demo(tmp_path / "softmax", mode="softmax")
    with pytest.raises(SystemExit, match="^error: router gate_floor needs sigmoid gates"):
        evaluate(["--manifest", str(softmax), "--data", "assets/data/eval.jsonl", "--gate-floor", "0.3"])
    sigmoid = tiny_demo(tmp_path / "sigmoid", mode="sigmoid")
    with pytest.raises(SystemExit, match=r"^error: router gate_floor must be in \[0, 1\)"):
        evaluate(["--manifest", str(sigmoid), "--data", "assets/data/eval.jsonl", "--gate-floor", "1.5"])
    with pytest.raises(SystemExit, match="^error: gate_floor must be < 1"):
        abstention(["--manifest", str(sigmoid), "--gate-floor", "1.5"])
