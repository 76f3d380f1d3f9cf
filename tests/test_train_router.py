"""Router training on a tiny model: the loss falls, checkpointing works, an interrupted run resumes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from atmoe import ATMoE
from atmoe.router import load_router
from atmoe.train.router import RouterTrainConfig, RouterTrainingModule, train_router
from demo.suite import complex_rows
from dist_worker import kill_while_writing_checkpoint
from tiny_models import tiny_demo


@pytest.fixture
def setup(tmp_path):
    manifest = tiny_demo(tmp_path / "demo", trained=False)
    rows = complex_rows(24, seed=0, off_topic=0.2)
    data = tmp_path / "router.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return manifest, data


def _cfg(manifest, data, **kw):
    base = dict(manifest=str(manifest), data=str(data), steps=12, batch_size=4, lr=2e-2, max_length=480,
                logging_steps=1, save_steps=3)
    return RouterTrainConfig(**{**base, **kw})


@pytest.mark.parametrize("mode,checkpointing", [("softmax", False), ("sigmoid", True)])
def test_router_training_lowers_the_loss_and_saves(setup, mode, checkpointing):
    manifest, data = setup
    path, log = train_router(_cfg(manifest, data, mode=mode, gradient_checkpointing=checkpointing))
    aux = [e["aux_loss"] for e in log if "aux_loss" in e]
    assert len(aux) >= 10 and sum(aux[-3:]) / 3 < sum(aux[:3]) / 3
    m = ATMoE.load(manifest, device="cpu")  # the manifest now points at the new router
    assert m.router.trained and m.router.config.mode == mode
    assert m.route("List the lab results.").router_trained


def test_interrupted_router_training_resumes_from_the_saved_step(setup, monkeypatch):
    manifest, data = setup
    calls = []
    original = RouterTrainingModule.forward

    def crashing(self, *a, **k):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt("simulated kill")
        return original(self, *a, **k)

    monkeypatch.setattr(RouterTrainingModule, "forward", crashing)
    with pytest.raises(KeyboardInterrupt):
        train_router(_cfg(manifest, data, steps=8))
    calls.clear()
    monkeypatch.setattr(RouterTrainingModule, "forward", lambda self, *a, **k: (calls.append(1),
                                                                                 original(self, *a, **k))[1])
    _, log = train_router(_cfg(manifest, data, steps=8))
    assert len(calls) == 8 - 3  # resumed after the checkpoint at step 3
    assert max(e["step"] for e in log) == 8


def test_coadaptation_trains_the_experts_and_writes_peft_adapters_with_their_router(setup, tmp_path):
    """Stage 2: the experts' LoRA pairs learn with the router; the result is a loadable manifest of standard PEFT
    adapters (each changed, each readable by PEFT), while the source experts and manifest stay as they were."""
    from peft import PeftModel

    manifest, data = setup
    source = json.loads(manifest.read_text())
    out = tmp_path / "coadapted"
    stage1, _ = train_router(_cfg(manifest, data, mode="sigmoid", steps=4, update_manifest=False,
                                  out=str(tmp_path / "stage1.safetensors")))
    path, log = train_router(_cfg(manifest, data, mode="sigmoid", steps=6, init_router=str(stage1), train_experts=True,
                                  expert_lr=1e-2, experts_out=str(out)))
    assert path == out / "router.safetensors" and json.loads(manifest.read_text()) == source
    before, after = ATMoE.load(manifest, device="cpu"), ATMoE.load(out / "experts.json", device="cpu")
    assert after.experts == before.experts and after.router.trained
    assert after.manifest.reference_values == before.manifest.reference_values != {}   # the ranges expert's values
    for f0, f1 in zip(before.fused, after.fused):
        assert torch.equal(f0.rank_expert, f1.rank_expert)
    for i, name in enumerate(before.experts):   # every expert moved (each is routed on some rows)
        moved = [not torch.equal(*f0.expert_pair(i)[1:], *f1.expert_pair(i)[1:])
                 for f0, f1 in zip(before.fused, after.fused) if f0.expert_pair(i) is not None]
        assert any(moved), name
    # a co-adapted expert is a plain PEFT adapter: PEFT alone, on the base, gives what the expert alone gives here
    from transformers import AutoModelForCausalLM

    ids = torch.tensor(after.encode("List the lab results."))
    for name in after.experts[::3]:
        groups = {g: float(g == after.expert_groups[name]) for g in after.groups}
        ours = after.score(input_ids=ids, overrides={"groups": groups, "experts": {name: 1.0}}).logits
        ref = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(manifest.parent / "base"),
                                        out / "experts" / name).eval()
        with torch.no_grad():
            assert (ours - ref(input_ids=ids[None]).logits[0]).abs().max().item() <= 1e-4, name


def test_an_attention_router_starts_from_a_mean_router_and_learns_where_to_look(setup, tmp_path):
    """--pooling attention --init-router <mean router>: before training it is that router exactly (zero queries);
    training moves the queries; a router of another pooling is refused as a start."""
    manifest, data = setup
    stage1, _ = train_router(_cfg(manifest, data, mode="sigmoid", steps=3, update_manifest=False,
                                  out=str(tmp_path / "mean.safetensors")))
    m = ATMoE.load(manifest, device="cpu")
    mean = load_router(stage1)
    start = m.new_router(mode="sigmoid", pooling="attention")
    start.load_state_dict(mean.state_dict(), strict=False)
    start.trained = True
    prompt = "Use bullet points. List the lab results. Flag each as low, normal or high."
    a, b = m.route(prompt, input="Labs: Na 128.", router=mean), m.route(prompt, input="Labs: Na 128.", router=start)
    assert np.allclose(a.router_group_weights, b.router_group_weights, atol=1e-6)
    assert np.allclose(a.router_expert_weights, b.router_expert_weights, atol=1e-6)

    path, _ = train_router(_cfg(manifest, data, mode="sigmoid", pooling="attention", steps=4, init_router=str(stage1),
                                update_manifest=False, out=str(tmp_path / "attention.safetensors")))
    trained = load_router(path)
    assert trained.config.pooling == "attention" and trained.query.abs().max() > 0
    assert not torch.equal(trained.group_weight, mean.group_weight)
    with pytest.raises(ValueError, match="attention pooling"):   # an attention router is no start for a mean one
        train_router(_cfg(manifest, data, mode="sigmoid", steps=2, init_router=str(path), update_manifest=False,
                          out=str(tmp_path / "again.safetensors")))


def test_a_start_router_with_a_stay_out_head_trains_and_keeps_its_head(setup, tmp_path):
    """The shipped router carries a stay-out head; training its gates again (--init-router) keeps the head as it is:
    it reads the input embeddings only, so the gates' training leaves it valid."""
    from atmoe.router import save_router
    from atmoe.train.stay_out import with_head

    manifest, data = setup
    stage1, _ = train_router(_cfg(manifest, data, mode="sigmoid", steps=2, update_manifest=False,
                                  out=str(tmp_path / "stage1.safetensors")))
    headed = with_head(load_router(stage1), threshold=0.7)
    with torch.no_grad():   # a head that lets these rows in (a kept-out row gives the gates no gradient)
        headed.stay_weight.normal_(0, 0.01)
        headed.stay_bias.fill_(-5.0)
    save_router(headed, tmp_path / "headed.safetensors")
    path, _ = train_router(_cfg(manifest, data, mode="sigmoid", steps=3, update_manifest=False,
                                init_router=str(tmp_path / "headed.safetensors"), out=str(tmp_path / "again.safetensors")))
    again = load_router(path)
    assert again.config.stay_out and again.config.stay_out_threshold == 0.7
    assert torch.equal(again.stay_weight, headed.stay_weight) and torch.equal(again.stay_bias, headed.stay_bias)
    assert not torch.equal(again.group_weight, headed.group_weight)                   # the gates did train


def test_pool_dropout_drops_tokens_but_never_a_whole_row():
    from atmoe.train.router import drop_tokens

    torch.manual_seed(0)
    mask = torch.zeros(200, 12, dtype=torch.long)
    mask[:, 2:8] = 1                       # six instruction tokens per row
    mask[0, 2:8], mask[0, 5] = 0, 1        # and a row with a single one
    out = drop_tokens(mask, 0.5)
    assert out.dtype == mask.dtype and not (out.bool() & ~mask.bool()).any()   # only set tokens can be dropped
    assert (out.sum(-1) >= 1).all() and out[0].tolist() == mask[0].tolist()
    share = 1 - out[1:].sum() / mask[1:].sum()
    assert 0.4 < share < 0.6, share        # about p dropped (rows that would lose all keep theirs)
    with pytest.raises(ValueError, match="pool_dropout"):
        RouterTrainConfig(manifest="m", data="d", pool_dropout=1.0)


def test_train_only_trains_those_experts_and_leaves_the_others_exactly_as_loaded(setup, tmp_path):
    """`train_only` (the cover stage's knowledge group): under a frozen router, the named experts move and every
    other expert's pairs are written back bit for bit (float32 out, so no rounding hides a change)."""
    manifest, data = setup
    stage1, _ = train_router(_cfg(manifest, data, mode="sigmoid", steps=2, update_manifest=False,
                                  out=str(tmp_path / "stage1.safetensors")))
    out = tmp_path / "only"
    train_router(_cfg(manifest, data, mode="sigmoid", steps=4, init_router=str(stage1), train_experts=True,
                      freeze_router=True, train_only=("flags", "ranges"), expert_lr=1e-2, experts_out=str(out),
                      experts_dtype="float32"))
    before, after = ATMoE.load(manifest, device="cpu"), ATMoE.load(out / "experts.json", device="cpu")
    for i, name in enumerate(before.experts):
        same = [all(torch.equal(a, b) for a, b in zip(f0.expert_pair(i), f1.expert_pair(i)))
                for f0, f1 in zip(before.fused, after.fused) if f0.expert_pair(i) is not None]
        assert (not all(same)) if name in ("flags", "ranges") else all(same), name
    with pytest.raises(ValueError, match="train_only: nope not among the experts"):
        train_router(_cfg(manifest, data, mode="sigmoid", steps=1, init_router=str(stage1), train_experts=True,
                          train_only=("nope",), experts_out=str(tmp_path / "bad")))
    with pytest.raises(ValueError, match="train_only names experts to train: it needs train_experts"):
        RouterTrainConfig(manifest="m", data="d", train_only=("flags",))


def test_a_frozen_router_needs_experts_to_train_and_a_router_to_start_from():
    for kw in ({"init_router": "r"}, {"train_experts": True}):
        with pytest.raises(ValueError, match="freeze_router needs train_experts and an init_router"):
            RouterTrainConfig(manifest="m", data="d", freeze_router=True, **kw)


def test_a_checkpoint_cut_short_by_a_kill_is_skipped_on_relaunch(setup, tmp_path, monkeypatch, capsys):
    """Killed while writing checkpoint-6 (weights written, trainer_state.json not: the Trainer writes it last, then
    rotates checkpoint-3 away): the relaunch of the same command resumes from checkpoint-3, says so, and ends with the
    router an uninterrupted run trains."""
    manifest, data = setup
    full, _ = train_router(_cfg(manifest, data, steps=8, update_manifest=False, out=str(tmp_path / "full.safetensors")))
    cfg = _cfg(manifest, data, steps=8, update_manifest=False, out=str(tmp_path / "cut.safetensors"))
    kill_while_writing_checkpoint(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        train_router(cfg)
    monkeypatch.undo()
    ckpt = tmp_path / "cut.checkpoints"
    assert sorted(p.name for p in ckpt.iterdir()) == ["checkpoint-3", "checkpoint-6"]
    assert not (ckpt / "checkpoint-6" / "trainer_state.json").exists()
    assert (ckpt / "checkpoint-6" / "model.safetensors").exists()   # the weights were written

    capsys.readouterr()
    calls, forward = [], RouterTrainingModule.forward
    monkeypatch.setattr(RouterTrainingModule, "forward", lambda self, *a, **k: (calls.append(1),
                                                                                 forward(self, *a, **k))[1])
    path, log = train_router(cfg)
    said = capsys.readouterr().out
    assert f"resuming from {ckpt / 'checkpoint-3'} (step 3)" in said
    assert f"skipping checkpoint {ckpt / 'checkpoint-6'}" in said
    assert len(calls) == 8 - 3 and [e["step"] for e in log if "loss" in e][-1] == 8
    diff = max(float((a - b).abs().max()) for a, b in zip(load_router(path).state_dict().values(),
                                                         load_router(full).state_dict().values()))
    print(f"measured: router, cut short and resumed vs uninterrupted max |Δ| = {diff:.2e}")
    assert diff <= 1e-5
    assert not ckpt.exists()   # a finished run leaves no checkpoints


def test_no_resume_starts_afresh(setup, tmp_path, monkeypatch):
    manifest, data = setup
    cfg = _cfg(manifest, data, steps=4, update_manifest=False, out=str(tmp_path / "r.safetensors"), resume=False)
    stale = tmp_path / "r.checkpoints" / "checkpoint-9"
    stale.mkdir(parents=True)
    (stale / "trainer_state.json").write_text(json.dumps({"global_step": 9}))
    calls, forward = [], RouterTrainingModule.forward
    monkeypatch.setattr(RouterTrainingModule, "forward", lambda self, *a, **k: (calls.append(1),
                                                                                 forward(self, *a, **k))[1])
    train_router(cfg)
    assert len(calls) == 4 and not stale.exists()


def test_shard_base_needs_several_processes(setup):
    manifest, data = setup
    with pytest.raises(ValueError, match="several processes"):
        train_router(_cfg(manifest, data, shard_base=True))
