"""The router's stay-out head (issue 24): one decision per request, from the instruction's input embeddings, before
the first layer. Kept out, the answer is the base model's exactly; let in, it is exactly what the gates alone give;
overrides still apply; the head trains alone and travels in the router file."""

from __future__ import annotations

import json

import pytest
import torch
from launches import count
from tiny_models import tiny_demo

from atmoe import ATMoE, Overrides
from atmoe.model import forward_routed, new_router
from atmoe.router import load_router, save_router
from atmoe.train.data import Example
from atmoe.train.stay_out import main, threshold_table, train_head, with_head

PROMPT = "Flag the abnormal labs as a dashed list."


@pytest.fixture(scope="module")
def model(tmp_path_factory) -> ATMoE:
    return ATMoE.load(tiny_demo(tmp_path_factory.mktemp("stay"), mode="sigmoid"), device="cpu")


def _head(m: ATMoE, bias: float):
    r = with_head(m.router)
    with torch.no_grad():
        r.stay_bias.fill_(bias)          # +20: every request kept out; -20: every request let in
    return r


def _logits(m: ATMoE, router, overrides=None) -> torch.Tensor:
    ids = torch.tensor([m.encode(PROMPT)])
    mask = torch.ones_like(ids)
    with torch.inference_mode():
        out, call = forward_routed(m, ids, mask, mask, router=router, overrides=overrides)
    return out.logits, call


def test_kept_out_is_the_base_model_exactly_and_let_in_is_the_gates_exactly(model):
    m = model
    off = Overrides(disabled=m.experts)
    out, call = _logits(m, _head(m, 20.0))
    assert torch.equal(out, _logits(m, m.router, off)[0]) and call.stay_scores.item() > 0.99
    assert not torch.equal(out, _logits(m, m.router)[0])                   # the gates alone engage the experts
    inside, call = _logits(m, _head(m, -20.0))
    assert torch.equal(inside, _logits(m, m.router)[0]) and call.stay_scores.item() < 0.01
    g = m.generate(PROMPT, max_new_tokens=6, router=_head(m, 20.0))
    assert g.token_ids == m.generate(PROMPT, max_new_tokens=6, overrides=off).token_ids
    assert g.trace.kept_out and g.trace.experts_off and g.trace.stays_out()
    assert g.trace.router_group_weights.max() > 0.3                       # what the gates proposed stays visible
    d = json.loads(g.trace.to_json())
    assert d["kept_out"] and d["head_score"] > 0.99 and d["head_threshold"] == 0.5
    assert not m.generate(PROMPT, max_new_tokens=2, router=_head(m, -20.0)).trace.kept_out
    assert m.generate(PROMPT, max_new_tokens=2).trace.head_score is None   # no head: no score


def test_overrides_still_apply_to_a_request_kept_out(model):
    m = model
    tr = m.route(PROMPT, Overrides(groups={m.groups[0]: 0.8}), router=_head(m, 20.0))
    assert tr.kept_out and (tr.group_weights[:, 0] == pytest.approx(0.8)) and tr.group_weights[:, 1:].max() == 0


def test_the_head_is_decided_per_row_in_a_batch(model):
    m = model
    r = _head(m, 0.0)
    with torch.no_grad():                       # the score follows the instruction's embeddings
        r.stay_weight.copy_(m.model.get_input_embeddings()(torch.tensor(m.encode("cats")))[-1] * 50)
    rows = ["cats cats cats", PROMPT]
    traces = m.route_batch(rows, router=r)
    alone = [m.route(p, router=r) for p in rows]
    assert [t.kept_out for t in traces] == [t.kept_out for t in alone] and len({t.kept_out for t in traces}) == 2
    for t, a in zip(traces, alone):
        assert t.head_score == pytest.approx(a.head_score, abs=1e-5)


def test_the_head_costs_one_op_per_routed_layer_and_no_sync(model):
    m = model
    ids = torch.tensor([m.encode(PROMPT)])
    mask = torch.ones_like(ids)
    r = _head(m, -20.0)
    with torch.inference_mode():
        plain = count(lambda: forward_routed(m, ids, mask, mask))
        headed = count(lambda: forward_routed(m, ids, mask, mask, router=r))
        once = count(lambda: m._new_call(mask, router=r, input_ids=ids)).total - count(lambda: m._new_call(mask)).total
    assert headed.syncs == plain.syncs
    assert headed.total - plain.total == m.num_layers + once           # one scale per routed layer, + the head once
    assert once <= 30                                                  # the lookup and the head, before the forward


def test_training_moves_only_the_head_and_separates_the_rows(model):
    m = model
    rows = [Example(f"Tell me about {w}.", "", None, []) for w in ("cats", "rain", "music", "trains")] * 4 + \
           [Example(PROMPT, "", None, ["flags"]), Example("List the labs.", "", None, ["labs"])] * 8
    r = train_head(m, rows, steps=150, lr=0.05)
    for name, p in m.router.state_dict().items():
        assert torch.equal(r.state_dict()[name], p), name
    table = threshold_table(m, r, rows)
    assert table[0] == {"threshold": 0.5, "kept_out": 1.0, "engaged": 1.0}
    assert new_router(m).config.stay_out is False and not hasattr(new_router(m), "stay_weight")
    with pytest.raises(ValueError, match="needs rows labelled experts"):
        train_head(m, rows[:4])
    # retrained on a model that ships a head already, the head starts new: the same head a build from nothing gives
    original = m.router
    try:
        m.router = _head(m, 20.0)
        again = train_head(m, rows, steps=150, lr=0.05)
    finally:
        m.router = original
    assert torch.equal(again.stay_weight, r.stay_weight) and torch.equal(again.stay_bias, r.stay_bias)


def test_the_head_travels_in_the_router_file(model, tmp_path):
    m = model
    r = _head(m, 3.0)
    r.config.stay_out_threshold = 0.7
    back = load_router(save_router(r, tmp_path / "r.safetensors"), expected=m.router.config)
    assert back.config.stay_out and back.config.stay_out_threshold == 0.7
    assert torch.equal(back.stay_bias, r.stay_bias)
    assert load_router(save_router(m.router, tmp_path / "plain.safetensors")).config.stay_out is False


def test_the_command_trains_it_into_the_router_and_names_bad_input(model, tmp_path):
    manifest = tiny_demo(tmp_path / "demo", mode="sigmoid")
    data = tmp_path / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in [
        {"instruction": "Tell me about cats.", "output": None, "experts": []},
        {"instruction": PROMPT, "output": None, "experts": ["flags"]}] * 4))
    main(["--manifest", str(manifest), "--data", str(data), "--validation", str(data), "--steps", "50",
          "--lr", "0.05"])
    assert ATMoE.load(manifest, device="cpu").router.config.stay_out
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"instruction": "x"}\n')
    with pytest.raises(SystemExit, match=r"^error: .*bad.jsonl: line 1: missing field"):
        main(["--manifest", str(manifest), "--data", str(bad)])
    with pytest.raises(SystemExit, match="^error: --steps must be >= 1"):
        main(["--manifest", str(manifest), "--data", str(data), "--steps", "0"])


def test_a_server_may_set_the_threshold_at_load(tmp_path):
    """`ATMoE.load(..., stay_out_threshold=t)` replaces the file's threshold for every call; a router without a head,
    or a threshold outside (0, 1), is refused in one line."""
    manifest = tiny_demo(tmp_path / "m", mode="sigmoid")
    with pytest.raises(ValueError, match="^stay_out_threshold needs a router with a stay-out head; the router of "):
        ATMoE.load(manifest, device="cpu", stay_out_threshold=0.9)
    m = ATMoE.load(manifest, device="cpu")
    save_router(_head(m, 0.0), tmp_path / "m" / json.loads(manifest.read_text())["router"])   # every score 0.5
    assert ATMoE.load(manifest, device="cpu").route(PROMPT).kept_out                        # the file's 0.5
    assert not ATMoE.load(manifest, device="cpu", stay_out_threshold=0.6).route(PROMPT).kept_out
    with pytest.raises(ValueError, match=r"stay_out_threshold must be in \(0, 1\), got 1.5"):
        ATMoE.load(manifest, device="cpu", stay_out_threshold=1.5)
