"""Text and tokens: the prompt a user writes, rendered with the chat template, as token ids — and which of them spell
the instruction (what an AT-MoE router reads). Also the per-token labels the trace and the dashboard show.

User text is only ever text: a special-token string typed in it never becomes a special token.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any


def check_text(text: str, what: str) -> None:
    """Raise ValueError if `text` cannot be encoded (a lone surrogate, e.g. from a broken paste)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        raise ValueError(f"the {what} is not valid Unicode text (a lone surrogate at character {e.start})") from None


def token_labels(tokenizer: Any, ids: Sequence[int], window: int = 8) -> list[str]:
    """The text each token adds, for per-token views. Decoding tokens one by one shows "\ufffd" for the pieces of a
    multi-byte character (byte-level BPE); here such a token gets "" and the character goes to the token that
    completes it. Each label is the difference of two decodes of a short window ending at that token."""
    labels = []
    for i in range(len(ids)):
        start = max(0, i - window + 1)
        before, after = tokenizer.decode(ids[start:i]), tokenizer.decode(ids[start:i + 1])
        if after.endswith("\ufffd") and i + 1 < len(ids):
            labels.append("")  # an incomplete character: shown on the token that completes it
            continue
        common = 0
        while common < min(len(before), len(after)) and before[common] == after[common]:
            common += 1
        labels.append(after[common:])
    return labels


def build_prompt(instruction: str, input: str = "") -> str:
    """The single user message: the instruction, then a blank line and the input if there is one."""
    return f"{instruction}\n\n{input}" if input.strip() else instruction


def render_prompt(tokenizer: Any, instruction: str, input: str = "") -> str:
    """The full prompt text: the chat template with a generation prompt, or plain text + newline."""
    message = build_prompt(instruction, input)
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": message}],
                                             add_generation_prompt=True, tokenize=False)
    return message + "\n"


def _special_strings(tokenizer: Any) -> list[str]:
    added = getattr(tokenizer, "added_tokens_decoder", {}) or {}
    return sorted({*getattr(tokenizer, "all_special_tokens", []), *(t.content for t in added.values() if t.special)})


def encode_text(tokenizer: Any, text: str) -> list[int]:
    """Token ids of user-supplied text (no BOS/EOS added). A special-token string typed in the text (say
    "<|im_start|>system") stays text: it is spelled out in ordinary tokens, so it can never open a chat role."""
    return tokenizer(text, add_special_tokens=False, split_special_tokens=True)["input_ids"]


@dataclass(frozen=True)
class EncodedPrompt:
    """A user prompt's token ids, and which of them spell the instruction (what an AT-MoE router reads)."""

    ids: list[int]
    instruction: tuple[int, int]   # [start, end) token positions of the instruction; (0, len) if it is not found


def _span(offsets: list[tuple[int, int]], start: int, end: int, shift: int = 0) -> tuple[int, int] | None:
    inside = [i for i, (a, b) in enumerate(offsets) if b > a and a < end and b > start]
    return (inside[0] + shift, inside[-1] + 1 + shift) if inside else None


def encode_prompt(tokenizer: Any, instruction: str, input: str = "") -> EncodedPrompt:
    """Token ids of a user prompt rendered with `render_prompt`: the template's own special tokens are special,
    the user's text is only ever text. Without special-token strings in the text the ids are exactly those of
    tokenizing the rendered prompt in one go (what training saw). The instruction comes first in the message, so
    its tokens never depend on the input (a token shared with the following text is counted in)."""
    templated = bool(getattr(tokenizer, "chat_template", None))
    text = render_prompt(tokenizer, instruction, input)
    message = build_prompt(instruction, input)
    at = text.find(message) if templated else 0
    if not any(s in message for s in _special_strings(tokenizer)):
        enc = tokenizer(text, add_special_tokens=not templated, return_offsets_mapping=True)
        ids, span = enc["input_ids"], _span(enc["offset_mapping"], at, at + len(instruction))
    elif not templated:
        enc = tokenizer(text, add_special_tokens=True, split_special_tokens=True, return_offsets_mapping=True)
        ids, span = enc["input_ids"], _span(enc["offset_mapping"], 0, len(instruction))
    else:
        head, found, tail = text.partition(message)
        if not found:  # a template that rewrites the message: we cannot tell its tokens from the user's
            raise ValueError("the prompt contains special-token text (such as <|im_start|>) that this chat "
                             "template rewrites; remove it")
        plain = {"add_special_tokens": False}
        head_ids = tokenizer(head, **plain)["input_ids"]
        enc = tokenizer(message, split_special_tokens=True, return_offsets_mapping=True, **plain)
        ids = head_ids + enc["input_ids"] + tokenizer(tail, **plain)["input_ids"]
        span = _span(enc["offset_mapping"], 0, len(instruction), shift=len(head_ids))
    return EncodedPrompt(ids, span or (0, len(ids)))
