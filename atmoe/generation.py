"""Sampling settings and the decode loop (prefill once, then one token at a time with the KV cache).

A per-call `torch.Generator` makes sampling reproducible and independent of other threads (HF `generate` samples from
the global RNG, which concurrent dashboard sessions would share).
"""

from __future__ import annotations

import math
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, fields, replace
from typing import Any

import torch
from transformers import StaticCache
from transformers.generation.logits_process import TemperatureLogitsWarper, TopPLogitsWarper

from .router import GRANULARITIES

MAX_NEW_TOKENS = 4096


@dataclass(frozen=True)
class GenerationSettings:
    """How one generation runs: the one settings object of the library, the CLI and the dashboard."""

    max_new_tokens: int = 128
    temperature: float = 0.0       # 0 = greedy decoding
    top_p: float = 1.0             # nucleus sampling, in (0, 1]; used when temperature > 0
    seed: int = 0                  # a non-negative integer: the call's own torch.Generator
    granularity: str | None = None  # "sequence" | "token"; None = the router's own
    merge: bool = False            # decode with merged weights (batch 1, sequence routing; ATMoE.new_call)
    cuda_graphs: bool = False      # replay the decode step as a CUDA graph (torch.compile "reduce-overhead")
    grounded: bool = False         # write only values the prompt holds, or an engaged expert's reference values
                                   # (the manifest's `values`), none under a declared measurement the prompt does
                                   # not name: atmoe.grounding.NumberGuard, a host check per token

    def __post_init__(self) -> None:
        n = self.max_new_tokens
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= MAX_NEW_TOKENS:
            raise ValueError(f"max_new_tokens must be an integer in [1, {MAX_NEW_TOKENS}], got {n!r}")
        t = self.temperature
        if isinstance(t, bool) or not isinstance(t, (int, float)) or not math.isfinite(t) or not 0 <= t <= 100:
            raise ValueError(f"temperature must be a finite number in [0, 100] (0 = greedy), got {t!r}")
        p = self.top_p
        if isinstance(p, bool) or not isinstance(p, (int, float)) or not math.isfinite(p) or not 0 < p <= 1:
            raise ValueError(f"top_p must be a number in (0, 1], got {p!r}")
        s = self.seed
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s < 2**63:
            raise ValueError(f"seed must be a non-negative integer, got {s!r}")
        if self.granularity is not None and self.granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be 'sequence', 'token' or None, got {self.granularity!r}")
        for name in ("merge", "cuda_graphs", "grounded"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be True or False, got {getattr(self, name)!r}")

    @classmethod
    def of(cls, settings: GenerationSettings | None = None, **changes: Any) -> GenerationSettings:
        """`settings` (default: the defaults) with `changes` to some fields; the very object when nothing changes,
        so one settings object passes through every layer unchanged."""
        unknown = sorted(set(changes) - {f.name for f in fields(cls)})
        if unknown:
            raise TypeError(f"unknown generation setting(s) {unknown}; the settings are "
                            f"{[f.name for f in fields(cls)]}")
        if settings is None:
            return cls(**changes)
        if not isinstance(settings, cls):
            raise ValueError(f"settings must be a GenerationSettings or None, got {type(settings).__name__}")
        return replace(settings, **changes) if changes else settings


class DecodeBuffers:
    """What a decode step reads, at addresses that stay the same across steps and calls of one shape (a CUDA graph
    replays them): the KV cache (transformers' StaticCache), a fixed-size attention mask, the token and position.
    Kept by the model's workspace for its last shape; `reset` starts a call."""

    def __init__(self, config: Any, batch: int, length: int, device: torch.device,
                 dtype: torch.dtype = torch.float32) -> None:
        self.batch, self.length = batch, length
        self.cache = StaticCache(config=config, max_cache_len=length) if config is not None else None
        if self.cache is not None:   # allocated now, not inside the first prefill: one compiled prefill, not two
            text = config.get_text_config()
            heads = getattr(text, "num_key_value_heads", None) or text.num_attention_heads
            head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
            self.cache.early_initialization(batch, heads, head_dim, dtype, device)
        self.mask = torch.ones(batch, length, dtype=torch.long, device=device)
        self.token = torch.zeros(batch, 1, dtype=torch.long, device=device)
        self.position = torch.zeros(batch, 1, dtype=torch.long, device=device)

    def fits(self, batch: int, length: int) -> bool:
        return self.batch == batch and self.length >= length

    def reset(self, attention_mask: torch.Tensor) -> None:
        if self.cache is not None:
            self.cache.reset()
        self.mask.fill_(1)
        self.mask[:, :attention_mask.shape[1]] = attention_mask     # left padding stays masked; the rest is causal


def cache_length(n: int) -> int:
    """Round a needed cache length up (to 256), so that calls of similar lengths share one cache shape."""
    return -(-n // 256) * 256


def decode(forward: Callable[..., Any], input_ids: torch.Tensor, attention_mask: torch.Tensor,
           settings: GenerationSettings, eos_ids: set[int], pad_id: int, buffers: DecodeBuffers | None = None,
           stop: threading.Event | None = None, step: Callable[..., Any] | None = None,
           guard: Any = None) -> Iterator[torch.Tensor]:
    """Yield the next token of every row ([B]) until all rows hit EOS, `max_new_tokens`, or `stop` is set: the
    prefill and at most max_new_tokens − 1 decode steps (the last token's logits are never needed).

    `forward(**kwargs)` runs the model (inside the caller's routing call); `step` (default `forward`) runs one decode
    step, e.g. a CUDA-graphed one. Left padding is supported: positions come from the attention mask. `guard`
    (`atmoe.grounding.NumberGuard`) masks the logits of each step and is told the tokens chosen."""
    step = step or forward
    gen = torch.Generator(device=input_ids.device).manual_seed(settings.seed)
    warpers = []
    if settings.temperature > 0:
        warpers.append(TemperatureLogitsWarper(settings.temperature))
        if settings.top_p < 1:
            warpers.append(TopPLogitsWarper(settings.top_p))
    if buffers is None:   # one token, no cache needed
        buffers = DecodeBuffers(None, input_ids.shape[0], input_ids.shape[1], input_ids.device)
    buffers.reset(attention_mask)
    position_ids = (attention_mask.long().cumsum(-1) - 1).clamp(min=0)
    logits = forward(input_ids=input_ids, attention_mask=buffers.mask, position_ids=position_ids,
                     cache=buffers.cache, use_cache=True)
    buffers.position.copy_(position_ids[:, -1:])
    done = torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)
    eos = torch.tensor(sorted(eos_ids), device=input_ids.device)
    for i in range(settings.max_new_tokens):
        last = i == settings.max_new_tokens - 1 or (stop is not None and stop.is_set())
        logits = logits[:, -1, :].float()
        if guard is not None:
            logits = guard.mask(logits, 1 if last else settings.max_new_tokens - i)
        if settings.temperature > 0:
            for w in warpers:
                logits = w(input_ids, logits)
            token = torch.multinomial(logits.softmax(-1), 1, generator=gen).squeeze(1)
        else:
            token = logits.argmax(-1)
        token = torch.where(done, torch.full_like(token, pad_id), token)
        if guard is not None:
            guard.advance(token.tolist())
        yield token
        done |= torch.isin(token, eos)
        if last or bool(done.all()) or (stop is not None and stop.is_set()):   # stop: also if set while yielding
            return
        buffers.token.copy_(token[:, None])
        buffers.position.add_(1)
        logits = step(input_ids=buffers.token, attention_mask=buffers.mask, position_ids=buffers.position,
                      cache=buffers.cache, use_cache=True)
