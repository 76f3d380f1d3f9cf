"""The benchmark harness end to end on a tiny model: every section present, every ratio positive and finite, the op
counter and the FLOP floor exact, and bench/gpu.sh's CPU-runnable parts (both phases, torch.compile with the eager
backend) on a tiny shape. No timing assertions — timings on a shared CPU prove nothing; the schema, the peers'
presence and the counts do."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from bench.run import SECTIONS, main

ROOT = Path(__file__).resolve().parents[1]
TIMED = ("prefill", "decode", "scaling", "memory", "train")   # sections whose ratios are timings or byte ratios


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
          "--prefill-shapes", "1x256,2x16", "--new-tokens", "3", "--xlora-new-tokens", "2", "--out", str(out)])
    return json.loads((out / "tiny-cpu-quick.json").read_text()), out


def test_every_section_present(result: tuple[dict, Path]) -> None:
    res, _ = result
    assert set(res["sections"]) == {*SECTIONS, "peers"}
    assert res["meta"]["model"] == "tiny" and res["meta"]["quick"] is True and res["meta"]["partial"] is False
    assert res["meta"]["command"].startswith("python -m bench.run --model tiny")
    prefill = res["sections"]["prefill"]["rows"]
    assert [(r["batch"], r["tokens"]) for r in prefill] == [(1, 256), (2, 16)]
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
        for p in ("atmoe", "atmoe_unrouted", "peft_one", "peft_all", "peft_cat", "xlora"):
            assert p in row["ratio_vs_base"] or p in peers["build_errors"] or f"prefill/{p}" in peers["runtime_errors"]
    # merge=True is a batch-1 path
    assert ["atmoe_merged" in r["ratio_vs_base"] for r in res["sections"]["prefill"]["rows"]] == [True, False]
    # On the tiny Llama every peer, X-LoRA included, must actually run.
    assert peers["build_errors"] == {} and peers["runtime_errors"] == {}
    rows = res["sections"]["decode"]["rows"]
    assert any("xlora" in r["ratio_vs_base"] for r in rows)
    assert "atmoe_merged" in rows[0]["ratio_vs_base"] and "atmoe_merged" not in rows[-1]["ratio_vs_base"]
    assert all(r["seconds_per_token"]["base"] > 0 for r in rows)


def test_ratios_positive_finite(result: tuple[dict, Path]) -> None:
    res, _ = result
    ratios = _ratios({s: res["sections"][s] for s in TIMED})
    assert len(ratios) > 50
    assert all(math.isfinite(r) and r > 0 for r in ratios)
    for c in res["checks"]:
        assert math.isfinite(c["ratio"])
        assert c["passed"] in (True, False, None)
        if c["section"] != "launches":   # launch rows are differences, which may be 0 or negative
            assert c["ratio"] > 0


def test_launches_per_layer(result: tuple[dict, Path]) -> None:
    la = result[0]["sections"]["launches"]
    per, raw = la["per_layer"], la["raw"]
    assert la["errors"] == {} and la["layers"] == [2, 6]
    assert {"base", "atmoe", "atmoe_merged", "atmoe_override", "atmoe_token", "atmoe_unrouted", "peft_one",
            "peft_cat", "xlora"} <= set(per)
    for path, phases in per.items():   # the slope method, exactly
        for phase, v in phases.items():
            assert v["ops"] == (raw["6"][path][phase]["ops"] - raw["2"][path][phase]["ops"]) / 4
    assert per["base"]["prefill"]["ops"] > 10 and per["base"]["prefill"]["syncs"] == 0
    assert per["atmoe_unrouted"] == per["base"]            # outside a call the wrapped model is the base, op for op
    assert per["peft_one"]["decode"]["ops"] > per["base"]["decode"]["ops"]
    assert "decode" not in per["xlora"]                     # no KV cache: X-LoRA has no decode step
    assert la["added_vs_base"]["atmoe"]["decode"] == per["atmoe"]["decode"]["ops"] - per["base"]["decode"]["ops"]
    judged = {c["peers"].split(" − ")[0] + "/" + c["measurement"].split(",")[0]: c for c in result[0]["checks"]
              if c["section"] == "launches" and c["passed"] is not None}
    assert "AT-MoE (grouped router, fused experts)/prefill" in judged and "one group override/decode" in judged


def test_op_counter_counts_launches_not_views() -> None:
    from bench.launches import count

    class Probe(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = (x @ x.t()).view(-1)       # matmul (t and view are views)
            y = y * 2                      # mul
            bool(y.sum() > 0)              # sum, gt, is_nonzero (a sync)
            return y[y > 0]                # gt, and a boolean-mask index (a sync)

    probe = Probe()
    forwards = count(probe, lambda: (probe(torch.ones(2, 3)), torch.ones(3) + 1))   # the add: outside the forward
    assert forwards == [dict(ops=7, syncs=2)]


def test_flop_floor(result: tuple[dict, Path]) -> None:
    fl = result[0]["sections"]["flops"]
    e, b = fl["experts"], fl["base"]
    # tiny Llama: hidden 32, intermediate 64, 4 heads, 2 KV heads (KV width 16); 7 experts of rank 8 everywhere
    io = [(32, 32), (32, 16), (32, 16), (32, 32), (32, 64), (32, 64), (64, 32)]
    assert e["floor_per_layer"] == 7 * sum(2 * 8 * (i + o) for i, o in io)
    # as launched: q/k/v and gate/up are one group each, their expand dense over the group
    groups = [(32, 64, 3 * 56), (32, 32, 56), (32, 128, 2 * 56), (64, 32, 56)]   # (I, O_g, R_g)
    assert e["launched_per_layer"] == sum(2 * r * (i + o) for i, o, r in groups)
    assert b["linear_per_layer"] == sum(i * o for i, o in io)
    for r in fl["rows"]:
        assert 1 < r["ratio"]["floor"] <= r["ratio"]["launched"]
    decode = fl["rows"][-1]
    assert decode["phase"] == "decode" and decode["ratio"]["merged"] == 1.0


def test_self_timed_samples() -> None:
    from bench.timing import interleaved
    t = interleaved({"a": lambda: 0.5, "b": lambda: None}, warmup=0, repeats=2, device="cpu")
    assert t.samples["a"] == [0.5, 0.5] and all(0 <= s < 0.5 for s in t.samples["b"])


def test_memory_counts_the_experts(result: tuple[dict, Path]) -> None:
    """What AT-MoE adds is the experts' A and B (plus the small router and index buffers), never less."""
    mem = result[0]["sections"]["memory"]
    assert mem["atmoe_extra_bytes"] >= mem["expert_bytes"] > 0
    # the dense block-diagonal expands of the q/k/v and gate/up groups store zero blocks too: under 2× the experts
    assert mem["atmoe_extra_bytes"] < 2 * mem["expert_bytes"]
    # a call holds its plan, what its routers read and per-layer weights — nothing the size of an expert; merged
    # weights are the model's own buffers, kept for the next merge=True call
    state = mem["call_state_bytes"]
    assert 0 < state["batch 1"] <= state["batch 8"] < mem["expert_bytes"] / 2
    assert state["batch 1 merge"] < mem["expert_bytes"] / 2
    assert mem["merged_buffer_bytes"] == mem["merge_bytes"] > 0


def test_readme_table(result: tuple[dict, Path]) -> None:
    _, out = result
    text = (out / "README.md").read_text()
    assert "## tiny-cpu-quick" in text and "| section | measurement | peers | ratio | target | result |" in text
    assert "≥ 0.90 (issue 21, CPU, batch 1)" in text and "≤ 8 (issue 21)" in text and "| flops |" in text


def test_targets_are_judged_where_the_issue_sets_them(result: tuple[dict, Path]) -> None:
    rows = result[0]["checks"]
    judged = {(r["section"], r["measurement"].split(",")[0], r["peers"]) for r in rows if r["passed"] is not None}
    prefill = {m for s, m, p in judged if s == "prefill" and p.startswith("AT-MoE (")}
    assert prefill == {"T=256 B=1"}  # the issue's CPU prefill target is at 256 tokens
    decode = {p for s, m, p in judged if s == "decode" and m == "B=1" and "÷ base" in p}
    assert any(p.startswith("AT-MoE (") for p in decode) and any("merge=True" in p for p in decode)
    assert not any(s == "decode" and m == "B=2" and "÷ base" in p for s, m, p in judged)
    assert any("X-LoRA" in p for s, _, p in judged if s == "prefill")


TINY = ["--device", "cpu", "--model", "tiny", "--dtype", "float32", "--threads", "1", "--prefill-shapes", "1x8",
        "--new-tokens", "3", "--xlora-new-tokens", "2", "--repeats", "1", "--warmup", "0"]


def gpu_script_phases(tmp_path: Path, *extra: str) -> list[list[str]]:
    """The `python -m bench.run` argument lists bench/gpu.sh runs, one per phase (PYTHON: a stub that records them)."""
    log, stub = tmp_path / "calls", tmp_path / "python"
    stub.write_text(f'#!/bin/sh\nprintf "%s\\0" "$@" >> {log}\nprintf "\\n" >> {log}\n')
    stub.chmod(0o755)
    subprocess.run([str(ROOT / "bench" / "gpu.sh"), *extra], check=True, cwd=ROOT, capture_output=True,
                   env={"PYTHON": str(stub), "PATH": "/usr/bin:/bin"})
    calls = [line.split("\0")[:-1] for line in log.read_text().split("\n") if line]
    assert all(c[:2] == ["-m", "bench.run"] for c in calls)
    return [c[2:] for c in calls]


def test_gpu_script_phases(tmp_path: Path) -> None:
    """bench/gpu.sh: the eager phase (launches, prefill B1×512 and B8×1024, decode B1 and B8, PEFT and X-LoRA peers)
    and the compile phase (reduce-overhead decode step), extra arguments passed through to both and winning."""
    from bench.run import parse_args
    eager, compiled = (parse_args(args) for args in gpu_script_phases(tmp_path, "--out", str(tmp_path / "o")))
    assert eager.device == "cuda" and eager.model == "qwen2.5-1.5b" and eager.compile == ""
    assert eager.prefill_shapes == ((1, 512), (8, 1024)) and eager.decode_batches == (1, 8)
    assert eager.only == ("flops", "launches", "prefill", "decode") and eager.peers == ("peft_one", "peft_cat", "xlora")
    assert compiled.compile == "reduce-overhead" and compiled.peers == () and compiled.decode_batches == (1,)
    assert {eager.name, compiled.name} == {"qwen2.5-1.5b-cuda", "qwen2.5-1.5b-cuda-compile"}
    assert eager.out == compiled.out == str(tmp_path / "o")
    (tmp_path / "cpu").mkdir()
    cpu = [parse_args(args) for args in gpu_script_phases(tmp_path / "cpu", *TINY)]
    assert all(c.device == "cpu" and c.model == "tiny" and c.prefill_shapes == ((1, 8),) for c in cpu)


def test_gpu_script_compile_phase_on_cpu(tmp_path: Path) -> None:
    """bench/gpu.sh's compile phase, run on a tiny CPU shape: base+compile and atmoe+compile in prefill and decode
    (the decode step compiled on its own, reading the StaticCache buffers), judged against the compiled base. The
    eager backend: dynamo traces both forwards here; inductor and CUDA graphs run on the GPU."""
    _, phase = gpu_script_phases(tmp_path, *TINY, "--compile-backend", "eager", "--out", str(tmp_path / "o"))
    res = main(phase)
    assert res["meta"]["config"]["compile"] == "reduce-overhead"
    assert res["sections"]["peers"]["runtime_errors"] == {}
    for section in ("prefill", "decode"):
        row = res["sections"][section]["rows"][0]
        assert {"base+compile", "atmoe+compile"} <= set(row["ratio_vs_base"])
        assert set(row["ratio_vs_compiled_base"]) == {"atmoe+compile"}
    judged = [c for c in res["checks"] if "÷ base + torch.compile" in c["peers"] and c["passed"] is not None]
    assert [c["section"] for c in judged] == ["decode"]    # prefill's target is at 256 tokens and more
    assert (tmp_path / "o" / "qwen2.5-1.5b-cuda-compile.json").exists()


def test_grid_flags() -> None:
    from bench.run import parse_args
    cfg = parse_args(["--prefill-tokens", "256", "--prefill-batches", "1,8", "--quick"])
    assert cfg.prefill_tokens == (256,) and cfg.prefill_batches == (1, 8)
    cfg = parse_args(["--prefill-shapes", "1x512,8x1024", "--peers", "none", "--new-tokens", "9"])
    assert cfg.prefill_shapes == ((1, 512), (8, 1024)) and cfg.peers == () and cfg.new_tokens == 9
    for bad in (["--prefill-tokens", "abc"], ["--prefill-batches", "0"], ["--prefill-shapes", "8"],
                ["--new-tokens", "1"], ["--peers", "lora"]):
        with pytest.raises((SystemExit, ValueError)):
            parse_args(bad)


def test_bench_decode_is_the_engines(tmp_path: Path) -> None:
    """What the bench times as AT-MoE's decode is what `ATMoE.generate` runs: the same tokens and the same path
    ("folded" by default, "merged" with merge=True) through the bench's own hold of a routed call."""
    from tiny_models import tiny_llama, tiny_tokenizer

    from atmoe.generation import DecodeBuffers, GenerationSettings, decode
    from bench.inference import routed
    from bench.launches import randomise_router
    from bench.models import build_atmoe, write_experts

    tok = tiny_tokenizer()
    base = tiny_llama(len(tok))
    m = build_atmoe(base, tok, write_experts(base, tmp_path, 7, 8))
    randomise_router(m.router)
    row = m.encode_prompt("Triage this patient.", "HR 88, BP 142/90")
    ids = torch.tensor([row.ids])
    read = torch.zeros_like(ids)
    read[0, row.instruction[0]:row.instruction[1]] = 1     # the router reads the instruction, as generate's does
    for merge in (False, True):
        want = m.generate("Triage this patient.", input="HR 88, BP 142/90", max_new_tokens=6, merge=merge)
        with torch.inference_mode(), routed(m, read, merge=merge) as (forward, call):
            got = [int(t) for t in decode(forward, ids, torch.ones_like(ids), GenerationSettings(max_new_tokens=6),
                                          set(), 0, DecodeBuffers(m.model.config, 1, 256, ids.device))]
        assert call.path == want.path == ("merged" if merge else "folded")
        assert got[:len(want.token_ids)] == want.token_ids and len(want.token_ids) > 0
