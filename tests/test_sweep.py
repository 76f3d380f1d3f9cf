"""The controllability curve (`atmoe.analysis.sweep`): one row per step, and its endpoints are plain generations
with that weight fixed (same seed, same answers)."""

from __future__ import annotations

import numpy as np
import pytest
from tiny_models import tiny_demo

from atmoe import ATMoE, Overrides
from atmoe.analysis.sweep import sweep
from atmoe.cli import main

PROMPT = "List the vital signs. Use bullet points."
NOTE = "Vitals: HR 135, SpO2 88."
SETTINGS = dict(max_new_tokens=6, temperature=0.8, top_p=0.95, seed=3)   # sampled: the same seed must matter


@pytest.fixture(scope="module")
def manifest(tmp_path_factory, one_torch_thread):
    return tiny_demo(tmp_path_factory.mktemp("sweep"))


@pytest.fixture(scope="module")
def m(manifest) -> ATMoE:
    return ATMoE.load(manifest, device="cpu")


@pytest.mark.parametrize("target", ["group:style", "expert:bullets"])
def test_endpoints_are_plain_generations_with_that_weight(m, target):
    level, name = target.split(":")
    calls = []
    frame = sweep(m, PROMPT, NOTE, target, steps=3, layers=(1, 3),
                  scorer=lambda text: calls.append(text) or {"length": float(len(text))}, **SETTINGS)
    assert list(frame.columns) == ["weight", "text", "finish_reason", "new_tokens", "length"]
    assert np.allclose(frame.weight, [0.0, 0.5, 1.0]) and len(frame) == 3
    assert calls == list(frame.text) and list(frame.length) == [len(t) for t in frame.text]
    for w, text in zip(frame.weight, frame.text):
        ov = Overrides(**{f"{level}s": {name: float(w)}}, layers=(1, 3))
        assert m.generate(PROMPT, input=NOTE, overrides=ov, **SETTINGS).text == text
    ends = [m.generate(PROMPT, input=NOTE, overrides=Overrides(**{f"{level}s": {name: w}}, layers=(1, 3)),
                       **SETTINGS).trace for w in (0.0, 1.0)]
    column = m.groups.index(name) if level == "group" else m.experts.index(name)
    used = [t.group_weights if level == "group" else t.expert_weights for t in ends]
    assert np.allclose(used[0][1:, column], 0) and np.allclose(used[1][1:, column], 1)   # the weight really moved


def test_rows_and_errors(m):
    frame = sweep(m, PROMPT, NOTE, "group:task", steps=5, max_new_tokens=2)
    assert len(frame) == 5 and "length" not in frame and frame.weight.is_monotonic_increasing
    with pytest.raises(ValueError, match="not one of"):
        sweep(m, PROMPT, NOTE, "group:nope")
    with pytest.raises(ValueError, match="steps"):
        sweep(m, PROMPT, NOTE, "group:task", steps=1)


def test_cli_sweep_prints_and_writes_csv(manifest, tmp_path, capsys):
    out = tmp_path / "sweep.csv"
    rc = main(["sweep", PROMPT, "--input", NOTE, "--manifest", str(manifest), "--device", "cpu", "--target",
               "group:style", "--steps", "3", "--max-new-tokens", "3", "--reference", "- HR 135", "--csv", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "weight" in printed and "exact" in printed
    import pandas as pd
    frame = pd.read_csv(out)
    assert len(frame) == 3 and {"weight", "text", "exact"} <= set(frame.columns) and "f1" not in frame
    assert set(frame.exact) <= {0.0, 1.0}   # the engine's own metric: exact match, no demo scorer
    assert main(["sweep", PROMPT, "--manifest", str(manifest), "--device", "cpu", "--target", "bad"]) == 2


def test_demo_cli_sweep_scores_by_the_demos_line_f1(manifest, tmp_path, capsys):
    from demo.__main__ import main as demo_main
    out = tmp_path / "sweep.csv"
    rc = demo_main(["sweep", PROMPT, "--input", NOTE, "--manifest", str(manifest), "--device", "cpu", "--target",
                    "group:style", "--steps", "3", "--max-new-tokens", "3", "--reference", "- HR 135",
                    "--csv", str(out)])
    assert rc == 0
    printed = capsys.readouterr().out
    assert "weight" in printed and "f1" in printed
    import pandas as pd
    frame = pd.read_csv(out)
    assert len(frame) == 3 and {"weight", "text", "f1", "exact"} <= set(frame.columns)
