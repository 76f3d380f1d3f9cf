"""`make assets` in miniature: the whole staged build on a tiny model, its resume, and the expert gate."""

from __future__ import annotations

import dataclasses
import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from atmoe import ATMoE
from demo import build as build_mod
from demo.build import build, build_experts
from demo.config import COADAPTED, ROUTERS, BuildConfig
from demo.suite import GROUPS
from tiny_models import tiny_demo


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    root = tmp_path_factory.mktemp("build")
    tiny_demo(root / "tiny", trained=False)   # only for its base folder (a tiny Llama + tokenizer)
    cfg = BuildConfig(out=str(root / "assets"), work=str(root / "work"), base=str(root / "tiny" / "base"),
                      expert_steps=0.02, router_steps=2, router_batch=4, coadapt_steps=2, quick=True)
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
    shipped = COADAPTED[0]
    assert shipped.shipped
    co = ATMoE.load(f"{out}/{shipped.folder}/experts.json", device="cpu")   # stage 2: its own experts and router
    assert co.experts == experts and co.router.trained and co.router.config.mode == shipped.mode
    assert co.router.config.pooling == shipped.pooling == "attention" and co.router.query.abs().max() > 0
    assert any(not (a.lora_A.shape == b.lora_A.shape and (a.lora_A == b.lora_A).all())
               for a, b in zip(m.fused, co.fused))
    results = json.loads(open(f"{out}/eval/results.json").read())
    assert results["shipped"] == shipped.name and results["n"] == 8
    assert {"base", "oracle_constant", "router_constant", *(r[0] for r in ROUTERS), *(v.name for v in COADAPTED),
            "coadapted:oracle_constant", "coadapted:router_constant"} == set(results["systems"]) - {
        s for s in results["systems"] if s.startswith("expert:")} - {"uniform_merge"}
    assert all(len(a) == 8 for a in results["answers"].values())
    ablation = COADAPTED[1]                       # built in the work folder, not shipped
    assert ablation.name in results["systems"] and not ablation.shipped
    assert not Path(out, ablation.folder).exists() and Path(built.work, ablation.folder, "experts.json").exists()


def test_the_built_files_hold_no_absolute_path(built):
    """The engine's writers record the base's folder and absolute paths; the build makes them portable."""
    from demo.portable import absolute_paths
    cards = sorted(Path(built.out).rglob("atmoe_expert.json"))
    assert len(cards) == 12
    assert all(json.loads(c.read_text())["base"]["id"] == "base" for c in cards)   # the tiny base folder's name
    found = {}
    for p in Path(built.out).rglob("*.json"):
        data = json.loads(p.read_text())
        if p.name == "experts.json":   # a manifest names the base it loads: here a local folder, null when shipped
            assert data.pop("base_model") == built.base
        if hits := absolute_paths(data):
            found[str(p)] = hits
    assert found == {}


def test_the_abstain_stage_gives_the_shipped_router_a_stay_out_head_chosen_on_training_data(built, capsys):
    from demo.config import ABSTAIN, SHIPPED
    from demo.suite import ROUTER_PHRASES
    cfg = dataclasses.replace(built, stages=("abstain",))
    build(cfg)
    suite = Path(built.work) / "suite"
    read = lambda name: [json.loads(x) for x in (suite / name).read_text().splitlines()]   # noqa: E731
    train, validation, requests = read("stay_out.jsonl"), read("stay_out_validation.jsonl"), \
        read("abstain_requests.jsonl")
    held = [r for r in requests if r["meta"].get("family")][-cfg.abstain_validation:]
    assert not {r["instruction"] for r in held} & {r["instruction"] for r in train}
    assert all(r["output"] is None for r in train + validation)
    assert len(train) == len(read("router_train.jsonl")) + len(requests) - cfg.abstain_validation
    phrases = {p for ps in ROUTER_PHRASES.values() for p in ps}
    shifted = [r for r in validation if r["experts"]]          # in-skill rows in wordings the head never trained on
    assert shifted and all(s in phrases for r in shifted for s in re.split(r"(?<=[.?!]) ", r["instruction"]))
    assert not {r["instruction"] for r in shifted} & {r["instruction"] for r in train}
    shipped = ATMoE.load(SHIPPED.path(built) / "experts.json", device="cpu")
    m = ATMoE.load(Path(built.work) / ABSTAIN.folder / "experts.json", device="cpu")
    assert m.router.config.stay_out and not shipped.router.config.stay_out
    for name, p in shipped.router.state_dict().items():          # the gates are the shipped ones, bit for bit
        assert torch.equal(m.router.state_dict()[name], p), name
    chosen = json.loads((Path(built.work) / ABSTAIN.folder / "stay_out.json").read_text())
    assert m.router.config.stay_out_threshold == chosen["threshold"] and len(chosen["table"]) > 1
    assert not Path(built.out, ABSTAIN.folder).exists()          # the shipped assets are untouched
    build(cfg)                                                    # resumable: a second run skips it
    assert f"{ABSTAIN.name}: exists, skipped" in capsys.readouterr().out


def test_rerun_resumes_without_training_again(built, monkeypatch):
    def no_training(*a, **k):
        raise AssertionError("a finished stage was run again")
    monkeypatch.setattr("atmoe.train.expert.train_expert", no_training)
    monkeypatch.setattr("atmoe.train.router.train_router", no_training)
    build(dataclasses.replace(built, stages=("suite", "experts", "routers", "coadapt", "reroute", "cover")))


def test_reroute_swaps_each_coadapted_router_and_a_cut_before_its_record_does_not_train_again(built, monkeypatch):
    """The reroute stage trains each co-adapted router again on writer.jsonl (gates only: the experts stay as
    co-adapted), the shipped one and its flat ablation alike, and records the router it wrote; stage 2's loss log
    is kept beside it. Cut after training, before the swap or the record, a rerun swaps in what was trained without
    training again."""
    from demo.routers import REROUTED, _sha256, rerouted
    records = {}
    for v in COADAPTED:
        folder = v.path(built)
        record = records[v.name] = json.loads((folder / REROUTED).read_text())
        assert record["data"] == "writer.jsonl" and record["steps"] == built.reroute_steps
        assert record["router_sha256"] == _sha256(folder / "router.safetensors")
        assert (folder / "coadapt.log.jsonl").exists() and (folder / "router.log.jsonl").exists()
        assert _sha256(rerouted(built, v)) == record["router_sha256"]
        assert ATMoE.load(folder / "experts.json", device="cpu").router.config.mode == v.mode
    assert len({r["router_sha256"] for r in records.values()}) == len(COADAPTED)

    def no_training(*a, **k):
        raise AssertionError("the rerouted router was trained again")
    monkeypatch.setattr("atmoe.train.router.train_router", no_training)
    folder = COADAPTED[0].path(built)
    coadapt_log = (folder / "coadapt.log.jsonl").read_bytes()
    (folder / REROUTED).unlink()                   # killed after the swap, before the record
    build(dataclasses.replace(built, stages=("reroute",)))
    assert json.loads((folder / REROUTED).read_text()) == records[COADAPTED[0].name]
    (folder / REROUTED).unlink()                   # killed before the swap: the co-adapted router still in place
    (folder / "router.safetensors").write_bytes(b"not yet swapped")
    build(dataclasses.replace(built, stages=("reroute",)))
    assert json.loads((folder / REROUTED).read_text()) == records[COADAPTED[0].name]
    assert (folder / "coadapt.log.jsonl").read_bytes() == coadapt_log


def test_cover_trains_each_variants_experts_alone_and_a_cut_before_its_record_does_not_train_again(built,
                                                                                                   monkeypatch):
    """The cover stage trains each rerouted variant's experts on cover.jsonl (every combination, the held-out ones
    included), the router frozen: the router file is the rerouted one, byte for byte, and each expert's weights are
    the ones trained, its stage-2 record kept beside the cover's. Cut after training, before the swap or the record,
    a rerun swaps in what was trained without training again."""
    from demo.routers import COVERED, REROUTED, _sha256, covered
    from demo.suite import HELDOUT_COMBOS
    rows = [json.loads(line) for line in (Path(built.work) / "suite" / "cover.jsonl").read_text().splitlines()]
    assert {tuple(r["meta"]["combo"]) for r in rows} >= set(HELDOUT_COMBOS)
    records = {}
    for v in COADAPTED:
        folder = v.path(built)
        record = records[v.name] = json.loads((folder / COVERED).read_text())
        assert record["data"] == "cover.jsonl" and record["steps"] == built.cover_steps and record["trained"] == "all"
        assert _sha256(folder / "router.safetensors") == json.loads((folder / REROUTED).read_text())["router_sha256"]
        assert set(record["experts_sha256"]) == {e for names in GROUPS.values() for e in names}
        for expert, sha in record["experts_sha256"].items():
            assert _sha256(folder / "experts" / expert / "adapter_model.safetensors") == sha
            meta = json.loads((folder / "experts" / expert / "atmoe_expert.json").read_text())
            assert meta["coadapted"]["steps"] == built.coadapt_steps and meta["covered"]["steps"] == built.cover_steps
        assert sorted(ATMoE.load(folder / "experts.json", device="cpu").experts) == list(record["experts_sha256"])
        trained, kept = (load_file(f / "router.safetensors") for f in (covered(built, v), folder))
        assert trained.keys() == kept.keys() and all(torch.equal(trained[k], kept[k]) for k in kept)   # frozen

    def no_training(*a, **k):
        raise AssertionError("the covered experts were trained again")
    monkeypatch.setattr("atmoe.train.router.train_router", no_training)
    folder = COADAPTED[0].path(built)
    weights = folder / "experts" / "flags" / "adapter_model.safetensors"
    (folder / COVERED).unlink()                    # killed mid-swap: one expert still the rerouted variant's
    weights.write_bytes(b"not yet swapped")
    build(dataclasses.replace(built, stages=("cover",)))
    assert json.loads((folder / COVERED).read_text()) == records[COADAPTED[0].name]
    assert weights.read_bytes() == (covered(built, COADAPTED[0]) / "experts" / "flags" / weights.name).read_bytes()


def test_cover_trains_only_the_experts_it_is_given(built, tmp_path, monkeypatch):
    """`cover_experts`: the stage hands them to the trainer (`train_only`, tests/test_train_router.py), and the
    record says which were trained; an unknown name is refused when the build is configured."""
    from demo.routers import COVERED
    cfg = dataclasses.replace(built, out=str(tmp_path / "assets"), work=str(tmp_path / "work"), stages=("cover",),
                              cover_experts=("flags", "ranges"))
    shutil.copytree(built.out, cfg.out)
    shutil.copytree(Path(built.work) / "suite", Path(cfg.work) / "suite")
    shutil.copytree(Path(built.work) / COADAPTED[1].folder, COADAPTED[1].path(cfg))
    seen = []

    def capture(c):
        seen.append(c.train_only)
        raise KeyboardInterrupt
    monkeypatch.setattr("atmoe.train.router.train_router", capture)
    for v in COADAPTED:
        (v.path(cfg) / COVERED).unlink()
    with pytest.raises(KeyboardInterrupt):
        build(cfg)
    assert seen == [("flags", "ranges")]
    with pytest.raises(ValueError, match=r"cover_experts: unknown expert\(s\) \['nope'\]"):
        dataclasses.replace(built, cover_experts=("nope",))


def test_cover_before_reroute_says_which_stage_is_missing(built, tmp_path):
    from demo.routers import COVERED, REROUTED
    cfg = dataclasses.replace(built, out=str(tmp_path / "assets"), stages=("cover",))
    shutil.copytree(built.out, tmp_path / "assets")
    for stamp in (COVERED, REROUTED):           # co-adapted anew, by hand: neither rerouted nor covered
        (COADAPTED[0].path(cfg) / stamp).unlink()
    with pytest.raises(ValueError, match=rf"{COADAPTED[0].name} is not rerouted yet .*add the 'reroute' stage"):
        build(cfg)


def test_reroute_without_a_coadapted_variant_says_which_stage_is_missing(built, tmp_path):
    from demo.routers import REROUTED
    cfg = dataclasses.replace(built, work=str(tmp_path / "work"), stages=("reroute",))
    shutil.copytree(Path(built.work) / "suite", tmp_path / "work" / "suite")
    assert (COADAPTED[0].path(cfg) / REROUTED).exists()      # the shipped one, in out, is done
    with pytest.raises(ValueError, match=rf"{COADAPTED[1].name} is not co-adapted yet .*add the 'coadapt' stage"):
        build(cfg)


def test_rerun_of_the_evaluation_reuses_every_part(built, monkeypatch):
    before = json.loads(open(f"{built.out}/eval/results.json").read())

    def no_generation(*a, **k):
        raise AssertionError("an evaluated system was generated again")
    monkeypatch.setattr("demo.evaluate._answers", no_generation)
    build(dataclasses.replace(built, stages=("eval",)))
    assert json.loads(open(f"{built.out}/eval/results.json").read()) == before


def test_a_fresh_checkout_reproduces_the_table_from_the_shipped_assets_alone(built, tmp_path, monkeypatch, capsys):
    """No work folder (no suite, no ablation models): the shipped parts are reused by fingerprint and the ablation's
    stored answers are kept, so the table comes out the same; a training stage names the missing suite."""
    out = shutil.copytree(built.out, tmp_path / "assets")
    before = json.loads((out / "eval" / "results.json").read_text())

    def no_generation(*a, **k):
        raise AssertionError("an evaluated system was generated again")
    monkeypatch.setattr("demo.evaluate._answers", no_generation)
    fresh = dataclasses.replace(built, out=str(out), work=str(tmp_path / "work"))
    build(dataclasses.replace(fresh, stages=("eval",)))
    assert json.loads((out / "eval" / "results.json").read_text()) == before
    assert f"{COADAPTED[1].name}: its model is not in" in capsys.readouterr().out
    with pytest.raises(ValueError, match="stage\\(s\\) routers train on the generated suite.*add the 'suite' stage"):
        build(dataclasses.replace(fresh, stages=("routers", "eval")))


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
