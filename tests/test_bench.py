"""The benchmark harness end to end on a tiny model (--quick): every section present, every ratio positive and finite.
No timing assertions — timings on a shared CPU prove nothing; the schema and the peers' presence do."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from bench.run import SECTIONS, main

ROOT = Path(__file__).resolve().parents[1]


def _ratios(obj: object) -> list[float]:
    """Every value under a key naming a ratio ('ratio…', '…_vs_…'), recursively."""
    found = []
    if isinstance(obj, dict):
        for k, v in obj.items():
            is_ratio = "ratio" in k or "_vs_" in k
            if is_ratio and isinstance(v, (int, float)):
                found.append(float(v))
            elif is_ratio and isinstance(v, dict):
                found += [float(x) for x in v.values()]
            else:
                found += _ratios(v)
    elif isinstance(obj, list):
        for v in obj:
            found += _ratios(v)
    return found


@pytest.fixture(scope="module")
def result(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path]:
    out = tmp_path_factory.mktemp("bench")
    main(["--model", "tiny", "--quick", "--device", "cpu", "--threads", "1", "--repeats", "1", "--warmup", "0",
          "--out", str(out)])
    return json.loads((out / "tiny-cpu-quick.json").read_text()), out


def test_every_section_present(result: tuple[dict, Path]) -> None:
    res, _ = result
    assert set(res["sections"]) == {*SECTIONS, "peers"}
    assert res["meta"]["model"] == "tiny" and res["meta"]["quick"] is True
    prefill = res["sections"]["prefill"]["rows"]
    assert {(r["tokens"], r["batch"]) for r in prefill} == {(64, 1), (256, 1), (64, 2), (256, 2)}
    assert {r["batch"] for r in res["sections"]["decode"]["rows"]} == {1, 2}
    scaling = res["sections"]["scaling"]
    assert [r["experts"] for r in scaling["by_experts"]] == [1, 4, 16]
    assert [r["rank"] for r in scaling["by_rank"]] == [4, 16, 64]
    for k in ("base_bytes", "atmoe_bytes", "expert_bytes", "ratio"):
        assert k in res["sections"]["memory"]
    assert set(res["sections"]["train"]["seconds"]) == {"lora", "atmoe_router"}


def test_every_peer_ran_or_has_its_error(result: tuple[dict, Path]) -> None:
    res, _ = result
    peers = res["sections"]["peers"]
    for row in res["sections"]["prefill"]["rows"]:
        for p in ("atmoe", "peft_one", "peft_all", "peft_cat", "xlora"):
            assert p in row["ratio_vs_base"] or p in peers["build_errors"] or f"prefill/{p}" in peers["runtime_errors"]
    # On the tiny Llama every peer, X-LoRA included, must actually run.
    assert peers["build_errors"] == {} and peers["runtime_errors"] == {}
    assert any("xlora" in r["ratio_vs_base"] for r in res["sections"]["decode"]["rows"])


def test_ratios_positive_finite(result: tuple[dict, Path]) -> None:
    res, _ = result
    ratios = _ratios(res["sections"])
    assert len(ratios) > 50  # 4 prefill rows × 9, 3 decode rows, 6 scaling points, memory, train
    assert all(math.isfinite(r) and r > 0 for r in ratios)
    for c in res["checks"]:
        assert math.isfinite(c["ratio"]) and c["ratio"] > 0
        assert c["passed"] in (True, False, None)


def test_memory_counts_the_experts(result: tuple[dict, Path]) -> None:
    """What AT-MoE adds is the experts' A and B (plus the small router and index buffers), never less."""
    mem = result[0]["sections"]["memory"]
    assert mem["atmoe_extra_bytes"] >= mem["expert_bytes"] > 0
    assert mem["atmoe_extra_bytes"] - mem["expert_bytes"] < mem["expert_bytes"]
    # a call holds its weights, trace and per-rank scales — nothing the size of an expert — unless it merges
    state = mem["call_state_bytes"]
    assert 0 < state["batch 1"] <= state["batch 8"] < mem["expert_bytes"] / 2
    assert state["batch 1 merge"] >= mem["merge_bytes"] > 0


def test_readme_table(result: tuple[dict, Path]) -> None:
    _, out = result
    text = (out / "README.md").read_text()
    assert "## tiny-cpu-quick" in text and "| section | measurement | peers | ratio | target | result |" in text
    assert "decode" in text and "≥ 0.90" in text


def test_gpu_script_passes_arguments_through(tmp_path: Path) -> None:
    subprocess.run([str(ROOT / "bench" / "gpu.sh"), "--device", "cpu", "--quick", "--model", "tiny", "--threads", "1",
                    "--only", "memory", "--out", str(tmp_path)], check=True, cwd=ROOT,
                   env={"PYTHON": sys.executable, "PATH": "/usr/bin:/bin"}, capture_output=True)
    res = json.loads((tmp_path / "tiny-cpu-quick.json").read_text())
    assert res["meta"]["device"] == "cpu" and set(res["sections"]) == {"memory", "peers"}


def test_targets_are_judged_where_the_brief_sets_them(result: tuple[dict, Path]) -> None:
    rows = result[0]["checks"]
    judged = {(r["section"], r["measurement"].split(",")[0], r["peers"]) for r in rows if r["passed"] is not None}
    prefill = {m for s, m, p in judged if s == "prefill" and p.startswith("AT-MoE (")}
    assert prefill == {"T=256 B=1", "T=256 B=2"}  # the brief's prefill target is at 256 tokens
    decode = {p for s, m, p in judged if s == "decode" and m == "B=1" and "÷ base" in p}
    assert any(p.startswith("AT-MoE (") for p in decode) and any("merge=True" in p for p in decode)
    assert not any(s == "decode" and m == "B=2" and "÷ base" in p for s, m, p in judged)
    if "xlora" in result[0]["sections"]["peers"]["built"]:
        assert any("X-LoRA" in p for s, _, p in judged if s == "prefill")


def test_prefill_grid_flags() -> None:
    from bench.run import parse_args
    cfg = parse_args(["--prefill-tokens", "256", "--prefill-batches", "1,8", "--quick"])
    assert cfg.prefill_tokens == (256,) and cfg.prefill_batches == (1, 8)
    for bad in (["--prefill-tokens", "abc"], ["--prefill-batches", "0"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
