"""JSONL instruction data for training: loading, encoding (prompt rendering is `atmoe.tokens`) and padding.

A row is either ``{"instruction", "input"?, "output", "experts"?}`` or ``{"prompt", "completion"}``;
other keys (e.g. ``"meta"``) are kept in :attr:`Example.meta` and ignored by training.
Loss is taken only on the answer: labels are ``-100`` on every prompt token.

``"experts"`` labels a row for router training: a list names the experts it needs, and ``[]`` says it needs none
(an off-topic question: every group gate should stay off); a row without the key is unlabelled.
A labelled row may have ``"output": null``: it trains the routing only (no answer, no LM loss), for a request whose
answer is not known or too long to keep whole — a cut answer would teach the model to stop where it was cut.
Expert training needs answers and refuses such rows.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import Any

import torch

from ..tokens import encode_prompt, encode_text

MAX_LINE_BYTES = 1 << 20  # 1 MB
MAX_REPORTED_ERRORS = 10
IGNORE_INDEX = -100


class DataError(ValueError):
    """A data file could not be used; the message lists the offending line numbers (`errors`: "line N: why")."""

    def __init__(self, message: str, path: str | os.PathLike[str] | None = None, errors: list[str] | None = None
                 ) -> None:
        super().__init__(message)
        self.path, self.errors = path, errors or []

    def one_line(self) -> str:
        """`<file>: line N: why` (+ how many more bad lines): what a command prints on stderr, once."""
        if not self.errors:
            return str(self).splitlines()[0]
        more = f" (and {len(self.errors) - 1} more bad line(s))" if len(self.errors) > 1 else ""
        return f"{self.path}: {self.errors[0]}{more}"


@dataclass
class Example:
    """One instruction-following example; ``experts`` names the experts it needs (may be empty)."""

    instruction: str
    input: str
    output: str | None                 # None: the row trains the routing only (needs `experts`)
    experts: list[str] | None = None   # None: unlabelled; []: needs no expert
    meta: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.output is None and self.experts is None:
            raise ValueError("output must be a string (null only on a routing-only row, which needs \"experts\")")
        for name in ("instruction", "input", "output"):
            if not isinstance(getattr(self, name), str) and not (name == "output" and self.output is None):
                raise ValueError(f"{name} must be a string, got {type(getattr(self, name)).__name__}")
        if not self.instruction.strip():
            raise ValueError("instruction must be non-empty")
        if self.experts is not None and (not isinstance(self.experts, list)
                                         or not all(isinstance(e, str) for e in self.experts)):
            raise ValueError("experts must be a list of strings")
        if not isinstance(self.meta, dict):
            raise ValueError("meta must be an object")


def _parse_row(row: Any) -> Example:
    if not isinstance(row, dict):
        raise ValueError(f"expected a JSON object, got {type(row).__name__}")
    if "prompt" in row or "completion" in row:
        missing = [k for k in ("prompt", "completion") if k not in row]
        if missing:
            raise ValueError(f"missing field(s) {missing}")
        return Example(row["prompt"], "", row["completion"], row.get("experts"))
    missing = [k for k in ("instruction", "output") if k not in row]
    if missing:
        raise ValueError(f"missing field(s) {missing} (need instruction+output or prompt+completion)")
    return Example(row["instruction"], row.get("input", ""), row["output"], row.get("experts"), row.get("meta", {}))


def load_jsonl(path: str | os.PathLike[str]) -> list[Example]:
    """Read every example of a JSONL file; raise :class:`DataError` listing all bad lines.

    A UTF-8 byte-order mark is accepted, blank lines are skipped, and lines over 1 MB are
    rejected. Nothing is silently dropped: any bad row fails the whole load.
    """
    examples: list[Example] = []
    errors: list[str] = []
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            if len(raw) > MAX_LINE_BYTES:
                errors.append(f"line {lineno}: longer than {MAX_LINE_BYTES} bytes")
                continue
            if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):
                raw = raw[3:]
            if not raw.strip():
                continue
            try:
                examples.append(_parse_row(json.loads(raw.decode("utf-8"))))
            except UnicodeDecodeError:
                errors.append(f"line {lineno}: not valid UTF-8")
            except json.JSONDecodeError as e:
                errors.append(f"line {lineno}: invalid JSON ({e.msg})")
            except ValueError as e:
                errors.append(f"line {lineno}: {e}")
    if errors:
        shown = "\n  ".join(errors[:MAX_REPORTED_ERRORS])
        more = f"\n  ... and {len(errors) - MAX_REPORTED_ERRORS} more" if len(errors) > MAX_REPORTED_ERRORS else ""
        raise DataError(f"{path}: {len(errors)} bad line(s):\n  {shown}{more}", path, errors)
    if not examples:
        raise DataError(f"{path}: no examples (empty file)")
    return examples


def encode_example(tokenizer: Any, ex: Example, max_length: int) -> dict[str, Any]:
    """Token ids for one example, with the loss masked on the prompt.

    Returns ``input_ids``, ``attention_mask``, ``labels`` (``-100`` on prompt tokens),
    ``prompt_length``, ``instruction`` ([start, end) of the instruction's tokens) and ``truncated`` (the answer's tail was cut to fit ``max_length``).
    Raises ``ValueError`` if the prompt alone leaves no room for an answer token.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has no eos token")
    prompt = encode_prompt(tokenizer, ex.instruction, ex.input)
    prompt_ids = prompt.ids
    answer_ids = [] if ex.output is None else encode_text(tokenizer, ex.output) + [tokenizer.eos_token_id]
    room = max_length - len(prompt_ids)
    if room < 1:
        raise ValueError(f"prompt is {len(prompt_ids)} tokens, no room for an answer within max_length={max_length}")
    truncated = len(answer_ids) > room
    answer_ids = answer_ids[:room]
    ids = list(prompt_ids) + answer_ids
    return {"input_ids": ids, "attention_mask": [1] * len(ids),
            "labels": [IGNORE_INDEX] * len(prompt_ids) + answer_ids,
            "prompt_length": len(prompt_ids), "instruction": prompt.instruction, "truncated": truncated}


def encode_dataset(tokenizer: Any, examples: list[Example], max_length: int) -> tuple[list[dict[str, Any]], int]:
    """Encode every example; returns ``(features, number whose answer was truncated)``."""
    features = []
    for i, ex in enumerate(examples, start=1):
        try:
            features.append(encode_example(tokenizer, ex, max_length))
        except ValueError as e:
            raise ValueError(f"example {i}: {e}") from None
    return features, sum(f["truncated"] for f in features)


@dataclass
class PadCollator:
    """Right-pads features into a batch of tensors.

    Produces ``input_ids`` (padded with ``pad_token_id``), ``attention_mask`` (0 on padding),
    ``labels`` (-100 on padding) and, if ``with_prompt_mask``, ``prompt_mask`` (1 on prompt
    tokens) and ``instruction_mask`` (1 on the instruction's tokens). Leave ``with_prompt_mask`` off when the batch goes straight into a HF model.
    """

    pad_token_id: int
    with_prompt_mask: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.pad_token_id, int) or self.pad_token_id < 0:
            raise ValueError(f"pad_token_id must be a non-negative int, got {self.pad_token_id!r}")

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        width = max(len(f["input_ids"]) for f in features)

        def pad(key: str, value: int) -> torch.Tensor:
            return torch.tensor([list(f[key]) + [value] * (width - len(f[key])) for f in features], dtype=torch.long)

        batch = {"input_ids": pad("input_ids", self.pad_token_id), "attention_mask": pad("attention_mask", 0),
                 "labels": pad("labels", IGNORE_INDEX)}
        if self.with_prompt_mask:
            lengths = torch.tensor([f["prompt_length"] for f in features])
            positions = torch.arange(width)[None, :]
            batch["prompt_mask"] = (positions < lengths[:, None]).long()
            start, end = torch.tensor([f["instruction"] for f in features]).T
            batch["instruction_mask"] = ((positions >= start[:, None]) & (positions < end[:, None])).long()
        return batch
