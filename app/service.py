"""The dashboard's only door to the engine: wraps one `ATMoE` and returns plain data (dicts, DataFrames, numpy,
`RoutingTrace`s of numpy arrays, bytes). No Streamlit here, so every call is testable without a browser.

The engine keeps no per-request state on the model (a call's routing lives in its own tensors, and the model's routing
workspace is taken under a lock for the call's duration), so one `Service` is shared by every browser session; each
call carries that session's overrides and settings.
"""

from __future__ import annotations

import io
import tempfile
import threading
import zipfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from atmoe import (
    ATMoE,
    Explanation,
    Generation,
    GenerationSettings,
    GroupLayout,
    Overrides,
    RoutingTrace,
)
from atmoe.analysis.attribution import Attribution
from atmoe.model import expert
from demo.config import SHIPPED_MANIFEST, STAGE1_MANIFEST

# The shipped demo (`make assets`): the co-adapted experts with their router (the default), then the stage-1 experts
# trained apart with their router (the paper's recipe), for comparison.
DEFAULT_MANIFESTS = {"co-adapted (default)": SHIPPED_MANIFEST,
                     "stage 1 (experts trained apart)": STAGE1_MANIFEST}   # name shown → path (demo/config.py)
# Shown above the form whenever one of those is loaded: what the shipped experts learnt, and what they are not.
DEMO_SCOPE = ("**Demo experts, not a clinical tool.** They learnt synthetic notes in one format (a `Vitals:` line and "
              "a `Labs:` line over the suite's 13 measurements) to show how routing composes skills. Even there a "
              "flag or a range can be wrong, and values between normal and clearly abnormal were never taught "
              "(docs/evaluation.md, *Where the shipped model still fails*); outside that format values can be misread.")
BATCH_CHUNK = 8
MERGE_DEFAULT_MAX_BYTES = 1 << 30  # fast decode on by default when one merged copy costs at most this


@dataclass
class Answer:
    """One generated answer and its routing."""

    text: str
    trace: RoutingTrace
    seconds: float
    new_tokens: int
    prompt_tokens: int
    finish_reason: str  # "eos" | "length" | "stopped"
    overrides: Overrides | None = None
    settings: GenerationSettings = field(default_factory=GenerationSettings)  # the very object the engine ran with
    path: str = "folded"  # how the experts were applied, as the engine reports it (`Generation.path`)
    token_ids: list[int] = field(default_factory=list)   # the answer's tokens (what attribution teacher-forces)

    @property
    def tokens_per_second(self) -> float:
        return self.new_tokens / self.seconds if self.seconds > 0 else 0.0

    @property
    def merged(self) -> bool:
        """Whether the decode used merged weights: the engine's word (batch 1, sequence routing, a mergeable base)."""
        return self.path == "merged"


def is_shipped(path: str) -> bool:
    """Whether `path` names one of the shipped demo manifests (`DEFAULT_MANIFESTS`), however it is written."""
    return any(Path(path).resolve() == Path(p).resolve() for p in DEFAULT_MANIFESTS.values())


def missing_manifest_message(path: str) -> str | None:
    """A how-to message when the manifest does not exist (the shipped default is built by `make assets`)."""
    p = Path(path)
    if (p / "experts.json").is_file() or p.is_file():
        return None
    how = "Build the shipped demo model with `make assets`, or start" if is_shipped(path) else "Start"
    return (f"No expert manifest at `{path}`. {how} the app with `streamlit run streamlit_app.py -- "
            "--manifest path/to/experts.json` (repeatable) or `-- --models-dir DIR`.")


class Service:
    """Plain-data facade over one loaded `ATMoE`."""

    def __init__(self, model: ATMoE, source: str = "") -> None:
        self.model, self.source = model, source

    @classmethod
    def load(cls, manifest: str, device: str = "auto") -> Service:
        return cls(ATMoE.load(manifest, device=device), str(manifest))

    # ------------------------------------------------------------------ description
    @property
    def shipped_demo(self) -> bool:
        """Whether this model was loaded from one of the shipped demo manifests."""
        return is_shipped(self.source)

    @property
    def merge_mb(self) -> float:
        return self.model.merge_bytes / 2**20

    @property
    def merge_default(self) -> bool:
        """Fast decode by default only where the base can be merged into at all (not quantized or offloaded) and the
        merged weights the model keeps are small (a fixed rule, so every session of one model gets the same default
        and the same numbers)."""
        return 0 < self.model.merge_bytes <= MERGE_DEFAULT_MAX_BYTES

    @property
    def groups(self) -> list[str]:
        return list(self.model.groups)

    @property
    def experts(self) -> list[str]:
        return list(self.model.experts)

    @property
    def layout(self) -> GroupLayout:
        return self.model.layout

    @property
    def num_layers(self) -> int:
        return self.model.num_layers

    def info(self) -> dict[str, Any]:
        m = self.model
        cfg = m.router.config
        return {"manifest": self.source, "base_model": (m.manifest.base_model if m.manifest else None)
                or "embedded SmolLM2-135M-Instruct", "device": str(m.device), "dtype": str(m.model.dtype).replace("torch.", ""),
                "layers": m.num_layers, "context_length": m.context_length, "groups": self.groups,
                "router": {"mode": cfg.mode, "temperature": cfg.temperature, "pooling": cfg.pooling,
                           "granularity": cfg.granularity, "trained": bool(m.router.trained)}}

    def experts_table(self) -> pd.DataFrame:
        rows = []
        for name in self.experts:
            e = expert(self.model, name)
            rows.append({"expert": name, "group": e.group, "rank": e.rank, "targets": ", ".join(e.target_modules),
                         "parameters": e.num_parameters, "description": e.description})
        return pd.DataFrame(rows)

    def expert_card(self, name: str) -> dict[str, Any]:
        e = expert(self.model, name)
        return {"card": dict(e.card), "config": {k: v for k, v in e.config.items() if not isinstance(v, dict)}}

    # ------------------------------------------------------------------ overrides
    def check_overrides(self, overrides: Overrides | None) -> Overrides | None:
        """Check `overrides` against this model (names, layers, budgets; ValueError names every fault). Returns the
        same object, or None when it fixes nothing (the router alone)."""
        if overrides is None:
            return None
        self.model.check_overrides(overrides)
        return None if overrides.is_empty() else overrides

    def prompt_tokens(self, prompt: str, input: str = "") -> int:
        return len(self.model.encode(prompt, input))

    # ------------------------------------------------------------------ calls
    def route(self, prompt: str, input: str = "", overrides: Overrides | None = None,
              granularity: str = "sequence") -> RoutingTrace:
        return self.model.route(prompt, overrides, input=input, granularity=granularity)

    def route_many(self, prompts: Sequence[str], inputs: Sequence[str],
                   overrides: Overrides | None = None) -> list[RoutingTrace]:
        """Route one chunk (callers chunk by `BATCH_CHUNK` to show progress)."""
        return self.model.route_batch(list(prompts), overrides, inputs=list(inputs))

    def stream(self, prompt: str, input: str, settings: GenerationSettings, overrides: Overrides | None,
               stop: threading.Event) -> Iterator[str | Answer]:
        """Text pieces as they are generated, then the `Answer`. Setting `stop` ends it after the current token."""
        for item in self.model.stream(prompt, input=input, settings=settings, overrides=overrides, stop=stop):
            yield item if isinstance(item, str) else self._answer(item, overrides, settings)

    def generate(self, prompt: str, input: str, settings: GenerationSettings, overrides: Overrides | None) -> Answer:
        g = self.model.generate(prompt, input=input, settings=settings, overrides=overrides)
        return self._answer(g, overrides, settings)

    @staticmethod
    def _answer(g: Generation, overrides: Overrides | None, settings: GenerationSettings) -> Answer:
        return Answer(g.text, g.trace, g.seconds, len(g.token_ids), g.prompt_tokens, g.finish_reason, overrides,
                      settings, g.path, list(g.token_ids))

    def explain(self, prompt: str, input: str = "") -> Explanation:
        """Every layer's attribution of the routing of this prompt (one forward pass; see `atmoe.explain`)."""
        return self.model.explain(prompt, input)

    def sweep(self, prompt: str, input: str, target: str, steps: int, settings: GenerationSettings
              ) -> pd.DataFrame:
        """weight, text, finish_reason, new_tokens: one generation per weight of `target` in linspace(0, 1, steps),
        every one with these settings (see `atmoe.analysis.sweep`)."""
        from atmoe.analysis.sweep import sweep

        return sweep(self.model, prompt, input, target, steps=steps, settings=settings)

    def attribute(self, prompt: str, input: str, answer: Answer, targets: Sequence[str],
                  ranges: Sequence[tuple[int, int]], first_order: bool = False) -> Attribution:
        """Δ log p of `answer` with each target removed on each layer range, under the answer's own overrides and
        granularity (see `atmoe.analysis.attribution`)."""
        from atmoe.analysis.attribution import attribute

        return attribute(self.model, prompt, answer.token_ids, input=input, targets=targets, ranges=ranges,
                         overrides=answer.overrides, first_order=first_order, granularity=answer.trace.granularity)

    def sweep_set(self, prompts: Sequence[str], inputs: Sequence[str], target: str, steps: int,
                  settings: GenerationSettings, scorer: Any = None, progress: Any = None) -> tuple[pd.DataFrame, float]:
        """The controllability curve over a set (one line per row and weight, `atmoe.analysis.sweep.sweep_rows`) and
        the router's own mean weight of `target` over the same rows."""
        from atmoe.analysis.sweep import router_weight, sweep_rows

        frame = sweep_rows(self.model, prompts, target, inputs=inputs, steps=steps, scorer=scorer, progress=progress,
                           batch_size=BATCH_CHUNK, settings=GenerationSettings.of(settings, granularity="sequence"))
        return frame, router_weight(self.model, prompts, target, inputs=inputs)

    def export_adapter_zip(self, trace: RoutingTrace, use: str = "used") -> bytes:
        """The routing frozen into one PEFT LoRA adapter (see `atmoe.analysis.export`), zipped in memory."""
        from atmoe.analysis.export import export_adapter

        with tempfile.TemporaryDirectory(prefix="atmoe-export-") as tmp:
            out = export_adapter(self.model, trace, Path(tmp) / "adapter", use=use)
            buf = io.BytesIO()
            with zipfile.ZipFile(buf, "w", zipfile.ZIP_DEFLATED) as z:
                for f in sorted(out.iterdir()):
                    z.write(f, f"atmoe_adapter/{f.name}")
        return buf.getvalue()

