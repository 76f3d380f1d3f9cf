"""Safe text rendering: Markdown-escaped user/model text and a word-level diff as Streamlit Markdown.

Nothing here produces HTML: model answers and prompts are user-controlled, so they only ever reach the page as escaped
Markdown (Streamlit renders Markdown without raw HTML unless `unsafe_allow_html`, which this app never sets).
"""

from __future__ import annotations

import difflib
import re

# Every ASCII punctuation character may be backslash-escaped in CommonMark; escape all that Markdown, Streamlit's
# colour/emoji directives (`:red[…]`, `:smile:`) or LaTeX (`$`) could interpret.
_SPECIAL = re.compile(r"([\\`*_{}\[\]()#+\-.!|~<>$:&=\"'^@%])")


def md_escape(text: str) -> str:
    """Literal text as Markdown: punctuation escaped, newlines kept as hard line breaks."""
    escaped = _SPECIAL.sub(r"\\\1", text)
    return "  \n".join(escaped.split("\n"))


def _word(text: str) -> str:
    return md_escape(text).replace("  \n", " ↵ ")


def _words(text: str) -> list[str]:
    """The words of `text`, each line break kept as a word of its own ("\n") so that the diff keeps the lines."""
    return re.findall(r"\n|[^\s]+", text)


def _lines(words: list[str], mark: str = "") -> str:
    """Words as Markdown, line breaks as hard breaks; `mark` ("~~" or "**") puts each line's part of a changed run in
    its coloured span (a directive cannot span a line break)."""
    lines: list[list[str]] = [[]]
    for w in words:
        if w == "\n":
            lines.append([])
        else:
            lines[-1].append(_word(w))
    parts = [" ".join(line) for line in lines]
    if mark:
        span = {"~~": ":orange-background[~~{}~~]", "**": ":blue-background[**{}**]"}[mark]
        parts = [span.format(p) if p else p for p in parts]
    return "  \n".join(parts)


def word_diff(old: str, new: str) -> tuple[str, str, float]:
    """Side-by-side word diff as Markdown: removed words struck through on an orange background in `old`, added words
    bold on a blue background in `new` (colour-blind-safe pair, plus non-colour cues); line breaks kept. Returns
    (old_md, new_md, ratio)."""
    a, b = _words(old), _words(new)
    sm = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
    left: list[str] = []
    right: list[str] = []
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        if op == "equal":
            left.append(_lines(a[i1:i2]))
            right.append(_lines(b[j1:j2]))
            continue
        if i2 > i1:
            left.append(_lines(a[i1:i2], "~~"))
        if j2 > j1:
            right.append(_lines(b[j1:j2], "**"))
    return " ".join(left).strip() or "_(empty)_", " ".join(right).strip() or "_(empty)_", sm.ratio()
