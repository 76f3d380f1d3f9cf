"""The counterfactual check of word attribution: does deleting the word that `ATMoE.explain` says contributes most to
the chosen group's logit lower that group's weight more than deleting a random word?

    frame, summary = counterfactual(m, [(instruction, note), ...], seed=0)

Per row: the chosen group is the one with the highest layer-mean gate α (`RoutingTrace.group_weights` [L, G], from
the explanation's own routed forward, which is `m.route`'s). Its top word is the argmax of
`Explanation.by_word("group:<g>")` (each word's contribution averaged over all layers). That word is deleted from
the instruction (its characters and the whitespace after it; the last word takes the whitespace before it), the
instruction re-routed (`m.route_batch`, no overrides) and the drop of g's layer-mean α recorded
(weight − weight after, positive: lowered). The same for one other word of the instruction drawn uniformly at
random (seeded, never the top word). Rows with fewer than two words cannot be compared and are left out.

The summary is the share of rows where the top word's drop is larger (ties are not wins), its 95 % Wilson interval,
and the mean drops. A property of the router, not an identity: the explanation is the direct effect at each layer
*given* the hidden states, deleting a word also changes every later hidden state and the RMS scale, so a low rate
would say the attribution does not predict the counterfactual.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd

from .attribution import wilson

if TYPE_CHECKING:
    from ..model import ATMoE

COLUMNS = ["row", "instruction", "group", "weight", "words", "top_word", "top_text", "top_contribution",
           "top_weight", "drop_top", "random_word", "random_text", "random_contribution", "random_weight",
           "drop_random", "top_wins"]


def word_spans(instruction: str) -> list[tuple[int, int]]:
    """(start, end) of each whitespace-separated word of `instruction`."""
    return [m.span() for m in re.finditer(r"\S+", instruction)]


def delete_word(instruction: str, index: int) -> str:
    """`instruction` without its word `index` (whitespace-separated) and the whitespace after it (the last word: the
    whitespace before it), every other character kept as it was."""
    spans = word_spans(instruction)
    if not 0 <= index < len(spans):
        raise ValueError(f"word {index} is not in 0..{len(spans) - 1}")
    start, end = spans[index]
    if index + 1 < len(spans):
        end = spans[index + 1][0]
    elif index > 0:
        start = spans[index - 1][1]
    return instruction[:start] + instruction[end:]


def _word_index(explained: list[str], instruction: str) -> list[int | None]:
    """Explanation word id → index among the instruction's whitespace-separated words (None: not one of them, e.g.
    a special token). The explanation's words are the instruction's, in order, when the router reads it."""
    words = [instruction[a:b] for a, b in word_spans(instruction)]
    out: list[int | None] = []
    j = 0
    for w in explained:
        if j < len(words) and w == words[j]:
            out.append(j)
            j += 1
        else:
            out.append(None)
    if j != len(words):
        raise ValueError(f"the explanation's words {explained} are not the instruction's {words}: the counterfactual "
                         "check needs a router that reads the instruction")
    return out


def counterfactual(m: ATMoE, rows: Sequence[tuple[str, str]], seed: int = 0,
                   progress: Callable[[int, int], None] | None = None) -> tuple[pd.DataFrame, dict[str, Any]]:
    """One line per row of (instruction, input) — see the module docstring and `COLUMNS` — and `summarize` of it."""
    rng = np.random.default_rng(seed)
    records = []
    for i, (instruction, input) in enumerate(rows):
        ex = m.explain(instruction, input)
        alpha = ex.trace.group_weights.mean(0)                              # [G] layer-mean α
        g = int(np.argmax(alpha))
        group = ex.trace.groups[g]
        contrib = ex.by_word(f"group:{group}")
        index = _word_index(ex.words, instruction)
        frame = contrib[[x is not None for x in index]].assign(index=[x for x in index if x is not None])
        if len(frame) < 2:
            continue
        top = frame.loc[frame.contribution.idxmax()]
        others = frame[frame.index != top.name]
        rand = others.iloc[int(rng.integers(len(others)))]
        after = m.route_batch([delete_word(instruction, int(top["index"])),
                               delete_word(instruction, int(rand["index"]))], inputs=[input, input])
        w_top, w_rand = (float(t.group_weights.mean(0)[g]) for t in after)
        records.append({"row": i, "instruction": instruction, "group": group, "weight": float(alpha[g]),
                        "words": len(frame), "top_word": int(top["index"]), "top_text": top.text,
                        "top_contribution": float(top.contribution), "top_weight": w_top,
                        "drop_top": float(alpha[g]) - w_top, "random_word": int(rand["index"]),
                        "random_text": rand.text, "random_contribution": float(rand.contribution),
                        "random_weight": w_rand, "drop_random": float(alpha[g]) - w_rand})
        records[-1]["top_wins"] = records[-1]["drop_top"] > records[-1]["drop_random"]
        if progress is not None:
            progress(i + 1, len(rows))
    frame = pd.DataFrame(records, columns=COLUMNS)
    return frame, summarize(frame)


def summarize(frame: pd.DataFrame) -> dict[str, Any]:
    """rows, wins (drop_top > drop_random), rate, its 95 % Wilson interval, mean drops."""
    n = len(frame)
    wins = int((frame["drop_top"] > frame["drop_random"]).sum()) if n else 0
    return {"rows": n, "wins": wins, "rate": wins / n if n else float("nan"), "interval": wilson(wins, n),
            "mean_drop_top": float(frame["drop_top"].mean()) if n else float("nan"),
            "mean_drop_random": float(frame["drop_random"].mean()) if n else float("nan")}


__all__ = ["counterfactual", "delete_word", "summarize", "word_spans"]
