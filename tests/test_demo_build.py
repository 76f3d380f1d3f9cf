"""`make assets` in miniature: the whole staged build on a tiny model, its resume, and the expert gate."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from atmoe import ATMoE
from atmoe.demo import build as build_mod
from atmoe.demo.build import ROUTERS, BuildConfig, build, build_experts
from atmoe.demo.suite import GROUPS
from tiny_models import tiny_demo


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("build")
    tiny_demo(root / "tiny", trained=False)   # only for its base folder (a tiny Llama + tokenizer)
    cfg = BuildConfig(out=str(root / "assets"), work=str(root / "work"), base=str(root / "tiny" / "base"),
                      expert_steps=0.02, router_steps=2, router_batch=4, quick=True)
    build(cfg)
    return cfg


def test_quick_build_writes_every_stage(built):
    out = built.out
    experts = [e for names in GROUPS.values() for e in names]
    for e in experts:
        gate = json.loads(open(f"{out}/experts/{e}/gate.json").read())
        assert gate["expert"] == e and gate["n"] == 4 and 0 <= gate["f1"] <= 1
    m = ATMoE.load(f"{out}/experts.json", device="cpu")
    assert m.experts == experts and m.router.trained and m.router.config.mode == ROUTERS[0][1]
    results = json.loads(open(f"{out}/eval/results.json").read())
    assert results["shipped"] == ROUTERS[0][0] and results["n"] == 8
    assert {"base", "oracle_constant", "router_constant", *(r[0] for r in ROUTERS)} <= set(results["systems"])
    assert all(len(a) == 8 for a in results["answers"].values())
    assert not Path(out, "eval", "partial.json").exists()   # the resume file is gone once the table is written


def test_rerun_resumes_without_training_again(built, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("a finished stage was run again")
    monkeypatch.setattr("atmoe.train_expert.train_expert", no_training)
    monkeypatch.setattr("atmoe.train_router.train_router", no_training)
    build(dataclasses.replace(built, stages=("suite", "experts", "routers")))


def test_an_expert_below_the_gate_stops_the_build_naming_it(built, monkeypatch, capsys):
    monkeypatch.setattr(build_mod, "GATE", 1.01)   # no expert can pass: the first one checked must stop the build
    first = next(iter(build_mod.EXPERT_STEPS))
    (Path(built.out) / "experts" / first / "gate.json").unlink()
    with pytest.raises(SystemExit, match=f"expert '{first}' failed its gate"):
        build_experts(dataclasses.replace(built, quick=False), Path(built.work) / "suite", Path(built.out))


def test_bad_build_settings_are_named():
    with pytest.raises(ValueError, match="unknown stage"):
        BuildConfig(stages=("suite", "bake"))
    with pytest.raises(ValueError, match="expert_steps"):
        BuildConfig(expert_steps=0)
