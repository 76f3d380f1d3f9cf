"""The values an answer writes that its prompt does not hold.

A routed answer may be incomplete; in a clinical note it must never carry a number the note does not. This is the
mechanical half of that check, the same everywhere: the dashboard runs it on every answer, and the demo's
never-invented measurement (`demo/abstention.py`) runs it with the suite's measurement names.

    numbers("Hb 1.2-1.7, SpO2 96")            ["1.2", "1.7", "96"]   (the 2 of SpO2 is part of a word)
    unsupported_values(answer, prompt, note)  the answer's values that neither source writes ("10" = "10.0")
    unsupported_measurements(answer, declared, prompt, note)
                                              the declared measurements it writes a value for that neither source
                                              names ("creatinine 10" where the note has no creatinine)

The check finds an invented value after the fact; `NumberGuard` makes one impossible while decoding
(`GenerationSettings(grounded=True)`): a token is only allowed when every value the answer then writes is one its
sources write, by the same definition of a value, and (given the manifest's declared measurements) none right after
the name of a measurement its sources do not name: a note's "10 mg" cannot become "creatinine 10". A measurement may
still be mentioned without a value ("metformin lowers blood sugar" explains a drug; it measures nothing).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

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


def unsupported_measurements(answer: str, declared: Sequence[Sequence[str]], *sources: str) -> list[str]:
    """Of the `declared` measurements (each as its names: ("Glu", "blood sugar")), the ones `answer` writes a value
    for (`labelled`) that no source names by any of their names: each once, by the name the answer uses."""
    source = "\n".join(sources)
    return list(dict.fromkeys(hit for names in declared if not Reference.pattern(names).search(source)
                              for hit in labelled(answer, labelling(names))))


def labelling(names: Sequence[str]) -> re.Pattern[str]:
    """A text that ends with one of `names` (group 1; as `Reference.pattern`) and what may stand between a
    measurement's name and its value on one line: spaces, punctuation, "of", "is", "was", "at", "around", "about"
    ("creatinine: 10", "heart rate of 88", "Blood sugar was 120")."""
    return re.compile(f"({Reference.pattern(names).pattern})"
                      r"(?:[^\w\n]+(?i:of|is|was|were|at|around|about)(?!\w))*[^\w\n]*\Z")


def labelled(text: str, label: re.Pattern[str] | None) -> list[str]:
    """The names `label` (`labelling`) finds right before a value of `text` (a value as `numbers` reads it)."""
    if label is None:
        return []
    text = _ORDINAL.sub(" ", text)
    return [h.group(1) for m in _NUMBER.finditer(text) if (h := label.search(text, 0, m.start()))]


# ---------------------------------------------------------------- grounded decoding
@dataclass(frozen=True)
class Reference:
    """Values a skill writes that no prompt holds (a manifest expert's `values`, e.g. a reference range). With
    `names`, only on a line that already names one of them: a measurement's range belongs after that measurement,
    not after another's. Without, on any line. Names match as whole words; one in lower case in any case, one with a
    capital as written ("T", "Ca": not "t" or "ca")."""

    values: tuple[str, ...]
    names: tuple[str, ...] = ()

    @staticmethod
    def pattern(names: Sequence[str]) -> re.Pattern[str]:
        """Any of `names`, as a whole word, each with its case rule."""
        alternatives = "|".join(f"(?i:{re.escape(n)})" if n == n.lower() else re.escape(n)
                                for n in sorted(names, key=len, reverse=True))
        return re.compile(rf"(?<!\w)(?:{alternatives})(?!\w)")


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

    `mask(logits, left)` sets to -inf every token after which the answer would write a value no source holds (a
    named reference value: on a line without its name), or could not finish the value it is writing within the
    `left` tokens it may still write (the end of the answer included: cut by its length, it never stops half-way
    through "12" of "120"); `advance(tokens)` records the chosen ones. Decoding stays greedy or sampled over what is
    left. A list ordinal ("1. ") is not a value, as in `numbers`; one may start at a line's beginning while there are
    tokens left to finish it.

    `measurements`: the declared measurements, each as its names (("Cr", "creatinine"), …). Where a row's source
    names none of one's names, no value may follow that name (`labelling`): "creatinine 10" cannot be written from a
    note's "lisinopril 10 mg", while "metformin lowers blood sugar" can."""

    def __init__(self, vocab: DigitVocab, sources: Sequence[str], end_ids: Sequence[int] = (),
                 later: Callable[[], Sequence[Sequence[Reference]]] | None = None,
                 measurements: Sequence[Sequence[str]] = ()) -> None:
        self.vocab, self.end_ids = vocab, list(end_ids)
        self.rows = [{"known": set(), "need": {}, "named": {}, "names": None, "line": ""} for _ in sources]
        for b, source in enumerate(sources):
            self.allow(b, numbers(source))
            unnamed = [n for names in measurements if not Reference.pattern(names).search(source) for n in names]
            self.rows[b]["label"] = labelling(unnamed) if unnamed else None
        self._later = later   # per row, more values, asked once at the first `mask` (e.g. once the prompt routed)

    def allow(self, row: int, values: Sequence[str], names: Sequence[str] = ()) -> None:
        """Row `row` may also write `values` (as spelled: "12" allows 12 and its prefix "1", "12.0" is another);
        with `names`, only on a line naming one of them (`Reference`)."""
        r = self.rows[row]
        known, need = (r["known"], r["need"]) if not names else (set(), {})
        for n in names:   # a name in lower case is looked up folded ("Heart rate" → "heart rate"), one with a capital as is
            r["named"].setdefault((n == n.lower(), n), []).append((known, need))
        if names:
            r["names"] = Reference.pattern([n for _, n in r["named"]])
        for sp in values:
            known.add(canonical(sp))
            for k in range(1, len(sp) + 1):   # a value's beginning → the characters left to finish it
                need[sp[:k]] = min(need.get(sp[:k], len(sp)), len(sp) - k)

    @staticmethod
    def _scope(row: dict, line: str) -> tuple[set[str], list[dict[str, int]]]:
        """The values `line` may write (canonical), and per source of them, the characters that finish a prefix.
        One scan of the line for every name (a name a longer one overlaps is missed: stricter, never looser)."""
        hits = {m.group() for m in row["names"].finditer(line)} if row["named"] else ()
        named = [x for h in hits for key in ((False, h), (True, h.lower())) for x in row["named"].get(key, ())]
        if not named:
            return row["known"], [row["need"]]
        return row["known"].union(*(k for k, _ in named)), [row["need"], *(n for _, n in named)]

    def _grounded(self, row: dict, text: str, remaining: int) -> bool:
        """Whether the row's answer, once its current line continues with `text`, writes only known values, with
        `remaining` tokens still to come (0: it ends here) to finish a value the last line is writing."""
        *done, last = text.split("\n")
        for line in done:
            values = numbers(line + "\n")
            if values and (not {canonical(v) for v in values} <= self._scope(row, line)[0]
                           or labelled(line + "\n", row["label"])):
                return False
        if labelled(last, row["label"]):       # a value begun right after a measurement the source does not name
            return False
        known, needs = self._scope(row, last)
        trailing = _TRAILING.search(last)
        if trailing is not None:
            value, last = trailing.group(), last[:trailing.start()]
            finishes = min(n.get(value, remaining + 1) for n in needs) <= remaining
            full_stop = value.endswith(".") and canonical(value[:-1]) in known          # "K 5." = "K 5"
            ordinal = not last.strip() and _MAYBE_ORDINAL.match(value) and remaining >= 2 - value.endswith(".")
            if not (finishes or full_stop or ordinal):
                return False
        return all(canonical(v) in known for v in numbers(last))

    def mask(self, logits: torch.Tensor, left: int = 1 << 30) -> torch.Tensor:
        """[B, V] logits → the same with every ungrounded token at -inf (in place); `left`: the tokens the answer
        may still write, this one included. Host work is a few string checks per digit token; the device sees one
        fill per row, over the vocabulary only while a value must go on."""
        if self._later is not None:
            for b, references in enumerate(self._later()):
                for ref in references:
                    self.allow(b, ref.values, ref.names)
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
