"""Results on disk: one JSON per run (written atomically) and a README.md table of every run in the folder."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

from atmoe.load.files import atomic_write_bytes, atomic_write_json

from .models import label

# (what, target as text, test). "issue 21" targets are the launch-efficiency issue's (CPU: the SmolLM2 shape; GPU: the
# Qwen2.5-1.5B shape); "brief" ones come from the project brief; "bench" ones are this suite's own bar.
TARGETS = {
    "prefill": ("≤ 1.15 (issue 21, CPU)", lambda r: r <= 1.15),
    "prefill_gpu": ("≤ 1.10 (issue 21, GPU)", lambda r: r <= 1.10),
    "prefill_vs_peft_all": ("≤ 1.00 (bench)", lambda r: r <= 1.0),
    "decode": ("≥ 0.90 (issue 21, CPU, batch 1)", lambda r: r >= 0.90),
    "decode_gpu": ("≥ 0.95 (issue 21, GPU)", lambda r: r >= 0.95),
    "decode_merged": ("≥ 1.00 (issue 21, batch 1)", lambda r: r >= 1.0),
    "vs_xlora": ("≤ 0.20 (issue 21: X-LoRA ≥ 5× slower)", lambda r: r <= 0.2),
    "decode_vs_xlora": ("≥ 5.00 (issue 21: X-LoRA ≥ 5× slower)", lambda r: r >= 5.0),
    "ops_prefill": ("≤ 8 (issue 21)", lambda r: r <= 8),
    "ops_decode": ("≤ 4 (issue 21)", lambda r: r <= 4),
    "ops_merged": ("≤ 0 (issue 21)", lambda r: r <= 0),
    "ops_override": ("≤ 2 (issue 21)", lambda r: r <= 2),
    "syncs": ("= 0 (issue 21)", lambda r: r == 0),
    "scaling": ("< 8 (brief: sub-linear, E 4→32 is 8×)", lambda r: r < 8),
    "memory": ("≤ 1.10 (brief)", lambda r: r <= 1.10),
    "train": ("≤ 1.50 (bench)", lambda r: r <= 1.5),
}


def write_json(data: dict, path: Path) -> Path:
    return atomic_write_json(path, data)


def _row(section: str, measurement: str, peers: str, ratio: float, target: str | None = None) -> dict:
    text, test = TARGETS.get(target, ("—", None)) if target else ("—", None)
    return dict(section=section, measurement=measurement, peers=peers, ratio=ratio, target=text,
                passed=None if test is None else bool(test(ratio)))


def _launch_rows(la: dict) -> list[dict]:
    rows, per, added = [], la["per_layer"], la["added_vs_base"]
    for p, phases in per.items():
        if p == "base":
            continue
        for phase, v in phases.items():
            rows.append(_row("launches", f"{phase}, ops per layer: {v['ops']:g} (base {per['base'][phase]['ops']:g})",
                             f"{label(p)} − base", added[p][phase],
                             {("atmoe", "prefill"): "ops_prefill", ("atmoe", "decode"): "ops_decode",
                              ("atmoe_merged", "decode"): "ops_merged"}.get((p, phase))))
            if p.startswith("atmoe"):
                rows.append(_row("launches", f"{phase}, syncs per layer", f"{label(p)} − base",
                                 v["syncs"] - per["base"][phase]["syncs"], "syncs"))
    top = la["raw"][str(max(la["layers"]))]   # whole forwards of the deeper model: per-call syncs do not cancel
    for p, phases in top.items():
        if p.startswith("atmoe"):
            for phase, v in phases.items():
                rows.append(_row("launches", f"{phase}, syncs per forward ({max(la['layers'])} layers): {v['syncs']}",
                                 f"{label(p)} − base", v["syncs"] - top["base"][phase]["syncs"], "syncs"))
    for phase, v in added.get("override_over_atmoe", {}).items():
        rows.append(_row("launches", f"{phase}, ops per layer", "one group override − AT-MoE without", v,
                         "ops_override"))
    return rows


def checks(results: dict) -> list[dict]:
    """Every measured ratio as one table row: section, measurement, peers, ratio, target, pass/miss."""
    s, rows = results["sections"], []
    gpu = str(results.get("meta", {}).get("device", "cpu")).startswith("cuda")
    for r in s.get("flops", {}).get("rows", []):
        where = f"prefill T={r['tokens']} B=1" if r["phase"] == "prefill" else f"decode, context {r['context']}"
        for kind, v in r["ratio"].items():
            rows.append(_row("flops", where, f"(base + experts, {kind}) ÷ base FLOPs", v))
    if "launches" in s:
        rows += _launch_rows(s["launches"])
    for r in s.get("prefill", {}).get("rows", []):
        where = f"T={r['tokens']} B={r['batch']}"
        for p, v in r["ratio_vs_base"].items():
            judged = p == "atmoe" and r["tokens"] >= 256    # the points: 256 tokens (CPU), 512+ (GPU)
            rows.append(_row("prefill", where, f"{label(p)} ÷ base", v,
                             ("prefill_gpu" if gpu else "prefill") if judged else None))
        for p, v in r.get("ratio_vs_compiled_base", {}).items():
            rows.append(_row("prefill", where, f"{label(p)} ÷ base + torch.compile", v,
                             ("prefill_gpu" if gpu else "prefill") if p == "atmoe+compile" and r["tokens"] >= 256
                             else None))
        if "peft_all" in r["atmoe_vs_peer"]:
            rows.append(_row("prefill", where, "AT-MoE ÷ PEFT all experts", r["atmoe_vs_peer"]["peft_all"],
                             "prefill_vs_peft_all"))
        if "xlora" in r["atmoe_vs_peer"]:
            rows.append(_row("prefill", where, "AT-MoE ÷ X-LoRA (time)", r["atmoe_vs_peer"]["xlora"], "vs_xlora"))
    for r in s.get("decode", {}).get("rows", []):
        where = f"B={r['batch']}, {r['new_tokens']} new tokens"

        def target(p: str) -> str | None:
            name = p.removesuffix("+compile")
            if name == "atmoe_merged":
                return "decode_merged"
            if name == "atmoe" and (gpu or r["batch"] == 1):
                return "decode_gpu" if gpu else "decode"
            return None
        for p, v in r["ratio_vs_base"].items():
            rows.append(_row("decode", where, f"{label(p)} ÷ base (tokens/s)", v,
                             target(p) if "+" not in p else None))
        for p, v in r.get("ratio_vs_compiled_base", {}).items():
            rows.append(_row("decode", where, f"{label(p)} ÷ base + torch.compile (tokens/s)", v, target(p)))
        if "xlora" in r["atmoe_vs_peer"]:
            rows.append(_row("decode", where, "AT-MoE ÷ X-LoRA (tokens/s)", r["atmoe_vs_peer"]["xlora"],
                             "decode_vs_xlora"))
    sc = s.get("scaling")
    if sc:
        for r in sc["by_experts"] + sc["by_rank"]:
            rows.append(_row("scaling", f"E={r['experts']} r={r['rank']}, T={sc['tokens']} B=1", "AT-MoE ÷ base",
                             r["ratio"]))
        by_e = {r["experts"]: r["ratio"] for r in sc["by_experts"]}
        if by_e.get(4, 0) > 1 and by_e.get(32, 0) > 1:  # a growth factor needs an overhead at both ends
            rows.append(_row("scaling", "overhead growth E=4 → E=32", "(ratio − 1) at E=32 ÷ (ratio − 1) at E=4",
                             (by_e[32] - 1) / (by_e[4] - 1), "scaling"))
    mem = s.get("memory")
    if mem:
        rows.append(_row("memory", f"{mem['atmoe_extra_bytes'] / 2**20:.2f} MiB added",
                         "(AT-MoE − base) ÷ experts' A,B bytes", mem["ratio"], "memory"))
        if (mem.get("build_rss_delta_bytes") or 0) > 0:  # RSS can even shrink on a tiny model (allocator reuse)
            rows.append(_row("memory", f"RSS growth building AT-MoE: {mem['build_rss_delta_bytes'] / 2**20:.2f} MiB",
                             "process RSS added ÷ experts' A,B bytes", mem["build_rss_delta_bytes"] / mem["expert_bytes"]))
        if "merge_bytes" in mem:
            rows.append(_row("memory", f"merge=True: {mem['merge_bytes'] / 2**20:.2f} MiB per running generation",
                             "merged weight copy ÷ experts' A,B bytes (opt-in, freed with the call)",
                             mem["merge_bytes"] / mem["expert_bytes"]))
        for what, nb in mem.get("call_state_bytes", {}).items():
            rows.append(_row("memory", f"per-call state, {what}: {nb / 2**20:.3f} MiB",
                             "held by one call ÷ experts' A,B bytes", nb / mem["expert_bytes"]))
        if "cuda_prefill_peak_bytes" in mem:
            c = mem["cuda_prefill_peak_bytes"]
            rows.append(_row("memory", f"CUDA prefill peak T={c['tokens']} B={c['batch']}", "AT-MoE ÷ base",
                             c["ratio"]))
    tr = s.get("train")
    if tr:
        rows.append(_row("train", f"B={tr['batch']} × {tr['tokens']} tokens", "router step ÷ LoRA step (PEFT)",
                         tr["ratio"], "train"))
    return rows


def _fmt(x: Any) -> str:
    return f"{x:.3f}" if isinstance(x, float) and math.isfinite(x) else str(x)


def markdown(folder: Path) -> str:
    lines = ["# AT-MoE benchmark results", "",
             "Every number is a ratio of peers timed in the same process on the same inputs, interleaved, median of "
             "paired rounds (see `bench/timing.py`). Regenerated by `python -m bench.run` from the JSON files here.",
             ""]
    for path in sorted(folder.glob("*.json")):
        res = json.loads(path.read_text())
        meta = res["meta"]
        lines += [f"## {path.stem}", "",
                  f"model `{meta['model']}` · {meta['device_name']} · {meta['dtype']} · threads {meta['threads']} · "
                  f"E={meta['experts']} rank {meta['rank']} on {', '.join(meta['targets'])} · "
                  f"{'quick' if meta['quick'] else 'full'} · {meta['seconds']:.0f} s · torch {meta['torch']}, "
                  f"transformers {meta['transformers']}, peft {meta['peft']}", "",
                  *([f"Command: `{meta['command']}`", ""] if meta.get("command") else []),
                  *([f"Note: {meta['note']}", ""] if meta.get("note") else []),
                  *(["**Partial run**: cut short; only the sections below were measured.", ""]
                    if meta.get("partial") else []),
                  "| section | measurement | peers | ratio | target | result |", "|---|---|---|---|---|---|"]
        for c in checks(res):  # recomputed, so every run in the table is judged by the same rules
            verdict = "—" if c["passed"] is None else ("pass" if c["passed"] else "**miss**")
            lines.append(f"| {c['section']} | {c['measurement']} | {c['peers']} | {_fmt(c['ratio'])} | "
                         f"{c['target']} | {verdict} |")
        peers = res["sections"].get("peers", {})
        errors = {**peers.get("build_errors", {}), **peers.get("runtime_errors", {})}
        if errors:
            lines += ["", "Peers that could not run (exact errors):", ""]
            lines += [f"- `{k}`: `{v}`" for k, v in errors.items()]
        lines.append("")
    return "\n".join(lines)


def write_readme(folder: Path) -> Path:
    return atomic_write_bytes(folder / "README.md", markdown(folder).encode())
