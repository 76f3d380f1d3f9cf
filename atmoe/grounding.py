"""The values an answer writes that its prompt does not hold.

A routed answer may be incomplete; in a clinical note it must never carry a number the note does not. This is the
mechanical half of that check, the same everywhere: the dashboard runs it on every answer, and the demo's
never-invented measurement (`demo/abstention.py`) adds the suite's measurement names on top.

    numbers("Hb 1.2-1.7, SpO2 96")            ["1.2", "1.7", "96"]   (the 2 of SpO2 is part of a word)
    unsupported_values(answer, prompt, note)  the answer's values that neither source writes ("10" = "10.0")

The check finds an invented value after the fact; `NumberGuard` makes one impossible while decoding
(`GenerationSettings(grounded=True)`): a token is only allowed when every value the answer then writes is one its
sources write, by the same definition of a value.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence

import torch

# A number as written: not part of a word (SpO2, B12), of a longer number, nor of a dotted outline or version
# ("1.1.1", "2.13.0" are labels, not values); "1.2-1.7" gives 1.2 and 1.7.
_NUMBER = re.compile(r"(?<![A-Za-z0-9.])\d+(?:\.\d+)?(?![0-9])(?!\.\d)")
_ORDINAL = re.compile(r"^\s*\d+[.)]\s", re.M)     # "1. " / "2) " list markers are not values


def numbers(text: str) -> list[str]:
    """Every value written in `text`, as written (list ordinals at the start of a line left out)."""
    return _NUMBER.findall(_ORDINAL.sub(" ", text))


def canonical(value: str) -> str:
    """A value as compared: "10" and "10.0" are the same value, "10.1" is another."""
    return repr(float(value))


def unsupported_values(answer: str, *sources: str) -> list[str]:
    """The values of `answer` that none of `sources` writes, each once, in the answer's order."""
    known = {canonical(v) for s in sources for v in numbers(s)}
    return list(dict.fromkeys(v for v in numbers(answer) if canonical(v) not in known))


# ---------------------------------------------------------------- grounded decoding
_TRAILING = re.compile(r"(?<![A-Za-z0-9.])\d+(?:\.\d*)?$")     # a value still being written at the end of a line
_MAYBE_ORDINAL = re.compile(r"^\s*\d{1,3}\.?$")                 # "1" or "1." at a line start: may become "1. "


class DigitVocab:
    """What the guard needs of a vocabulary, computed once per tokenizer: each token's text, and which tokens can
    change the values a line writes (a digit, or a leading "." that may turn "10" into "10.5"). Every other token
    only ends a value, so one decision covers them all."""

    def __init__(self, tokenizer: object, size: int | None = None) -> None:
        size = size or len(tokenizer)                                         # type: ignore[arg-type]
        texts = tokenizer.batch_decode([[i] for i in range(size)],          # type: ignore[attr-defined]
                                       skip_special_tokens=True)
        self.special = [i for i, t in enumerate(texts) if re.search(r"\d", t) or t.startswith(".")]
        self.texts = {i: texts[i] for i in self.special}
        self.all_texts = texts
        self.ending = torch.ones(size, dtype=torch.bool)
        self.ending[self.special] = False
        # an ordinal ends with a space ("1. "), so after "1." an ending token is only as good as its first character
        self.ending_space = self.ending & torch.tensor([t[:1].isspace() for t in texts])
        self._blocked: dict[tuple[str, bool], torch.Tensor] = {}

    def on(self, device: torch.device, spaced: bool) -> torch.Tensor:
        """[V] bool, on `device` (copied once): the ending tokens a value in progress forbids — all of them, or
        (`spaced`: an ordinal "1." may end here) those that do not start with a space."""
        key = (str(device), spaced)
        if key not in self._blocked:
            self._blocked[key] = (self.ending & ~self.ending_space if spaced else self.ending).to(device)
        return self._blocked[key]


class NumberGuard:
    """Per row of a batch: the values its source writes (the prompt as the user gave it), those `allow` adds (`later`
    adds per row at the first step: `ATMoE` gives the reference values of the experts the routing engaged), the
    answer's current line, and which next tokens keep the answer grounded.

    `mask(logits, left)` sets to -inf every token after which the answer would write a value no source holds, or
    could not finish the value it is writing within the `left` tokens it may still write (the end of the answer
    included: cut by its length, it never stops half-way through "12" of "120"); `advance(tokens)` records the
    chosen ones. Decoding stays greedy or sampled over what is left. A list ordinal ("1. ") is not a value, as in
    `numbers`; one may start at a line's beginning while there are tokens left to finish it."""

    def __init__(self, vocab: DigitVocab, sources: Sequence[str], end_ids: Sequence[int] = (),
                 later: Callable[[], Sequence[Sequence[str]]] | None = None) -> None:
        self.vocab, self.end_ids = vocab, list(end_ids)
        self.rows = [{"known": set(), "need": {}, "line": ""} for _ in sources]
        for b, source in enumerate(sources):
            self.allow(b, numbers(source))
        self._later = later   # per row, more values, asked once at the first `mask` (e.g. once the prompt routed)

    def allow(self, row: int, values: Sequence[str]) -> None:
        """Row `row` may also write `values` (as spelled: "12" allows 12 and its prefix "1", "12.0" is another)."""
        r = self.rows[row]
        for sp in values:
            r["known"].add(canonical(sp))
            for k in range(1, len(sp) + 1):   # a value's beginning → the characters left to finish it
                r["need"][sp[:k]] = min(r["need"].get(sp[:k], len(sp)), len(sp) - k)

    def _grounded(self, row: dict, text: str, remaining: int) -> bool:
        """Whether the row's answer, once its current line continues with `text`, writes only known values, with
        `remaining` tokens still to come (0: it ends here) to finish a value the last line is writing."""
        *done, last = text.split("\n")
        if any(canonical(v) not in row["known"] for line in done for v in numbers(line + "\n")):
            return False
        trailing = _TRAILING.search(last)
        if trailing is not None:
            value, last = trailing.group(), last[:trailing.start()]
            finishes = row["need"].get(value, remaining + 1) <= remaining
            full_stop = value.endswith(".") and canonical(value[:-1]) in row["known"]          # "K 5." = "K 5"
            ordinal = not last.strip() and _MAYBE_ORDINAL.match(value) and remaining >= 2 - value.endswith(".")
            if not (finishes or full_stop or ordinal):
                return False
        return all(canonical(v) in row["known"] for v in numbers(last))

    def mask(self, logits: torch.Tensor, left: int = 1 << 30) -> torch.Tensor:
        """[B, V] logits → the same with every ungrounded token at -inf (in place); `left`: the tokens the answer
        may still write, this one included. Host work is a few string checks per digit token; the device sees one
        fill per row, over the vocabulary only while a value must go on."""
        if self._later is not None:
            for b, values in enumerate(self._later()):
                self.allow(b, values)
            self._later = None
        V = logits.shape[1]
        for b, row in enumerate(self.rows):
            if not self._grounded(row, row["line"] + "x", left - 1):   # a value in progress must go on, not end
                spaced = self._grounded(row, row["line"] + " ", left - 1)
                logits[b].masked_fill_(self.vocab.on(logits.device, spaced)[:V], float("-inf"))
            ids = [i for i, piece in self.vocab.texts.items()
                   if i < V and not self._grounded(row, row["line"] + piece, left - 1)]
            if not self._grounded(row, row["line"], 0):
                ids += [e for e in self.end_ids if e < V]
            if ids:
                logits[b, torch.tensor(ids, device=logits.device)] = float("-inf")
        return logits

    def advance(self, tokens: Sequence[int]) -> None:
        for row, t in zip(self.rows, tokens):
            row["line"] = (row["line"] + self.vocab.all_texts[t]).rsplit("\n", 1)[-1]
