"""The deciding comparison (issue 24): the shipped router against the same experts routed without its layer dimension
and without a router, on enough held-out rows that each paired 95 % interval can decide.

    python -m demo.decide [--manifest assets/coadapted/experts.json] [--n 512] [--out runs/decide/shipped.json]
    python -m demo.decide --manifest <flat model> --systems shipped --against runs/decide/shipped.json ...
    python -m demo.decide --pair runs/v5/decide_heldout.json runs/decide/shipped.json    (two stored reports, paired)
    python -m demo.decide --pair A_heldout.json,A_fresh.json B_heldout.json,B_fresh.json   (sets pooled)
    python -m demo.decide --pair A.json B.json --skills 2          (only the rows that need two experts)
    python -m demo.decide --pair A.json B.json --let-in assets/coadapted/experts.json   (only rows its head lets in)
    python -m demo.decide --check-stored assets/eval/results.json      (how far the shortcut below agrees with greedy)
    python -m demo.decide --n 576 --write-rows runs/facts576/heldout.jsonl   (the rows, for `demo.evaluate --data`)

Score: *fully right*, the answer token for token equal to the reference. It is decided without generating: greedy
decoding writes the reference, then stops, exactly when — reading prompt + reference + EOS in one forward — the argmax
after every prefix is the reference's next token and the last one is an end token. Sequence routing reads only the
prompt, and a causal model's logits at a prefix do not depend on what follows it, so that one forward is what greedy
decoding would compute step by step (up to the rounding of a prefill against a cached decode, measured with
`--check-stored` against the stored greedy answers). One forward a row instead of one a token is what makes 512 rows ×
3 systems a few minutes on a CPU. It is stricter than the table's `exact` (which forgives case and spaces).

Systems, all on the manifest's experts:
    shipped           its router as it is
    layer_constant    the router's α and β for the row, averaged over layers and fixed on every layer
    uniform           every expert at 1/E on every layer (an untrained flat router)
The flat-router variant is another model (`config.COADAPTED`: its own co-adapted experts): `--manifest` it and run it
on the same rows (same `--n`, same seed); `--against <report>` then pairs the two reports row by row.

Rows: `complex_rows(n, seed=DECIDE_SEED, heldout=True)`: held-out phrasings of every complex combination, each
combination equally often, notes never drawn for `assets/data/eval.jsonl` (another seed). `--wordings fresh` asks the
same rows (same notes and combinations) in `suite.FRESH_PHRASES`, a held-out set never read while diagnosing;
`--wordings blind` asks other rows (6 wordings per skill draw other notes) in `suite.BLIND_PHRASES`, written by a
writer outside the project that saw no other wording.

Two intervals per difference. `ci95` resamples the rows: how sure the difference is on *these* wordings. The rows
share 24 wordings (4 per skill), so `ci95_wordings` resamples the wordings too (`wording_ci`): how sure it is for a
user's wordings like these. A router change can win on one set of wordings and lose on another (docs/facts.md);
only the second interval allows for that.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from atmoe.load.files import atomic_write_json
from atmoe.model import ATMoE, forward_routed
from atmoe.tokens import encode_prompt, encode_text

from .abstention import kept_rows
from .evaluate import Row, bootstrap_ci, layer_constant
from .suite import WORDINGS, complex_rows, heldout_phrases, write_jsonl

DECIDE_SEED = 24        # not the table's seed (0): other notes, same held-out phrasings
SYSTEMS = ("shipped", "layer_constant", "uniform")


def held_out_rows(n: int, wordings: str = "heldout") -> list[Row]:
    return complex_rows(n, seed=DECIDE_SEED, heldout=True, wordings=wordings)


def _overrides(m: ATMoE, system: str, rows: list[Row]) -> tuple[Any, list[Any]]:
    """(router, overrides per row) of a system; "off:<group>" is the router with that group's experts disabled."""
    if system == "shipped":
        return m.router, [None] * len(rows)
    if system.startswith("off:"):
        from atmoe.overrides import Overrides
        return m.router, [Overrides(disabled=m.layout.experts_of(system[4:]))] * len(rows)
    if system == "uniform":
        from atmoe.model import new_router
        return new_router(m, mode="flat"), [None] * len(rows)
    traces = m.route_batch([r["instruction"] for r in rows], inputs=[r["input"] for r in rows])
    return m.router, [layer_constant(t) for t in traces]


@torch.inference_mode()
def fully_right(m: ATMoE, rows: list[Row], system: str, batch_size: int = 8,
                answers: list[list[int]] | None = None, eos: list[int] | None = None) -> np.ndarray:
    """[n] bool: would greedy decoding write each row's reference exactly (then stop)? See the module docstring.
    `answers`: token ids to check instead of the references as training tokenizes them; `eos`: the end tokens
    (default: the model's, as `ATMoE.generate` stops)."""
    if answers is None:
        answers = [encode_text(m.tokenizer, r["output"]) for r in rows]
    eos = eos or end_tokens(m)
    out = np.zeros(len(rows), dtype=bool)
    for s in range(0, len(rows), batch_size):
        chunk = rows[s:s + batch_size]
        router, overrides = _overrides(m, system, chunk)
        for key in {json.dumps(o and o.to_dict(), sort_keys=True) for o in overrides}:   # rows sharing overrides
            idx = [i for i, o in enumerate(overrides) if json.dumps(o and o.to_dict(), sort_keys=True) == key]
            out[[s + i for i in idx]] = _check(m, [chunk[i] for i in idx], [answers[s + i] for i in idx], router,
                                               overrides[idx[0]], eos)
    return out


def _check(m: ATMoE, rows: list[Row], answer_ids: list[list[int]], router: Any, overrides: Any, eos: list[int]
           ) -> np.ndarray:
    prompts = [encode_prompt(m.tokenizer, r["instruction"], r["input"]) for r in rows]
    answers = [list(a) + [eos[0]] for a in answer_ids]
    width = max(len(p.ids) + len(a) for p, a in zip(prompts, answers))
    B = len(rows)
    ids = torch.zeros((B, width), dtype=torch.long)
    mask, prompt_mask, instruction = (torch.zeros((B, width), dtype=torch.long) for _ in range(3))
    for b, (p, a) in enumerate(zip(prompts, answers)):       # left-padded, as generation pads prompts
        left = width - len(p.ids) - len(a)
        ids[b, left:] = torch.tensor(p.ids + a)
        mask[b, left:] = 1
        prompt_mask[b, left:left + len(p.ids)] = 1
        instruction[b, left + p.instruction[0]:left + p.instruction[1]] = 1
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    dev = m.device
    keep = max(len(a) for a in answers) + 1       # left-padded: every answer (and the prefix before it) is at the end
    out, _ = forward_routed(m, ids.to(dev), mask.to(dev), prompt_mask.to(dev), instruction_mask=instruction.to(dev),
                            overrides=overrides, router=router, position_ids=position_ids.to(dev), use_cache=False,
                            logits_to_keep=keep)
    pred = out.logits.argmax(-1).cpu()                                  # [B, keep]: the token after each prefix
    right = np.zeros(B, dtype=bool)
    for b, a in enumerate(answers):
        n = len(a)
        got = pred[b, keep - n - 1:keep - 1].tolist()                  # predictions for each answer token
        right[b] = got[:-1] == a[:-1] and got[-1] in eos
    return right


def end_tokens(m: ATMoE) -> list[int]:
    configured = getattr(m.model.generation_config, "eos_token_id", None)
    configured = [] if configured is None else list(configured) if isinstance(configured, (list, tuple)) else [configured]
    return sorted({e for e in [m.tokenizer.eos_token_id, *configured] if e is not None})


def wording_ids(rows: list[Row], wordings: str = "heldout") -> list[list[tuple[str, int]]]:
    """Per row, (skill, index of its held-out wording) for each sentence the row's instruction is made of."""
    asked = heldout_phrases(wordings)
    out = []
    for r in rows:
        ids = [(e, i) for e in r["experts"] for i, p in enumerate(asked[e]) if p in r["instruction"]]
        if len(ids) != len(r["experts"]):
            raise ValueError(f"row {r['instruction']!r} is not made of one {wordings} wording per skill")
        out.append(ids)
    return out


def wording_ci(d: np.ndarray, ids: list[list[tuple[str, int]]], resamples: int = 2000, seed: int = 0
               ) -> tuple[float, float]:
    """95 % interval of the mean of `d` when the *wordings* are the sample: each replicate draws every skill's
    wordings with replacement and weighs a row by the product of its wordings' draw counts (Owen's pigeonhole
    bootstrap for crossed factors). Rows that share a wording are not independent evidence about a new wording; the
    row bootstrap treats them as if they were."""
    rng = np.random.default_rng(seed)
    weights = np.ones((resamples, len(ids)))
    for e in sorted({e for row in ids for e, _ in row}):
        col = np.array([next((i for f, i in row if f == e), -1) for row in ids])   # the row's wording of e, or -1
        k = col.max() + 1
        draws = rng.integers(0, k, (resamples, k))
        counts = (draws[:, :, None] == np.arange(k)).sum(1)                          # [resamples, k] draw counts
        weights *= np.where(col >= 0, counts[:, col.clip(min=0)], 1)
    total = weights.sum(1)
    means = (weights @ d.astype(float))[total > 0] / total[total > 0]
    lo, hi = np.percentile(means, [2.5, 97.5])
    return float(lo), float(hi)


def paired(a: np.ndarray, b: np.ndarray, ids: list[list[tuple[str, int]]] | None = None) -> dict[str, Any]:
    """shipped − other, with the row bootstrap's interval and, given the rows' wordings, the wording bootstrap's."""
    d = a.astype(float) - b.astype(float)
    lo, hi = bootstrap_ci(d)
    out = {"diff": float(d.mean()), "ci95": [lo, hi], "width": hi - lo, "n": int(d.size)}
    if ids is not None:
        wlo, whi = wording_ci(d, ids)
        out |= {"ci95_wordings": [wlo, whi], "width_wordings": whi - wlo}
    return out


def decide(manifest: str, n: int, device: str = "auto", systems: tuple[str, ...] = SYSTEMS,
           wordings: str = "heldout") -> dict[str, Any]:
    t0 = time.perf_counter()
    m = ATMoE.load(manifest, device=device)
    rows = held_out_rows(n, wordings)
    right = {s: fully_right(m, rows, s) for s in systems}
    ids = wording_ids(rows, wordings)
    kept = kept_rows(m, rows)
    return {"manifest": manifest, "n": n, "seed": DECIDE_SEED, "wordings": wordings,
            "score": "fully right (token-exact, greedy)",
            "kept_out": int(sum(kept)),      # rows the router's stay-out head keeps out (every expert weight 0)
            "fully_right": {s: float(v.mean()) for s, v in right.items()},
            "shipped_minus": {s: paired(right["shipped"], right[s], ids) for s in systems[1:]},
            "rows": {s: v.astype(int).tolist() for s, v in right.items()},
            "seconds": round(time.perf_counter() - t0, 1)}


def check_stored(results: str, manifest: str, device: str = "auto") -> dict[str, Any]:
    """The shortcut against real greedy answers: the table's stored answers of its shipped system and its layer-constant
    system (`coadapted:router_constant`) on the table's rows, text equal to the reference vs `fully_right`."""
    from .evaluate import read_rows

    table = json.loads(Path(results).read_text(encoding="utf-8"))
    rows = read_rows(Path(__file__).resolve().parents[1] / "assets" / "data" / "eval.jsonl")[:table["n"]]
    m = ATMoE.load(manifest, device=device)
    out = {}
    for system, stored in (("shipped", table["shipped"]), ("layer_constant", "coadapted:router_constant")):
        greedy = np.array([t.strip() == r["output"].strip() for t, r in zip(table["answers"][stored], rows)])
        forced = fully_right(m, rows, system)
        out[system] = {"n": len(rows), "greedy_exact": int(greedy.sum()), "shortcut": int(forced.sum()),
                       "agree": int((greedy == forced).sum())}
    return out


def _read_report(path: str) -> dict[str, Any]:
    report = json.loads(Path(path).read_text(encoding="utf-8"))
    missing = [k for k in ("manifest", "n", "seed", "rows") if k not in report]
    if missing or "shipped" not in report["rows"]:
        raise ValueError(f"{path} is not a demo.decide report (it lacks {', '.join(missing) or 'rows.shipped'})")
    return report


def _paired_rows(report: dict[str, Any], other: dict[str, Any], name: str, skills: int | None = None,
                 let_in: ATMoE | None = None) -> tuple[np.ndarray, np.ndarray, list[list[tuple[str, int]]]]:
    """Both shipped columns and the rows' wordings (only the rows needing `skills` experts, and only those the
    stay-out head of `let_in` lets in, when given): both reports must have run the same rows."""
    key = ("n", "seed", "wordings")
    if tuple(other.get(k, "heldout") for k in key) != tuple(report.get(k, "heldout") for k in key):
        raise ValueError(f"{name} ran other rows (n {other['n']}, seed {other['seed']}, wordings "
                         f"{other.get('wordings', 'heldout')})")
    wordings = report.get("wordings", "heldout")
    rows = complex_rows(report["n"], seed=report["seed"], heldout=True, wordings=wordings)
    out = kept_rows(let_in, rows) if let_in is not None else [False] * len(rows)
    keep = [i for i, r in enumerate(rows) if (skills is None or len(r["experts"]) == skills) and not out[i]]
    ids = wording_ids(rows, wordings)
    return (np.array(report["rows"]["shipped"])[keep], np.array(other["rows"]["shipped"])[keep],
            [ids[i] for i in keep])


def pair_reports(report: dict[str, Any], other: dict[str, Any], name: str) -> dict[str, Any]:
    """`report`'s shipped column − `other`'s, row by row: both must have run the same rows."""
    return pool_reports([(report, other, name)])


def pool_reports(pairs: list[tuple[dict[str, Any], dict[str, Any], str]], skills: int | None = None,
                 let_in: ATMoE | None = None) -> dict[str, Any]:
    """The same difference over several sets of rows at once (e.g. the three held-out wordings), each (report,
    other, other's name) paired row by row; the wording interval draws a skill's wordings from all the sets'.
    `skills`: only the rows that need that many experts (2 or 3); `let_in`: only the rows that model's stay-out
    head lets in (to compare routers where only one of the two models has a head)."""
    sets = [r.get("wordings", "heldout") for r, _, _ in pairs]
    if len(set(sets)) != len(sets):
        raise ValueError(f"pooled reports must each ask other wordings, got {', '.join(sets)}")
    a, b, ids, offset = [], [], [], dict.fromkeys(heldout_phrases(sets[0]), 0)
    for pair, wordings in zip(pairs, sets):
        x, y, i = _paired_rows(*pair, skills=skills, let_in=let_in)
        a.append(x)
        b.append(y)
        ids += [[(e, k + offset[e]) for e, k in row] for row in i]      # wording k of this set, after the others'
        offset = {e: offset[e] + len(p) for e, p in heldout_phrases(wordings).items()}
    return paired(np.concatenate(a), np.concatenate(b), ids)


def summary(report: dict[str, Any]) -> str:
    lines = [f"n = {report['n']} held-out rows (seed {report['seed']}, {report.get('wordings', 'heldout')} wordings), "
             f"{report['score']}, {report['seconds']:.0f} s; "
             f"kept out by the stay-out head: {report.get('kept_out', 0)}"]
    lines += [f"  {s}: {v:.3f}" for s, v in report["fully_right"].items()]
    lines += [f"  shipped − {s}: {d['diff']:+.3f} [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}] (width {d['width']:.3f}; "
              f"wordings resampled: [{d['ci95_wordings'][0]:+.3f}, {d['ci95_wordings'][1]:+.3f}])"
              for s, d in report["shipped_minus"].items()]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--manifest", default="assets/coadapted/experts.json")
    p.add_argument("--n", type=int, default=512)
    p.add_argument("--out", default="runs/decide/shipped.json")
    p.add_argument("--against", default="", help="another model's report on the same rows: pair its shipped column")
    p.add_argument("--pair", nargs=2, default=None, metavar="REPORTS",
                   help="pair two stored reports' shipped columns (same rows), print both intervals, run nothing; "
                        "comma-separated lists (A1,A2 B1,B2) pool several sets of rows, paired by position")
    p.add_argument("--check-stored", default="", metavar="RESULTS", help="compare the shortcut with stored answers")
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help="comma-separated, shipped first (another model paired with --against needs only shipped)")
    p.add_argument("--wordings", choices=WORDINGS, default="heldout",
                   help="the suite's held-out phrasings, the fresh ones (`suite.FRESH_PHRASES`, never diagnosed) "
                        "or the blind writer's (`suite.BLIND_PHRASES`)")
    p.add_argument("--skills", type=int, choices=(2, 3), default=None,
                   help="with --pair: only the rows that need this many experts")
    p.add_argument("--let-in", default="", metavar="MANIFEST",
                   help="with --pair: only the rows this model's stay-out head lets in (a routing pass)")
    p.add_argument("--write-rows", default="", metavar="JSONL",
                   help="write the --n held-out rows of --wordings here (for `demo.evaluate --data`), run nothing")
    p.add_argument("--device", default="auto")
    a = p.parse_args(argv)
    try:
        if a.n < 1:
            raise ValueError(f"--n must be >= 1, got {a.n}")
        systems = tuple(s for s in a.systems.split(",") if s)
        if not systems or systems[0] != "shipped" or set(systems) - set(SYSTEMS):
            raise ValueError(f"--systems must start with shipped and name only {', '.join(SYSTEMS)}, got {a.systems!r}")
        if a.write_rows:
            write_jsonl(Path(a.write_rows), held_out_rows(a.n, a.wordings))
            print(f"{a.n} held-out rows ({a.wordings} wordings, seed {DECIDE_SEED}) in {a.write_rows}")
            return
        if a.check_stored:
            print(json.dumps(check_stored(a.check_stored, a.manifest, a.device), indent=1))
            return
        if a.pair:
            firsts, seconds = (a.pair[0].split(","), a.pair[1].split(","))
            if len(firsts) != len(seconds):
                raise ValueError(f"--pair needs as many reports on each side, got {len(firsts)} and {len(seconds)}")
            pairs = [(_read_report(f), _read_report(g), g) for f, g in zip(firsts, seconds)]
            d = pool_reports(pairs, a.skills, ATMoE.load(a.let_in, device=a.device) if a.let_in else None)
            first, second = pairs[0][0], pairs[0][1]
            sets = ", ".join(r.get("wordings", "heldout") for r, _, _ in pairs)
            which = f"{d['n']} rows" + (f" needing {a.skills} experts" if a.skills else "") + \
                (f" let in by {a.let_in}'s stay-out head" if a.let_in else "")
            print(f"{first['manifest']} − {second['manifest']} ({which}, {sets} "
                  f"wordings): {d['diff']:+.3f}, rows resampled [{d['ci95'][0]:+.3f}, {d['ci95'][1]:+.3f}], wordings "
                  f"resampled [{d['ci95_wordings'][0]:+.3f}, {d['ci95_wordings'][1]:+.3f}]")
            return
        report = decide(a.manifest, a.n, a.device, systems, a.wordings)
        if a.against:
            report["shipped_minus"]["against"] = pair_reports(report, _read_report(a.against), a.against)
            report["against"] = a.against
    except (ValueError, OSError) as e:
        raise SystemExit(f"error: {e}") from None
    atomic_write_json(Path(a.out), report)
    print(summary(report))


if __name__ == "__main__":
    main()
