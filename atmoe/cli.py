"""Command line: `atmoe route|generate|sweep|attribute|counterfactual|atlas|train-expert|train-router`.

    atmoe route "List the lab results. Flag each as low, normal or high." --input "Labs: Na 128, K 4.1."
    atmoe route --dataset rows.jsonl --out routes/      # every row's routing as .npy + index + balance (analysis.md)
    atmoe attribute --dataset rows.jsonl --first-order  # Δ answer log-prob per removed expert, per row
    atmoe counterfactual --dataset rows.jsonl             # does deleting the top-attributed word lower its group?
    atmoe atlas routes/                                  # the export's PCA plane and how its labels separate
    atmoe generate "List the vital signs." --input "Vitals: HR 132, SpO2 88." --override style=0 \
        --override expert:bullets=1 --layers 0-11
    atmoe sweep "List the vital signs." --input "..." --target group:style --steps 5 --csv sweep.csv
    atmoe sweep --dataset rows.jsonl --target expert:bullets --steps 3   # the mean curve over a data set

The model is `--manifest PATH`, else `$ATMOE_MANIFEST`; the engine knows no default model. The demo's own command
line (`python -m demo route|generate|sweep ...`) runs these commands on the shipped demo model, with the demo's
line-F1 scorer for `sweep --reference`, and adds the demo's build and evaluation.

Errors are one line on stderr (exit status 2), never a traceback.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

ReferenceScorer = Callable[[str, str], dict[str, float]]   # (answer, reference) → {metric: value}


def exact_match(text: str, reference: str) -> dict[str, float]:
    """The engine's only metric: 1.0 when the answer equals the reference up to surrounding whitespace."""
    return {"exact": float(text.strip() == reference.strip())}


def parse_overrides(specs: list[str], layers: str | None, disabled: list[str]):  # -> Overrides | None
    """`style=0` or `group:style=0` fixes a group; `expert:bullets=1` an expert; `--layers 0-11` (inclusive)."""
    from .overrides import Overrides

    groups, experts = {}, {}
    for spec in specs:
        key, sep, value = spec.partition("=")
        kind, _, name = key.rpartition(":")
        if not sep or not name or kind not in ("", "group", "expert"):
            raise ValueError(f"--override {spec!r}: expected NAME=VALUE, group:NAME=VALUE or expert:NAME=VALUE")
        try:
            number = float(value)
        except ValueError:
            raise ValueError(f"--override {spec!r}: {value!r} is not a number") from None
        (experts if kind == "expert" else groups)[name] = number
    span = None
    if layers:
        first, sep, last = layers.partition("-")
        try:
            span = (int(first), int(last if sep else first))
        except ValueError:
            raise ValueError(f"--layers {layers!r}: expected FIRST-LAST, e.g. 0-11") from None
    if not (groups or experts or disabled):
        return Overrides(layers=span) if span else None
    return Overrides(groups=groups, experts=experts, layers=span, disabled=disabled)


def _weights_table(trace) -> str:  # noqa: ANN001
    frame = trace.to_frame()
    used = frame[frame.source == "used"]
    groups = used[used.level == "group"].pivot(index="layer", columns="group", values="weight")[trace.groups]
    experts = used[used.level == "effective"].pivot(index="layer", columns="expert", values="weight")[trace.experts]
    status = "trained" if trace.router_trained else "UNTRAINED (uniform weights)"
    return (f"router: {trace.mode}, {status}; overrides: {trace.overrides}\n\n"
            f"group weights α (per layer)\n{groups.round(3).to_string()}\n\n"
            f"effective expert weights α·β (per layer)\n{experts.round(3).to_string()}\n\n"
            f"mean over layers\n{experts.mean().round(3).to_string()}")


def _model_args(p: argparse.ArgumentParser, optional_prompt: bool = False) -> None:
    p.add_argument("prompt", nargs="?" if optional_prompt else None)
    p.add_argument("--input", default="",
                   help="input text after the instruction (e.g. a clinical note); the router reads the instruction")
    p.add_argument("--manifest", default=None, help="expert manifest (default $ATMOE_MANIFEST)")
    p.add_argument("--base", default=None, help="override the manifest's base model (name or folder)")
    p.add_argument("--device", default="auto")
    p.add_argument("--override", action="append", default=[], metavar="[group:|expert:]NAME=VALUE")
    p.add_argument("--disable", action="append", default=[], metavar="EXPERT")
    p.add_argument("--layers", default=None, metavar="FIRST-LAST")
    p.add_argument("--granularity", choices=["sequence", "token"], default=None)
    p.add_argument("--json", action="store_true", help="print the trace as JSON")


def _load(a: argparse.Namespace):  # noqa: ANN202
    from .model import ATMoE

    manifest = a.manifest or os.environ.get("ATMOE_MANIFEST") or a.default_manifest
    if not manifest:
        raise ValueError("no model: pass --manifest PATH or set ATMOE_MANIFEST "
                         "(the shipped demo model: `python -m demo route|generate|sweep ...`)")
    if not Path(manifest).exists():
        raise ValueError(f"manifest not found: {manifest} (build the demo with `make assets`, or pass --manifest)")
    return ATMoE.load(manifest, base=a.base, device=a.device)


def cmd_route(a: argparse.Namespace) -> None:
    ov = parse_overrides(a.override, a.layers, a.disable)
    if a.dataset or a.out:
        return route_dataset(a, ov)
    if not a.prompt:
        raise ValueError("give a prompt, or --dataset FILE.jsonl --out DIR to export the routing of a data set")
    m = _load(a)
    trace = m.route(a.prompt, ov, input=a.input, granularity=a.granularity)
    print(trace.to_json() if a.json else _weights_table(trace))


def route_dataset(a: argparse.Namespace, ov) -> None:  # noqa: ANN001
    """`route --dataset FILE --out DIR`: the routing of every row as .npy, a JSONL index and balance statistics."""
    from .analysis.routes import export_routes

    if a.prompt or not (a.dataset and a.out):
        raise ValueError("--dataset FILE.jsonl and --out DIR go together, without a prompt")
    if not Path(a.dataset).is_file():
        raise ValueError(f"data set not found: {a.dataset}")
    m = _load(a)
    stats = export_routes(m, a.dataset, a.out, overrides=ov, granularity=a.granularity or "sequence",
                          batch_size=a.batch_size, restart=a.restart,
                          progress=lambda n: print(f"routed {n} rows", file=sys.stderr, flush=True))
    load = stats["mean_weight"]
    mean = [sum(col) / len(load) for col in zip(*load)]
    print(f"{stats['rows']} rows → {a.out} (alpha.npy, beta.npy, index.jsonl, balance.json, meta.json)")
    print("mean effective weight over layers: " + ", ".join(f"{e} {w:.3f}" for e, w in zip(stats["experts"], mean)))
    print(f"max/mean load ratio per layer: {min(stats['max_mean_ratio']):.2f}–{max(stats['max_mean_ratio']):.2f}; "
          f"unused experts (mean weight < {stats['unused_below']} on every layer): {stats['unused'] or 'none'}")


def cmd_attribute(a: argparse.Namespace) -> None:
    """Per row of a data set: Δ answer log-prob when each expert is removed; prints the labelled-expert rate."""
    import pandas as pd

    from .analysis.attribution import agreement, attribute_rows, labelled_rate, layer_ranges
    from .analysis.routes import read_rows

    rows = list(read_rows(a.dataset))[: a.limit or None]
    m = _load(a)
    prompts, inputs = [r["instruction"] for r in rows], [r.get("input", "") for r in rows]
    if a.answers == "reference":
        answers = [m.tokenizer(r.get("output", ""), add_special_tokens=False)["input_ids"] for r in rows]
    else:
        answers = []
        for i in range(0, len(rows), a.batch_size):
            answers += [g.token_ids for g in m.generate_batch(prompts[i:i + a.batch_size],
                                                              inputs=inputs[i:i + a.batch_size],
                                                              max_new_tokens=a.max_new_tokens, merge=False)]
    keep = [i for i, x in enumerate(answers) if x]
    ranges = layer_ranges(m.num_layers, a.ranges)
    result = attribute_rows(m, [prompts[i] for i in keep], [answers[i] for i in keep],
                            inputs=[inputs[i] for i in keep], ranges=ranges, first_order=a.first_order,
                            batch_size=a.batch_size,
                            progress=lambda n, total: print(f"attributed {n}/{total}", file=sys.stderr, flush=True))
    frames = []
    for i, r in zip(keep, result):
        f = r.to_frame()
        f.insert(0, "row", i)
        f["answer_tokens"] = len(r.tokens)
        frames.append(f)
    frame = pd.concat(frames, ignore_index=True)
    if a.csv:
        frame.to_csv(a.csv, index=False)
    print(frame.groupby(["target", "first", "last"])["delta"].mean().unstack(["first", "last"]).round(3).to_string())
    labels = [rows[i].get("experts") for i in keep]
    if all(x is not None for x in labels) and len(ranges) == 1:
        rate = labelled_rate(result, labels)
        low, high = rate["interval"]
        print(f"labelled expert removed costs more than an unlabelled one: {rate['rate']:.3f} of {rate['rows']} rows "
              f"(95% Wilson {low:.3f}–{high:.3f}); pairs {rate['pair_rate']:.3f} of {rate['pairs']}")
    if a.first_order:
        agree = agreement(frame["delta"].to_numpy(), frame["estimate"].to_numpy())
        print("first-order vs exact over all cells: " + ", ".join(f"{k} {v:.3f}" for k, v in agree.items()))


def cmd_counterfactual(a: argparse.Namespace) -> None:
    """Per row: the chosen group's weight drop when its top-attributed word is deleted, against a random word."""
    from .analysis.counterfactual import counterfactual
    from .analysis.routes import read_rows

    rows = list(read_rows(a.dataset))[: a.limit or None]
    m = _load(a)
    frame, s = counterfactual(m, [(r["instruction"], r.get("input", "")) for r in rows], seed=a.seed,
                              progress=lambda n, total: print(f"checked {n}/{total}", file=sys.stderr, flush=True))
    if a.out:
        frame.to_csv(a.out, index=False)
    low, high = s["interval"]
    print(f"deleting the top word lowers the chosen group's weight more than deleting a random word: {s['wins']}/"
          f"{s['rows']} rows = {s['rate']:.3f} (95% Wilson {low:.3f}–{high:.3f}); mean drop: top word "
          f"{s['mean_drop_top']:.4f}, random word {s['mean_drop_random']:.4f}")


def cmd_atlas(a: argparse.Namespace) -> None:
    """`atlas ROUTES`: the PCA plane of an export's routing, with how well its `experts` labels separate there."""
    from .analysis.atlas import atlas, separation
    from .analysis.routes import load_routes
    from .layout import GroupLayout

    alpha, beta, index, meta = load_routes(a.routes)
    layout = GroupLayout(meta["groups"], meta["experts"], meta["expert_groups"])
    labels = ["+".join(r["experts"]) or "—" if isinstance(r.get("experts"), list) else "—" for r in index]
    frame, fit = atlas(alpha, beta, layout, labels=labels, kind=a.kind)
    frame.insert(0, "id", [r["id"] for r in index])
    sep = separation(frame[["x", "y"]].to_numpy(), frame["label"])
    if a.csv:
        frame.to_csv(a.csv, index=False)
    print(f"{len(frame)} rows, features {a.kind}: the plane holds {fit.explained[0]:.1%} + {fit.explained[1]:.1%} of "
          f"the variance; leave-one-out nearest-centroid accuracy of the {sep['labels']} labels "
          f"{sep['accuracy']:.3f} over {sep['points']} rows (chance {sep['chance']:.3f})")


def cmd_generate(a: argparse.Namespace) -> None:
    from .generation import GenerationSettings
    from .model import Generation

    ov = parse_overrides(a.override, a.layers, a.disable)
    m = _load(a)
    trace = None
    settings = GenerationSettings(max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p,
                                  seed=a.seed, granularity=a.granularity, merge=a.merge, grounded=a.grounded)
    for piece in m.stream(a.prompt, input=a.input, settings=settings, overrides=ov):
        if isinstance(piece, Generation):
            trace = piece.trace
        elif not a.json:
            print(piece, end="", flush=True)
    print()
    print(trace.to_json() if a.json else "\n" + _weights_table(trace))


def cmd_sweep(a: argparse.Namespace) -> None:
    """One generation per weight of `--target`; prints the frame (and writes `--csv`)."""
    from .analysis.sweep import sweep

    span = parse_overrides([], a.layers, []).layers if a.layers else None
    if a.dataset:
        return sweep_dataset(a, span)
    if not a.prompt:
        raise ValueError("give a prompt, or --dataset FILE.jsonl for the curve over a data set")
    scorer = None
    if a.reference is not None:
        def scorer(text: str) -> dict[str, float]:
            return a.reference_scorer(text, a.reference)
    m = _load(a)
    frame = sweep(m, a.prompt, a.input, a.target, steps=a.steps, layers=span, scorer=scorer,
                  max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed,
                  merge=a.merge)
    if a.csv:
        frame.to_csv(a.csv, index=False)
    print(frame.to_string(index=False, max_colwidth=80))


def sweep_dataset(a: argparse.Namespace, span: tuple[int, int] | None) -> None:
    """`sweep --dataset FILE`: every row at every weight; prints the mean per weight (the curve), writes the
    per-row frame to `--csv`. Rows with an `output` are scored against it with the reference scorer."""
    from .analysis.routes import read_rows
    from .analysis.sweep import curve, router_weight, sweep_rows

    if a.prompt or a.reference is not None:
        raise ValueError("--dataset takes no prompt and no --reference (each row's `output` is its reference)")
    rows = list(read_rows(a.dataset))[: a.limit or None]
    prompts, inputs = [r["instruction"] for r in rows], [r.get("input", "") for r in rows]

    def scorer(i: int, text: str) -> dict[str, float]:
        return a.reference_scorer(text, rows[i]["output"]) if isinstance(rows[i].get("output"), str) else {}

    m = _load(a)
    frame = sweep_rows(m, prompts, a.target, inputs=inputs, steps=a.steps, layers=span, scorer=scorer,
                       max_new_tokens=a.max_new_tokens, temperature=a.temperature, top_p=a.top_p, seed=a.seed,
                       progress=lambda n, total: print(f"generated {n}/{total}", file=sys.stderr, flush=True))
    if a.csv:
        frame.to_csv(a.csv, index=False)
    print(curve(frame).to_string(index=False))
    print(f"the router's own mean weight of {a.target}: "
          f"{router_weight(m, prompts, a.target, inputs=inputs, layers=span):.3f}")


def main(argv: list[str] | None = None, *, prog: str = "atmoe", default_manifest: str | None = None,
         reference_scorer: ReferenceScorer = exact_match) -> int:
    """Run one command. A client (the demo) passes the model to load when neither `--manifest` nor
    `$ATMOE_MANIFEST` names one, and the metrics `sweep --reference` adds per step."""
    parser = argparse.ArgumentParser(prog=prog, description="AT-MoE: grouped LoRA experts routed per layer")
    parser.set_defaults(default_manifest=default_manifest, reference_scorer=reference_scorer)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("route", help="print the group/expert weight table for a prompt, or export the routing of a "
                                     "data set (--dataset, --out)")
    _model_args(p, optional_prompt=True)
    p.add_argument("--dataset", default=None, metavar="FILE.jsonl",
                   help="route every row (`instruction`, optional `input`, `id`, `experts`) instead of one prompt")
    p.add_argument("--out", default=None, metavar="DIR", help="where --dataset writes (docs/analysis.md: the format)")
    p.add_argument("--batch-size", type=int, default=16, help="rows routed (and written) together")
    p.add_argument("--restart", action="store_true", help="discard an unfinished export of another run in --out")
    p.set_defaults(func=cmd_route)
    p = sub.add_parser("generate", help="generate (streamed) and print the routing")
    _model_args(p)
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--merge", action=argparse.BooleanOptionalAction, default=True,
                   help="decode with per-call merged weights: base-model speed for one copy of the projection "
                        "weights while generating (default on: the CLI serves one request; --no-merge keeps "
                        "the fused low-rank path)")
    p.add_argument("--grounded", action="store_true",
                   help="write only values the prompt holds, or an engaged expert's reference values (the manifest's "
                        "`values`), none under a declared measurement the prompt does not name: "
                        "GenerationSettings.grounded")
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("sweep", help="generate with one group or expert weight fixed at 0 … 1 (controllability curve)")
    p.add_argument("prompt", nargs="?")
    p.add_argument("--dataset", default=None, metavar="FILE.jsonl",
                   help="the curve over a data set instead of one prompt: mean score per weight (rows with `output` "
                        "are scored against it); --csv gets one line per row and weight")
    p.add_argument("--limit", type=int, default=0, help="with --dataset: only the first N rows")
    p.add_argument("--input", default="")
    p.add_argument("--manifest", default=None, help="expert manifest (default $ATMOE_MANIFEST)")
    p.add_argument("--base", default=None, help="override the manifest's base model (name or folder)")
    p.add_argument("--device", default="auto")
    p.add_argument("--target", required=True, metavar="group:NAME|expert:NAME", help="the weight to sweep")
    p.add_argument("--steps", type=int, default=5, help="weights linspace(0, 1, steps), endpoints included")
    p.add_argument("--layers", default=None, metavar="FIRST-LAST", help="fix it on these layers only (inclusive)")
    p.add_argument("--reference", default=None, help="reference answer: adds a score per step (the engine's: "
                                                     "exact match; the demo's CLI: line F1 and exact)")
    p.add_argument("--csv", default=None, help="also write the frame to this CSV file")
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--top-p", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0, help="the same seed for every step")
    p.add_argument("--merge", action=argparse.BooleanOptionalAction, default=True,
                   help="decode with per-call merged weights (see `atmoe generate --help`)")
    p.set_defaults(func=cmd_sweep)
    p = sub.add_parser("attribute", help="per row of a data set: Δ answer log-prob when each expert is removed")
    p.add_argument("--dataset", required=True, metavar="FILE.jsonl",
                   help="rows with `instruction` (optional `input`, `output`, `experts` labels)")
    p.add_argument("--manifest", default=None, help="expert manifest (default $ATMOE_MANIFEST)")
    p.add_argument("--base", default=None, help="override the manifest's base model (name or folder)")
    p.add_argument("--device", default="auto")
    p.add_argument("--answers", choices=["generated", "reference"], default="generated",
                   help="attribute greedy answers (default) or the rows' `output`")
    p.add_argument("--max-new-tokens", type=int, default=96)
    p.add_argument("--ranges", type=int, default=1, help="split the layers into this many equal ranges")
    p.add_argument("--first-order", action="store_true", help="also the gradient estimate, and its agreement")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--limit", type=int, default=0, help="only the first N rows")
    p.add_argument("--csv", default=None, help="write one line per (row, target, range)")
    p.set_defaults(func=cmd_attribute)
    p = sub.add_parser("counterfactual", help="per row of a data set: does deleting the word that contributes most "
                                              "to the chosen group lower its weight more than a random word?")
    p.add_argument("--dataset", required=True, metavar="FILE.jsonl", help="rows with `instruction` (optional `input`)")
    p.add_argument("--manifest", default=None, help="expert manifest (default $ATMOE_MANIFEST)")
    p.add_argument("--base", default=None, help="override the manifest's base model (name or folder)")
    p.add_argument("--device", default="auto")
    p.add_argument("--limit", type=int, default=0, help="only the first N rows")
    p.add_argument("--seed", type=int, default=0, help="seeds the random word of each row")
    p.add_argument("--out", default=None, metavar="CSV", help="write one line per row")
    p.set_defaults(func=cmd_counterfactual)
    p = sub.add_parser("atlas", help="the PCA plane of a `route --dataset` export and how its labels separate")
    p.add_argument("routes", metavar="DIR", help="a folder written by `route --dataset … --out DIR`")
    p.add_argument("--kind", choices=["mean", "full"], default="mean",
                   help="mean: layer-mean α and β; full: every layer's α·β")
    p.add_argument("--csv", default=None, help="write id, x, y, label per row")
    p.set_defaults(func=cmd_atlas)
    # Subcommands with their own parsers, imported only when called.
    delegated = {"train-expert": "atmoe.train.expert", "train-router": "atmoe.train.router"}
    summaries = {"train-expert": "train one LoRA expert (PEFT adapter) on a JSONL file",
                 "train-router": "train a grouped router over a manifest's experts"}
    for name, module in delegated.items():
        sub.add_parser(name, help=f"{summaries[name]}; see `{prog} {name} --help` ({module})", add_help=False)
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        if argv and argv[0] in delegated:
            import importlib
            importlib.import_module(delegated[argv[0]]).main(argv[1:])
            return 0
        a = parser.parse_args(argv)
        a.func(a)
        return 0
    except (ValueError, OSError) as e:  # LoadError, BaseModelError, DataError are ValueErrors
        print(f"{prog}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
