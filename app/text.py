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


def word_diff(old: str, new: str) -> tuple[str, str, float]:
    """Side-by-side word diff as Markdown: removed words struck through on an orange background in `old`, added words
    bold on a blue background in `new` (colour-blind-safe pair, plus non-colour cues). Returns (old_md, new_md, ratio)."""
    a, b = old.split(), new.split()
    sm = difflib.SequenceMatcher(a=a, b=b, autojunk=False)
    left: list[str] = []
    right: list[str] = []
    for op, i1, i2, j1, j2 in sm.get_opcodes():
        if op == "equal":
            left.append(" ".join(_word(w) for w in a[i1:i2]))
            right.append(" ".join(_word(w) for w in b[j1:j2]))
            continue
        if i2 > i1:
            left.append(":orange-background[~~" + " ".join(_word(w) for w in a[i1:i2]) + "~~]")
        if j2 > j1:
            right.append(":blue-background[**" + " ".join(_word(w) for w in b[j1:j2]) + "**]")
    return " ".join(left) or "_(empty)_", " ".join(right) or "_(empty)_", sm.ratio()
