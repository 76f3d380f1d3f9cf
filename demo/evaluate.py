"""The demo's evaluation: every system answers the held-out complex instructions, scored by line F1 (`metrics.py`).

Systems (names as in results.json, in this order):
    base              no expert (every expert disabled)
    expert:<name>     that expert alone at weight 1 on every layer
    uniform_merge     every expert at 1/E on every layer (an untrained flat router)
    oracle_constant   layer-constant oracle: the row's labelled experts at full weight on every layer, the rest off
    router_constant   layer-constant router: the shipped router's own α and β for the row, averaged over layers and
                      fixed on every layer — the same decisions without the layer dimension
    <router name>     each trained router as it is (grouped_sigmoid, grouped_softmax, flat_router)
  co-adapted (stage 2, `config.COADAPTED`; experts and router trained together):
    coadapted:oracle_constant, coadapted:router_constant   as above, on the co-adapted experts and their router
    coadapted_attention (shipped), coadapted_flat_attention   each co-adapted variant with its own router

Routing scores (trained routers only; from the routing used for each answer, L layers, G groups):
    selection      over (row, needed group): the expert with the highest layer-mean β in the group is the labelled
                   one. `chance` = always picking each group's most frequent labelled expert on these rows.
    gate accuracy  over (row, group): "on" equals "the row needs the group". A sigmoid gate is on when it opens
                   (> 0.5) on some layer: a needed group may act on a few layers only, which is what the training
                   loss asks for. A shared budget (softmax, flat) is on when its layer mean is above 1/(2G), halfway
                   between off and the 1/G that training asks of a needed group.

`write_results` adds `paired`: the shipped system minus every other one on the same rows, with paired bootstrap
intervals (the targets are differences, so their intervals are paired too), and the shipped system's mean on the
never-trained combinations apart from the rest.

`evaluate(..., partial_path=...)` writes each finished system there, so a rerun resumes after the last one; the
demo keeps one such file per part (`eval/parts/`), so adding a system reruns nothing else.
"""

from __future__ import annotations

import argparse
import hashlib
import json
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from atmoe.load.files import atomic_write_bytes, atomic_write_json, read_json
from atmoe.model import ATMoE
from atmoe.overrides import Overrides
from atmoe.router import GroupedRouter, load_router
from atmoe.trace import RoutingTrace

from .config import COADAPTED, ROUTERS, STAGE1_MANIFEST, BuildConfig
from .metrics import score
from .suite import HELDOUT_COMBOS

Row = dict[str, Any]


@dataclass(frozen=True)
class System:
    """One column of answers: a router, plus the overrides it runs with for a row (given the row's own routing
    by this router when `needs_routing`)."""

    name: str
    router: GroupedRouter
    about: str
    overrides: Callable[[Row, RoutingTrace | None], Overrides | None] = lambda row, trace: None
    needs_routing: bool = False      # overrides read the router's routing of the row (a prompt-only pass first)
    scored_routing: bool = False     # a trained router as it is: selection and gate accuracy are reported

    def overrides_for(self, row: Row, trace: RoutingTrace | None = None) -> Overrides | None:
        return self.overrides(row, trace)


def layer_constant(trace: RoutingTrace) -> Overrides:
    """The trace's α [L, G] and β [L, E] averaged over layers, fixed on every layer."""
    clip = lambda v: min(max(float(v), 0.0), 1.0)  # noqa: E731 — float32 means may stray past [0, 1] by rounding
    alpha, beta = trace.group_weights.astype(np.float64).mean(0), trace.expert_weights.astype(np.float64).mean(0)
    return Overrides(groups={g: clip(a) for g, a in zip(trace.groups, alpha)},
                     experts={e: clip(b) for e, b in zip(trace.experts, beta)})


def systems(m: ATMoE, routers: dict[str, GroupedRouter], *, baselines: bool = True, prefix: str = ""
            ) -> list[System]:
    """Every system, in table order. `routers`: trained routers by name; the first is the one `router_constant`
    averages. Without `baselines` (base, experts alone, uniform merge): only the layer-constant systems and the
    routers; `prefix` names the layer-constant ones (e.g. "coadapted:" for a second set of experts)."""
    sigmoid = m.new_router(mode="sigmoid")  # untrained: only ever used with every weight it needs fixed

    def alone(e: str) -> Callable[[Row, RoutingTrace | None], Overrides]:
        ov = Overrides(groups={h: float(h == m.expert_groups[e]) for h in m.groups}, experts={e: 1.0})
        return lambda row, trace: ov

    def oracle(row: Row, trace: RoutingTrace | None) -> Overrides:
        needed = [e for e in m.experts if e in row["experts"]]
        per_group = Counter(m.expert_groups[e] for e in needed)   # labelled experts of one group share it
        return Overrides(groups={g: float(g in per_group) for g in m.groups},
                         experts={e: 1.0 / per_group[m.expert_groups[e]] for e in needed})

    out = []
    if baselines:
        out.append(System("base", sigmoid, "no expert", lambda row, trace: Overrides(disabled=m.experts)))
        out += [System(f"expert:{e}", sigmoid, f"{e} alone, weight 1 on every layer", alone(e)) for e in m.experts]
        out.append(System("uniform_merge", m.new_router(mode="flat"), "every expert at 1/E on every layer"))
    out.append(System(f"{prefix}oracle_constant", sigmoid, "labelled experts at full weight on every layer", oracle))
    if routers:
        first = next(iter(routers))
        out.append(System(f"{prefix}router_constant", routers[first], f"{first}'s layer-mean α, β on every layer",
                          lambda row, trace: layer_constant(trace), needs_routing=True))
    out += [System(name, r, f"trained router ({r.config.mode})", scored_routing=True) for name, r in routers.items()]
    return out


# ---------------------------------------------------------------- routing scores
def selection_hits(trace: RoutingTrace, row: Row) -> tuple[int, int]:
    """(hits, total) over the row's needed groups: argmax of layer-mean β within the group is a labelled expert."""
    beta = trace.expert_weights.mean(0)
    hits = total = 0
    layout = trace.layout
    for g in layout.groups:
        cols = layout.members(g)
        wanted = {trace.experts[i] for i in cols} & set(row["experts"])
        if wanted:
            total += 1
            hits += trace.experts[cols[int(np.argmax(beta[cols]))]] in wanted
    return hits, total


def gate_hits(trace: RoutingTrace, row: Row) -> tuple[int, int]:
    """(hits, total) over every group: "on" ⇔ the row needs the group. A sigmoid gate is on when it opens (> 0.5)
    on some layer — a needed group may act on a few layers only (style on the top ones), which is what the
    training loss asks for (`routing_losses`); a shared budget is on when its layer mean is above 1/(2G)."""
    if trace.mode == "sigmoid":
        threshold, alpha = 0.5, trace.group_weights.max(0)
    else:
        threshold, alpha = 1.0 / (2 * len(trace.groups)), trace.group_weights.mean(0)
    needed = {trace.layout.group_of(e) for e in row["experts"]}
    hits = sum(bool(alpha[i] > threshold) == (g in needed) for i, g in enumerate(trace.groups))
    return hits, len(trace.groups)


def chance_selection(rows: list[Row], expert_groups: dict[str, str]) -> float | None:
    """Selection accuracy of always picking each group's most frequent labelled expert on these rows."""
    by_group: dict[str, Counter] = {}
    for row in rows:
        for e in row["experts"]:
            by_group.setdefault(expert_groups[e], Counter())[e] += 1
    total = sum(sum(c.values()) for c in by_group.values())
    return sum(max(c.values()) for c in by_group.values()) / total if total else None


def bootstrap_ci(values: np.ndarray, resamples: int = 2000, seed: int = 0) -> tuple[float, float]:
    """95 % percentile interval of the mean over `resamples` resamplings of the rows (fixed seed)."""
    idx = np.random.default_rng(seed).integers(0, len(values), size=(resamples, len(values)))
    lo, hi = np.percentile(values[idx].mean(1), [2.5, 97.5])
    return float(lo), float(hi)


def paired_differences(results: dict[str, Any], rows: list[Row]) -> dict[str, Any]:
    """The shipped system against every other one on the same rows: mean F1 difference (shipped − other) with its
    paired bootstrap 95 % interval; and the shipped system's mean on the never-trained combinations vs the rest."""
    shipped = results["shipped"]
    f1 = {name: np.array([score(t, r)["f1"] for t, r in zip(texts, rows, strict=True)])
          for name, texts in results["answers"].items()}
    if shipped not in f1:
        return {}
    diffs = {name: {"diff": float((f1[shipped] - v).mean()), "ci95": list(bootstrap_ci(f1[shipped] - v))}
             for name, v in f1.items() if name != shipped}
    unseen = np.array([tuple(r.get("meta", {}).get("combo", ())) in HELDOUT_COMBOS for r in rows])
    split = {label: {"n": int(mask.sum()), "f1": float(f1[shipped][mask].mean()) if mask.any() else None}
             for label, mask in (("trained_combinations", ~unseen), ("never_trained_combinations", unseen))}
    return {"shipped": shipped, "minus": diffs, "by_combination": split}


# ---------------------------------------------------------------- generation and scoring
def _answers(m: ATMoE, rows: list[Row], system: System, max_new_tokens: int, batch_size: int, grounded: bool = False
             ) -> tuple[list[str], list[RoutingTrace]]:
    """Greedy answers of one system to every row; rows with identical overrides generate together."""
    traces: list[RoutingTrace | None] = [None] * len(rows)
    if system.needs_routing:
        for s in range(0, len(rows), batch_size):
            chunk = rows[s:s + batch_size]
            traces[s:s + batch_size] = m.route_batch([r["instruction"] for r in chunk],
                                                     inputs=[r["input"] for r in chunk], router=system.router)
    batches: dict[str, tuple[Overrides | None, list[int]]] = {}
    for i, row in enumerate(rows):
        ov = system.overrides_for(row, traces[i])
        batches.setdefault(json.dumps(ov and ov.to_dict(), sort_keys=True), (ov, []))[1].append(i)
    calls = [(ov, idx[s:s + batch_size]) for ov, idx in batches.values() for s in range(0, len(idx), batch_size)]
    gens: dict[int, Any] = {}
    for ov, part in tqdm(calls, desc=system.name, leave=False):
        gens.update(zip(part, m.generate_batch([rows[i]["instruction"] for i in part],
                                               inputs=[rows[i]["input"] for i in part],
                                               max_new_tokens=max_new_tokens, router=system.router, overrides=ov,
                                               grounded=grounded)))
    return [gens[i].text for i in range(len(rows))], [gens[i].trace for i in range(len(rows))]


def summarise(system: System, rows: list[Row], texts: list[str], traces: list[RoutingTrace], skills: list[str]
              ) -> dict[str, Any]:
    scores = [score(t, r) for t, r in zip(texts, rows)]
    f1 = np.array([s["f1"] for s in scores])
    per_skill = {k: (float(np.mean([x for x, r in zip(f1, rows) if k in r["experts"]]))
                     if any(k in r["experts"] for r in rows) else None) for k in skills}
    out: dict[str, Any] = {"about": system.about, "f1": float(f1.mean()), "ci95": list(bootstrap_ci(f1)),
                           "exact": float(np.mean([s["exact"] for s in scores])), "per_skill": per_skill,
                           "selection": None, "gate_accuracy": None}
    if system.scored_routing:
        sel = np.array([selection_hits(t, r) for t, r in zip(traces, rows)]).sum(0)
        gate = np.array([gate_hits(t, r) for t, r in zip(traces, rows)]).sum(0)
        out["selection"] = float(sel[0] / sel[1]) if sel[1] else None
        out["gate_accuracy"] = float(gate[0] / gate[1])
    return out


def _fingerprint(rows: list[Row], max_new_tokens: int, routers: dict[str, GroupedRouter], m: ATMoE,
                 grounded: bool = False) -> str:
    """What a partial result depends on: the rows, the budget, the decoding, the routers' and experts' weights
    (stale partials are ignored)."""
    h = hashlib.sha256(json.dumps([rows, max_new_tokens, list(routers)] + (["grounded"] if grounded else []),
                                  sort_keys=True).encode())
    tensors = [t for r in routers.values() for t in r.state_dict().values()]
    for t in tensors + [t for f in m.fused for t in (f.lora_A, f.lora_B)]:
        h.update(t.detach().float().cpu().numpy().tobytes())
    return h.hexdigest()


def evaluate(m: ATMoE, rows: list[Row], routers: dict[str, GroupedRouter], *, max_new_tokens: int | None = None,
             batch_size: int = 8, partial_path: str | Path | None = None, baselines: bool = True, prefix: str = "",
             only: set[str] | None = None, grounded: bool = False) -> dict[str, Any]:
    """Greedy answers of every system (`systems(m, routers, baselines=, prefix=)`) to every row, scored; see the
    module docstring (`only`: just these systems; `grounded`: decoded with GenerationSettings.grounded). Default
    `max_new_tokens`: the longest reference in tokens + 16."""
    if not rows:
        raise ValueError("no rows to evaluate")
    if max_new_tokens is None:
        max_new_tokens = max(len(m.tokenizer(r["output"])["input_ids"]) for r in rows) + 16
    all_systems = [s for s in systems(m, routers, baselines=baselines, prefix=prefix) if only is None or s.name in only]
    if only is not None and not all_systems:
        raise ValueError(f"none of the systems {sorted(only)} exists here; systems: "
                         f"{[s.name for s in systems(m, routers, baselines=baselines, prefix=prefix)]}")
    results: dict[str, Any] = {
        "n": len(rows), "decoding": "greedy, grounded" if grounded else "greedy", "max_new_tokens": max_new_tokens,
        "shipped": next(iter(routers), None), "skills": list(m.experts),
        "chance": {"selection": chance_selection(rows, m.expert_groups)},
        "fingerprint": _fingerprint(rows, max_new_tokens, routers, m, grounded), "systems": {}, "answers": {}}
    if partial_path is not None and Path(partial_path).exists():
        previous = read_json(partial_path, "partial evaluation")
        if previous.get("fingerprint") == results["fingerprint"]:
            results["systems"], results["answers"] = previous["systems"], previous["answers"]
    todo = [s for s in all_systems if s.name not in results["systems"]]
    for system in tqdm(todo, desc="systems", initial=len(all_systems) - len(todo), total=len(all_systems)):
        texts, traces = _answers(m, rows, system, max_new_tokens, batch_size, grounded)
        results["systems"][system.name] = summarise(system, rows, texts, traces, results["skills"])
        results["answers"][system.name] = texts
        if partial_path is not None:
            atomic_write_json(partial_path, results)
    order = [s.name for s in all_systems]
    for key in ("systems", "answers"):
        results[key] = {name: results[key][name] for name in order}
    return results


def markdown_table(results: dict[str, Any]) -> str:
    """system | per-skill F1 … | mean F1 [95 % CI] | exact | selection (chance) | gate acc."""
    skills, chance = results["skills"], results["chance"]["selection"]
    fmt = lambda v: "–" if v is None else f"{v:.3f}"  # noqa: E731
    head = ["system", *skills, "mean F1 [95% CI]", "exact", "selection (chance)", "gate acc."]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, s in results["systems"].items():
        label = f"`{name}`" + (" (shipped)" if name == results["shipped"] else "")
        sel = "–" if s["selection"] is None else f"{s['selection']:.3f} ({fmt(chance)})"
        lines.append("| " + " | ".join([label, *(fmt(s["per_skill"][k]) for k in skills),
                                         f"**{s['f1']:.3f}** [{s['ci95'][0]:.3f}, {s['ci95'][1]:.3f}]",
                                         fmt(s["exact"]), sel, fmt(s["gate_accuracy"])]) + " |")
    table = (f"n = {results['n']} held-out complex instructions, {results['decoding']} decoding, max_new_tokens = "
             f"{results['max_new_tokens']}. Line F1; a skill's column averages the rows that need it.\n\n"
             + "\n".join(lines) + "\n")
    paired = results.get("paired")
    if paired:
        table += (f"\n`{paired['shipped']}` minus each system, paired over the same rows (mean F1 difference, "
                  "bootstrap 95 % interval):\n\n| system | shipped − system |\n|---|---|\n"
                  + "".join(f"| `{name}` | {d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] |\n"
                            for name, d in paired["minus"].items()))
        split = paired["by_combination"]
        table += ("\n`{}` by combination: trained combinations (in held-out wordings) {} on {} rows; never-trained "
                  "combinations {} on {} rows.\n").format(
            paired["shipped"], fmt(split["trained_combinations"]["f1"]), split["trained_combinations"]["n"],
            fmt(split["never_trained_combinations"]["f1"]), split["never_trained_combinations"]["n"])
    return table


# ---------------------------------------------------------------- entry points
def read_rows(path: str | Path) -> list[Row]:
    if not Path(path).is_file():
        raise ValueError(f"data file not found: {path}")
    rows = []
    for n, text in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        if text.strip():
            try:
                row = json.loads(text)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}, line {n}: invalid JSON ({e.msg})") from None
            missing = [k for k in ("instruction", "input", "output", "experts") if k not in row]
            if missing:
                raise ValueError(f"{path}, line {n}: missing {missing}")
            rows.append(row)
    return rows


def write_results(results: dict[str, Any], out: Path, rows: list[Row]) -> str:
    results["paired"] = paired_differences(results, rows)
    table = markdown_table(results)
    atomic_write_json(out / "results.json", results)
    atomic_write_bytes(out / "results.md", table.encode())
    return table


def _check_rows(rows: list[Row], m: ATMoE, path: Path) -> None:
    unknown = sorted({e for r in rows for e in r["experts"]} - set(m.experts))
    if unknown:
        raise ValueError(f"{path} labels expert(s) {unknown} that the manifest does not have: {m.experts}")


def evaluate_demo(cfg: BuildConfig, out: Path) -> None:
    """The build's last stage, on the first `cfg.eval_n` held-out rows, as one table: the paper's recipe (experts
    trained apart, `assets/experts.json`) with every baseline and the routers of `config.ROUTERS`; then each built
    co-adapted variant of `config.COADAPTED` — the shipped one with its own layer-constant systems. Each part is kept
    in `eval/parts/<part>.json` with the fingerprint of what it ran (rows, budget, routers, experts): a rerun reuses the
    parts whose inputs did not change and runs only the rest."""
    out, parts = Path(out), Path(out) / "eval" / "parts"
    m = ATMoE.load(out / "experts.json", device="auto")
    routers = {}
    for name, mode, file in ROUTERS:
        routers[name] = load_router(out / file, expected=m.router_config).to(m.device)
        if routers[name].config.mode != mode:
            raise ValueError(f"{out / file} is a {routers[name].config.mode} router; {name} must be {mode}")
    data = out / "data" / "eval.jsonl"
    rows = read_rows(data)[: cfg.eval_n]
    if not rows:
        raise ValueError(f"{data} has no rows")
    _check_rows(rows, m, data)
    results = evaluate(m, rows, routers, partial_path=parts / "stage1.json")
    results["fingerprint"] = {"stage1": results["fingerprint"]}
    del m
    for v in COADAPTED:
        manifest, stored = v.path(cfg) / "experts.json", parts / f"{v.name}.json"
        if manifest.exists():
            co = ATMoE.load(manifest, device="auto")
            part = evaluate(co, rows, {v.name: co.router}, baselines=False, prefix="coadapted:",
                            only=None if v.shipped else {v.name}, partial_path=stored,
                            max_new_tokens=results["max_new_tokens"])
            del co
        elif not v.shipped and stored.exists():   # an ablation built in another work folder: its answers ship
            part = read_json(stored, "stored evaluation")
            if (part.get("n"), part.get("max_new_tokens")) != (len(rows), results["max_new_tokens"]):
                print(f"{v.name}: {stored} ran other rows or another budget, and its model is not in {manifest.parent}:"
                      " left out of the table")
                continue
            print(f"{v.name}: its model is not in {manifest.parent}; the table keeps its stored answers ({stored})")
        else:
            continue
        results["systems"].update(part["systems"])
        results["answers"].update(part["answers"])
        results["fingerprint"][v.name] = part["fingerprint"]
        if v.shipped:
            results["shipped"] = v.name
    print(write_results(results, out / "eval", rows))


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Score every system on held-out rows; write results.json and .md")
    p.add_argument("--manifest", default=STAGE1_MANIFEST)
    p.add_argument("--data", default="assets/data/eval.jsonl")
    p.add_argument("--out", default="runs/eval", help="folder for results.json, results.md (and partial.json)")
    p.add_argument("--n", type=int, default=None, help="first N rows (default: all)")
    p.add_argument("--router", action="append", default=[], metavar="NAME=PATH",
                   help="trained routers to compare, the first shipped (default: the demo's, next to the manifest)")
    p.add_argument("--systems", default=None, help="comma-separated: only these systems (default: all)")
    p.add_argument("--no-baselines", action="store_true", help="skip base, experts alone and the uniform merge")
    p.add_argument("--max-new-tokens", type=int, default=None)
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--grounded", action="store_true", help="decode grounded: no value the prompt does not hold")
    p.add_argument("--device", default="auto")
    p.add_argument("--gate-floor", type=float, default=None,
                   help="every router's gate floor for this run (RouterConfig.gate_floor; default: each file's own)")
    a = p.parse_args(argv)
    try:
        specs = [s.partition("=")[::2] for s in a.router]
        bad = [s for s, (name, path) in zip(a.router, specs) if not name or not path]
        if bad:
            raise ValueError(f"--router expects NAME=PATH, got {bad}")
        if a.n is not None and a.n < 1:
            raise ValueError(f"--n must be >= 1, got {a.n}")
        rows = read_rows(a.data)[: a.n]
        if not rows:
            raise ValueError(f"{a.data} has no rows")
        if not specs:  # the demo's routers that exist next to the manifest
            root = Path(a.manifest).parent
            specs = [(name, str(root / f)) for name, _, f in ROUTERS if (root / f).is_file()]
        for name, path in specs:
            if not Path(path).is_file():
                raise ValueError(f"router file not found: {path} (--router {name}=...)")
        m = ATMoE.load(a.manifest, device=a.device, gate_floor=a.gate_floor)
        routers = {name: load_router(path, expected=m.router_config).to(m.device) for name, path in specs}
        if a.gate_floor is not None:
            for r in routers.values():
                r.config = replace(r.config, gate_floor=a.gate_floor)
        _check_rows(rows, m, Path(a.data))
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    out = Path(a.out)
    only = set(a.systems.split(",")) if a.systems else None
    try:
        results = evaluate(m, rows, routers, max_new_tokens=a.max_new_tokens, batch_size=a.batch_size,
                           partial_path=out / "partial.json", baselines=not a.no_baselines, only=only,
                           grounded=a.grounded)
    except ValueError as e:
        raise SystemExit(f"error: {e}") from None
    print(write_results(results, out, rows))
    (out / "partial.json").unlink(missing_ok=True)


if __name__ == "__main__":
    main()
