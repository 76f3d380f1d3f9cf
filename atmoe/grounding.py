"""The values an answer writes that its prompt does not hold.

A routed answer may be incomplete; in a clinical note it must never carry a number the note does not. This is the
mechanical half of that check, the same everywhere: the dashboard runs it on every answer, and the demo's
never-invented measurement (`demo/abstention.py`) adds the suite's measurement names on top.

    numbers("Hb 1.2-1.7, SpO2 96")            ["1.2", "1.7", "96"]   (the 2 of SpO2 is part of a word)
    unsupported_values(answer, prompt, note)  the answer's values that neither source writes ("10" = "10.0")
"""

from __future__ import annotations

import re

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
