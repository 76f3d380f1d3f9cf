"""The `atmoe` command line on a tiny model: tables, overrides, and one-line errors (never a traceback)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from atmoe.cli import main, parse_overrides
from tiny_models import tiny_demo


@pytest.fixture(scope="module")
def manifest(tmp_path_factory):
    return str(tiny_demo(tmp_path_factory.mktemp("demo")))


def test_route_prints_the_weight_tables(manifest, capsys):
    assert main(["route", "List the lab results. Use bullet points.", "--input", "Labs: Na 128, K 4.1.",
                 "--manifest", manifest, "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "group weights α" in out and "bullets" in out and "trained" in out


def test_generate_with_overrides_shows_them_in_the_trace(manifest, capsys):
    args = ["generate", "List the vital signs. Use plain language.", "--manifest", manifest, "--device", "cpu",
            "--max-new-tokens", "4", "--override", "style=0", "--override", "expert:bullets=1", "--layers", "0-2", "--json"]
    assert main(args) == 0
    trace = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert trace["overrides"] == {"groups": {"style": 0.0}, "experts": {"bullets": 1.0}, "layers": [0, 2],
                                  "disabled": []}
    style = trace["groups"].index("style")
    assert [row[style] for row in trace["group_weights"][:3]] == [0.0, 0.0, 0.0]
    assert trace["group_weights"][3][style] > 0


def test_generate_merges_by_default_and_no_merge_keeps_the_fused_path(manifest, capsys, monkeypatch):
    from atmoe import ATMoE
    seen, new_call = [], ATMoE._new_call   # every call of the model is built here (atmoe.model.new_call wraps it)

    def spy(self, *args, **kwargs):
        call = new_call(self, *args, **kwargs)
        seen.append(call.merge)
        return call

    monkeypatch.setattr(ATMoE, "_new_call", spy)
    outs = []
    for flag in ("--merge", "--no-merge"):
        assert main(["generate", "List the lab results.", "--manifest", manifest, "--device", "cpu",
                     "--max-new-tokens", "6", flag, "--json"]) == 0
        outs.append(capsys.readouterr().out.splitlines()[0])
    assert seen == [True, False]
    assert outs[0] == outs[1]  # same greedy text: the merged copy is the same function within float rounding


def test_generate_grounded_reaches_the_engine(manifest, capsys, monkeypatch):
    from atmoe import ATMoE
    seen, real = [], ATMoE._generate_rows

    def spy(self, prompts, inputs, settings, *args, **kwargs):
        seen.append(settings.grounded)
        return real(self, prompts, inputs, settings, *args, **kwargs)

    monkeypatch.setattr(ATMoE, "_generate_rows", spy)
    for flag in ([], ["--grounded"]):
        assert main(["generate", "List the lab results.", "--manifest", manifest, "--device", "cpu",
                     "--max-new-tokens", "4", "--json", *flag]) == 0
    assert seen == [False, True]


@pytest.mark.parametrize("args,message", [
    (["--override", "style=abc"], "is not a number"),
    (["--override", "nope=0.5"], "unknown group"),
    (["--override", "style=2"], "in [0, 1]"),
    (["--layers", "0-99"], "outside the model"),
    (["--layers", "x"], "expected FIRST-LAST"),
])
def test_bad_input_is_one_clear_line(manifest, capsys, args, message):
    assert main(["route", "List the labs.", "--manifest", manifest, "--device", "cpu", *args]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_missing_manifest_and_empty_prompt_in_a_real_process(manifest, tmp_path):
    for args, message in ((["route", "x", "--manifest", str(tmp_path / "none.json")], "manifest not found"),
                          (["route", "  ", "--manifest", manifest, "--device", "cpu"], "the prompt is empty")):
        p = subprocess.run([sys.executable, "-m", "atmoe", *args], capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and message in p.stderr and "Traceback" not in p.stderr


def test_parse_overrides():
    ov = parse_overrides(["group:task=0.5", "expert:labs=1"], "3", ["plain"])
    assert ov.groups == {"task": 0.5} and ov.experts == {"labs": 1.0} and ov.layers == (3, 3)
    assert list(ov.disabled) == ["plain"]
    assert parse_overrides([], None, []) is None


@pytest.mark.parametrize("command,module", [("eval", "demo.evaluate"), ("build", "demo.build"),
                                            ("probe", "demo.probe")])
def test_the_demo_cli_hands_its_own_commands_to_the_demo(command, module, monkeypatch):
    import importlib

    from demo.__main__ import main as demo_main
    seen = []
    monkeypatch.setattr(importlib.import_module(module), "main", seen.append)
    assert demo_main([command, "--quick", "--out", "x"]) == 0
    assert seen == [["--quick", "--out", "x"]]


@pytest.mark.parametrize("command", ["eval", "assets"])
def test_the_engine_cli_has_no_demo_commands(command, capsys):
    with pytest.raises(SystemExit):
        main([command])
    assert "invalid choice" in capsys.readouterr().err


def test_the_engine_needs_a_manifest_and_the_demo_defaults_to_the_shipped_one(monkeypatch, capsys):
    from pathlib import Path

    from app.service import DEFAULT_MANIFESTS
    from atmoe import ATMoE
    from demo.__main__ import main as demo_main
    from demo.config import REPO, SHIPPED_MANIFEST
    monkeypatch.delenv("ATMOE_MANIFEST", raising=False)
    assert main(["route", "List the labs."]) == 2
    assert "pass --manifest" in capsys.readouterr().err
    loaded = []

    def load(cls, path, **kwargs):
        loaded.append(str(path))
        raise ValueError("stop here")

    monkeypatch.setattr(ATMoE, "load", classmethod(load))
    monkeypatch.setattr(Path, "exists", lambda self: True)   # built or not, the path is what is checked
    assert demo_main(["route", "List the labs."]) == 2
    assert "stop here" in capsys.readouterr().err
    assert loaded == [str(REPO / SHIPPED_MANIFEST)]
    # the dashboard's default is the same file
    assert (REPO / next(iter(DEFAULT_MANIFESTS.values()))).resolve() == Path(loaded[0]).resolve()
    monkeypatch.setenv("ATMOE_MANIFEST", "from/env.json")    # the environment, then --manifest, win over it
    assert demo_main(["route", "List the labs."]) == 2
    assert demo_main(["route", "List the labs.", "--manifest", "given.json"]) == 2
    assert loaded[1:] == ["from/env.json", "given.json"]
