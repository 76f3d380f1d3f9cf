"""Router training on a tiny model: the loss falls, checkpointing works, an interrupted run resumes."""

from __future__ import annotations

import json

import pytest
import torch

from atmoe import ATMoE
from atmoe.demo.suite import complex_rows
from atmoe.train_router import RouterTrainConfig, RouterTrainingModule, train_router
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
