"""Core engine invariants on tiny random models: PEFT equivalence, normalisation, overrides, one pass, threads."""

from __future__ import annotations

import threading

import numpy as np
import pytest
import torch
from peft import PeftModel
from tiny_models import TARGETS, save_adapter, tiny_model

from atmoe import ATMoE, Overrides
from atmoe.model import enable_gradient_checkpointing, forward_routed, new_router
from atmoe.router import load_router, save_router

IDS = torch.tensor([5, 17, 33, 2, 99, 64, 7, 21, 40, 11])


def build(tmp_path, arch="llama", mode="softmax", groups=("task", "task", "style"), ranks=(4, 8, 2),
          rslora=(False, False, True), same_targets=False):
    base = tiny_model(arch)
    specs = []
    for i, (g, r, rs) in enumerate(zip(groups, ranks, rslora)):
        targets = TARGETS[arch] if same_targets else TARGETS[arch][i % 2:]  # experts differ in targets
        path = save_adapter(base, tmp_path / f"e{i}", targets, r=r, alpha=2 * r, seed=10 + i, use_rslora=rs)
        specs.append((g, f"e{i}", path, f"expert {i}"))
    return ATMoE.from_experts(tiny_model(arch), None, specs, router_mode=mode), specs


def randomize(router, seed=0):
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in router.parameters():
            p.normal_(0, 0.5)
    router.trained = True


def one_hot(m, expert):
    g = m.expert_groups[expert]
    return Overrides(groups={h: float(h == g) for h in m.groups}, experts={expert: 1.0})


@pytest.mark.parametrize("arch", ["llama", "gpt2", "qwen2"])
def test_one_expert_equals_peft_with_that_adapter(tmp_path, arch):
    m, specs = build(tmp_path, arch)
    randomize(m.router)
    for _, name, path, _ in specs:
        ours = m.score(input_ids=IDS, overrides=one_hot(m, name)).logits
        ref = PeftModel.from_pretrained(tiny_model(arch), path).eval()
        with torch.no_grad():
            theirs = ref(input_ids=IDS[None]).logits[0]
        assert (ours - theirs).abs().max().item() <= 1e-4, name
    base_logits = tiny_model(arch)(input_ids=IDS[None]).logits[0]
    assert (ours - base_logits).abs().max().item() > 1e-2  # the experts really do something


def test_fixed_weights_equal_peft_weighted_cat(tmp_path):
    m, specs = build(tmp_path, mode="sigmoid", groups=("a", "b", "c"), rslora=(False,) * 3, same_targets=True)
    weights = {"a": 0.7, "b": 0.3, "c": 0.45}
    ours = m.score(input_ids=IDS, overrides=Overrides(groups=weights)).logits
    ref = PeftModel.from_pretrained(tiny_model("llama"), specs[0][2], adapter_name="e0")
    for _, name, path, _ in specs[1:]:
        ref.load_adapter(path, adapter_name=name)
    ref.add_weighted_adapter(["e0", "e1", "e2"], list(weights.values()), "mix", combination_type="cat")
    ref.set_adapter("mix")
    with torch.no_grad():
        theirs = ref.eval()(input_ids=IDS[None]).logits[0]
    assert (ours - theirs).abs().max().item() <= 1e-4


@pytest.mark.parametrize("mode", ["softmax", "sigmoid", "flat"])
def test_weights_normalise_and_overrides_show_in_trace(tmp_path, mode):
    m, _ = build(tmp_path, mode=mode)
    randomize(m.router)
    plain = m.score(input_ids=IDS)
    tr = plain.trace
    if mode != "sigmoid":
        np.testing.assert_allclose(tr.group_weights.sum(1), 1, atol=1e-6)
    assert ((tr.group_weights >= 0) & (tr.group_weights <= 1)).all()
    for g in m.groups:
        cols = [i for i, e in enumerate(m.experts) if m.expert_groups[e] == g]
        np.testing.assert_allclose(tr.expert_weights[:, cols].sum(1), 1, atol=1e-6)
    np.testing.assert_allclose(tr.effective_weights, tr.group_weights[:, tr.group_index] * tr.expert_weights)
    assert len(np.unique(tr.group_weights.round(4), axis=0)) > 1  # layers route differently

    ov = Overrides(groups={"style": 0.2}, experts={"e0": 0.9}, layers=(1, 2))
    over = m.score(input_ids=IDS, overrides=ov)
    t2 = over.trace
    # The router reads the hidden state entering each layer, so overrides change it only after their first layer.
    np.testing.assert_allclose(t2.router_group_weights[:2], tr.router_group_weights[:2], atol=1e-6)
    assert np.abs(t2.router_group_weights[2] - tr.router_group_weights[2]).max() > 1e-4
    np.testing.assert_allclose(t2.group_weights[0], tr.group_weights[0], atol=1e-6)  # layer 0 untouched
    np.testing.assert_allclose(t2.group_weights[1:, m.groups.index("style")], 0.2, atol=1e-6)
    np.testing.assert_allclose(t2.expert_weights[1:, 0], 0.9, atol=1e-6)
    np.testing.assert_allclose(t2.expert_weights[1:, 1], 0.1, atol=1e-6)  # the free expert gets the rest
    if mode != "sigmoid":
        np.testing.assert_allclose(t2.group_weights[1:, m.groups.index("task")], 0.8, atol=1e-6)
    assert t2.group_overridden[1:, 1].all() and not t2.group_overridden[0].any()
    assert t2.overrides == ov                      # the trace keeps the Overrides object
    assert (over.logits - plain.logits).abs().max() > 1e-4


def test_disabling_every_expert_gives_the_base_model(tmp_path):
    m, _ = build(tmp_path)
    randomize(m.router)
    off = m.score(input_ids=IDS, overrides=Overrides(disabled=m.experts)).logits
    base = tiny_model("llama")(input_ids=IDS[None]).logits[0]
    assert (off - base).abs().max().item() <= 1e-5
    tr = m.score(input_ids=IDS, overrides=Overrides(disabled=["e0"])).trace
    np.testing.assert_allclose(tr.expert_weights[:, :2], [[0, 1]] * 3, atol=1e-6)


@pytest.mark.parametrize("bad", [
    dict(groups={"nope": 0.5}), dict(experts={"nope": 0.5}), dict(disabled=["nope"]),
    dict(groups={"task": -0.1}), dict(groups={"task": float("nan")}), dict(experts={"e0": float("inf")}),
    dict(groups={"task": 1.5}), dict(groups={"task": True}), dict(layers=(0, 3)), dict(layers=(2, 1)),
    dict(layers=(-1, 1)), dict(groups={"task": 0.7, "style": 0.6}), dict(groups={"task": 0.5, "style": 0.4}),
    dict(experts={"e0": 0.7, "e1": 0.6}), dict(experts={"e2": 0.5}), dict(experts={"e0": 1.0}, disabled=["e0"]),
    dict(groups={"style": 0.5}, disabled=["e2"]), dict(layers="0-2"),
])
def test_bad_overrides_raise_value_error(tmp_path, bad):
    m, _ = build(tmp_path)
    with pytest.raises(ValueError):
        m.score(input_ids=IDS, overrides=Overrides(**bad))


def test_one_forward_pass_routes_and_scores(tmp_path):
    m, _ = build(tmp_path)
    calls = [0] * m.num_layers
    for i, name in enumerate(m.layer_names):
        m.model.get_submodule(name).register_forward_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    m.score(input_ids=IDS)
    assert calls == [1] * m.num_layers


def test_threads_with_different_overrides_match_solo_runs(tmp_path):
    m, _ = build(tmp_path)
    randomize(m.router)
    cases = [None, Overrides(groups={"style": 0.0}), Overrides(experts={"e1": 1.0}, layers=(0, 0)),
             Overrides(disabled=["e0", "e2"])]
    solo = [m.score(input_ids=IDS, overrides=ov).logits for ov in cases]
    results, errors = {}, []

    def work(k):
        try:
            for _ in range(8):
                results.setdefault(k, []).append(m.score(input_ids=IDS, overrides=cases[k]).logits)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,)) for k in range(len(cases))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for k, outs in results.items():
        assert all(torch.equal(o, solo[k]) for o in outs)
    assert not any(torch.equal(solo[0], s) for s in solo[1:])


def test_router_save_load_round_trip(tmp_path):
    m, _ = build(tmp_path)
    randomize(m.router)
    before = m.score(input_ids=IDS).trace
    path = save_router(m.router, tmp_path / "router.safetensors")
    loaded = load_router(path, expected=m.router.config)
    after = m.score(input_ids=IDS, router=loaded).trace
    assert loaded.trained
    np.testing.assert_array_equal(before.group_weights, after.group_weights)
    np.testing.assert_array_equal(before.expert_weights, after.expert_weights)


def test_untrained_router_is_uniform_and_says_so(tmp_path):
    m, _ = build(tmp_path)
    tr = m.score(input_ids=IDS).trace
    assert not tr.router_trained
    np.testing.assert_allclose(tr.group_weights, 0.5)
    np.testing.assert_allclose(tr.expert_weights, [[0.5, 0.5, 1.0]] * 3)


def test_non_finite_hidden_states_fall_back_to_uniform(tmp_path):
    m, _ = build(tmp_path)
    randomize(m.router)
    hidden = torch.full((1, 32), float("inf"))
    alpha, beta, fallback = m.router(0, hidden)
    assert fallback.all() and torch.isfinite(alpha).all() and torch.isfinite(beta).all()
    np.testing.assert_allclose(alpha.detach().numpy(), [[0.5, 0.5]])
    # Through the model: an overflow entering layer 1 is reported in the trace, weights stay finite.
    layer = m.model.get_submodule(m.layer_names[1])
    layer.register_forward_pre_hook(lambda mod, args: (args[0] * float("inf"),) + args[1:], prepend=True)
    tr = m.score(input_ids=IDS).trace
    assert tr.fallback_layers == [1, 2] and np.isfinite(tr.effective_weights).all()


def _router_grads(m, checkpointing):
    m.router.zero_grad(set_to_none=True)
    m.router.requires_grad_(True)
    m.model.train()
    ids = IDS[None].repeat(2, 1)
    prompt = torch.zeros_like(ids)
    prompt[:, :4] = 1
    out, _ = forward_routed(m, ids, torch.ones_like(ids), prompt, labels=ids, use_cache=False)
    out.loss.backward()
    m.model.eval()
    return {n: p.grad.clone() for n, p in m.router.named_parameters()}


def test_router_trains_under_gradient_checkpointing(tmp_path):
    m, _ = build(tmp_path)
    randomize(m.router)
    plain = _router_grads(m, False)
    enable_gradient_checkpointing(m)
    runs = []
    for f in m.fused:
        f.register_forward_hook(lambda *_: runs.append(1))
    ckpt = _router_grads(m, True)
    # The backward recompute ran fused layers again (checkpointing is on), and found the call: same gradients.
    assert len(runs) > len(m.fused)
    for n in plain:
        assert plain[n].abs().sum() > 0, n
        torch.testing.assert_close(ckpt[n], plain[n], rtol=1e-4, atol=1e-6)


def test_merged_decode_matches_the_fused_path(tmp_path):
    from tiny_models import tiny_demo
    m = ATMoE.load(tiny_demo(tmp_path / "demo"), device="cpu")
    ov = Overrides(groups={"style": 0.1}, layers=(1, 2))
    plain = m.generate("List the vital signs.", max_new_tokens=12, overrides=ov)
    merged = m.generate("List the vital signs.", max_new_tokens=12, overrides=ov, merge=True)
    assert merged.token_ids == plain.token_ids
    np.testing.assert_allclose(merged.trace.effective_weights, plain.trace.effective_weights, atol=1e-6)
    assert merged.merged and merged.path == "merged" and plain.path == "folded"
    ids = torch.tensor(m.encode("List the vital signs."))[None]
    mask = torch.ones_like(ids)
    before = [p.clone() for p in m.model.parameters()]
    with torch.inference_mode():
        a, _ = forward_routed(m, ids, mask, mask, overrides=ov)
        b, _ = forward_routed(m, ids, mask, mask, overrides=ov, merge=True)
    assert (a.logits - b.logits).abs().max().item() <= 1e-4
    assert all(torch.equal(p, q) for p, q in zip(before, m.model.parameters()))   # the shared base is never written
    assert m.merge_bytes == sum(f.base_layer.weight.nbytes for f in m.fused) > 0


def test_token_labels_put_multibyte_characters_on_the_token_that_completes_them():
    from tiny_models import tiny_tokenizer

    from atmoe.tokens import token_labels
    tok = tiny_tokenizer()
    text = "Fièvre 38.5°C — patient 🙂 stable"
    ids = tok(text, add_special_tokens=False)["input_ids"]
    assert any("\ufffd" in tok.decode([t]) for t in ids)  # one-by-one decoding really splits characters here
    labels = token_labels(tok, ids)
    assert len(labels) == len(ids) and "".join(labels) == text
    assert not any("\ufffd" in label for label in labels)
    assert "" in labels and any("🙂" in label for label in labels)  # leading byte tokens empty, the last carries it




def test_overrides_checked_once_are_used_as_compiled(tmp_path):
    """An `Overrides` checked with `check_overrides` (what the dashboard does when the user applies them) is passed on
    compiled: the call gives the same answer and trace, and compiled overrides from another router mode are refused."""
    from tiny_models import tiny_demo
    m = ATMoE.load(tiny_demo(tmp_path / "demo"), device="cpu")
    ov = Overrides(groups={"style": 0.2}, experts={"labs": 1.0}, layers=(1, 2))
    compiled = m.check_overrides(ov)
    a = m.generate("List the vital signs.", max_new_tokens=5, overrides=ov)
    b = m.generate("List the vital signs.", max_new_tokens=5, overrides=compiled)
    assert a.token_ids == b.token_ids
    np.testing.assert_array_equal(a.trace.effective_weights, b.trace.effective_weights)
    with pytest.raises(ValueError, match="another model or router mode"):
        m.route("List the vital signs.", overrides=compiled, router=new_router(m, mode="sigmoid"))


def test_a_replayed_trace_routes_another_prompt_exactly_as_the_first(tmp_path):
    """`replay(trace, m.layout)`: every layer's α and β fixed to the trace's. Replayed on its own prompt it changes
    nothing; on another prompt the weights used are the first prompt's: the first one's routing at work."""
    from tiny_models import tiny_demo

    from atmoe.overrides import replay
    m = ATMoE.load(tiny_demo(tmp_path / "demo"), device="cpu")
    randomize(m.router, seed=3)
    a, b = "List the vital signs.", "Bullet the labs in plain words."
    first = m.generate(a, max_new_tokens=6)
    again = m.generate(a, max_new_tokens=6, overrides=replay(first.trace, m.layout))
    assert again.token_ids == first.token_ids
    np.testing.assert_allclose(again.trace.effective_weights, first.trace.effective_weights, atol=1e-6)
    other = m.generate(b, max_new_tokens=6, overrides=replay(first.trace, m.layout))
    own = m.generate(b, max_new_tokens=6)
    np.testing.assert_allclose(other.trace.effective_weights, first.trace.effective_weights, atol=1e-6)
    assert np.abs(own.trace.effective_weights - first.trace.effective_weights).max() > 1e-3
    assert other.trace.group_overridden.all() and other.trace.expert_overridden.all()
    with pytest.raises(ValueError, match="other groups or experts"):
        replay(first.trace, build(tmp_path / "other")[0].layout)


def test_the_model_class_is_the_user_api_and_moved_methods_still_work_with_a_warning(tmp_path):
    """ATMoE's public members are the user API (≤ 12); the training and call plumbing moved to functions in
    atmoe.model, and the old method names keep working one release with a DeprecationWarning naming the new home."""
    from tiny_models import tiny_demo

    from atmoe.model import encode_prompt
    public = [n for n in dir(ATMoE) if not n.startswith("_")]
    assert len(public) <= 12 and {"load", "route", "score", "stream", "generate", "explain"} <= set(public)
    m = ATMoE.load(tiny_demo(tmp_path / "demo"), device="cpu")
    with pytest.warns(DeprecationWarning, match=r"atmoe\.model\.encode_prompt\(m"):
        old = m.encode_prompt("List the vital signs.")
    assert old == encode_prompt(m, "List the vital signs.")
    with pytest.warns(DeprecationWarning, match="new_router"):
        assert m.new_router(mode="sigmoid").config == new_router(m, mode="sigmoid").config
    with pytest.raises(AttributeError, match="no attribute 'nonsense'"):
        m.nonsense  # noqa: B018
