"""Host cost of grounded decoding per step (docs/usage.md): `NumberGuard.mask` on the embedded tokenizer's vocabulary,
with the demo's reference ranges declared per measurement (named) and the same values on any line (unnamed); then
with the measurements' names guarded too (the note names 4 of the 13: the other 9 may not be named), on a line about
to write a range, at a line's start (every token that opens a name is a candidate) and after "- blood" (one that
finishes "blood sugar" is).

    python -m bench.grounding [--steps 200]
"""

from __future__ import annotations

import argparse
import time

import torch

from atmoe.grounding import DigitVocab, NumberGuard, Reference
from atmoe.load.base import load_base
from demo.suite import EXPERT_VALUES

SOURCE = "List the vitals with normal ranges.\n70 yo M with fever.\nVitals: HR 41, SBP 150, T 39.1.\nLabs: Plt 120."
LINE = "heart rate 41 (normal "     # a range about to be written: every digit token is checked


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=200)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    _, tok = load_base(None, device="cpu")
    vocab = DigitVocab(tok)
    named = [Reference(tuple(r["values"]), tuple(r["names"])) for r in EXPERT_VALUES["ranges"]]
    unnamed = [Reference(tuple(v for r in named for v in r.values))]
    logits = torch.zeros(1, len(tok))
    print(f"{len(vocab.texts)} digit tokens of {len(tok)}")
    measurements = [r.names for r in named]
    cases = [("unnamed", unnamed, (), LINE), ("named", named, (), LINE),
             ("named + names guarded", named, measurements, LINE),
             ("named + names guarded, line start", named, measurements, ""),
             ("named + names guarded, after '- blood'", named, measurements, "- blood")]
    for name, refs, guarded, line in cases:
        guard = NumberGuard(vocab, [SOURCE], later=lambda refs=refs: [refs], measurements=guarded)
        for t in tok.encode(line):      # one token a step, of the batch's one row
            guard.advance([t])
        assert guard.rows[0]["line"] == line
        guard.mask(logits.clone(), 50)
        start = time.perf_counter()
        for _ in range(a.steps):
            guard.mask(logits.clone(), 50)
        print(f"{name}: {(time.perf_counter() - start) / a.steps * 1e3:.2f} ms a step")


if __name__ == "__main__":
    main()
