"""`ATMoE`: a Hugging Face causal LM whose decoder layers fuse grouped LoRA experts under a per-layer router.

    prompt → tokens → [layer l: router(pooled hidden) → overrides → w[l] → FusedLoRA modules] × L → logits
                                                       ↘ RoutingTrace (router's and used weights, per layer)

The object is safe to share between threads: every call carries its own routing state (see `call.py`).
"""

from __future__ import annotations

import inspect
import threading
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .call import RoutingCall
from .explain import Explanation
from .generation import DecodeBuffers, GenerationSettings, cache_length, decode
from .grounding import DigitVocab, NumberGuard, Reference
from .layout import GroupLayout
from .load.base import check_signature, load_base
from .load.experts import Expert, decoder_layers, fuse_experts, layer_index, read_expert, save_fused_expert
from .load.files import LoadError
from .load.manifest import Manifest
from .overrides import CompiledOverrides, Overrides, compile_overrides
from .router import GRANULARITIES, GroupedRouter, RouterConfig, load_router, save_router
from .state import RoutingState, add_routing_hooks
from .tokens import EncodedPrompt, check_text
from .tokens import encode_prompt as tokenize
from .trace import RoutingTrace


@dataclass
class Generation:
    text: str
    token_ids: list[int]
    trace: RoutingTrace
    prompt_tokens: int
    seconds: float
    finish_reason: str  # "eos" | "length" | "stopped"
    path: str = "folded"  # how the experts were applied: "folded", "rows", "merged" or "separate" (state.PATHS)

    @property
    def merged(self) -> bool:
        """Whether this answer was decoded with merged weights (`merge=True` where it applies)."""
        return self.path == "merged"

    @property
    def tokens_per_second(self) -> float:
        return len(self.token_ids) / self.seconds if self.seconds > 0 else 0.0


@dataclass
class Score:
    logits: torch.Tensor  # [seq, vocab]
    trace: RoutingTrace


class ATMoE:
    """Grouped LoRA experts routed layer by layer. Build with `ATMoE.load(manifest)` or `ATMoE.from_experts(...)`.

    `groups`, `experts` (ordered by group) and `expert_groups` (expert → group) name them; `layout` is their
    `GroupLayout` (which columns of a [.., E] array belong to which group), shared with the router and the traces."""

    def __init__(self, model: nn.Module, tokenizer: Any, experts: Sequence[Expert], groups: Sequence[str],
                 router: GroupedRouter | str | Path | None = None, *, router_mode: str = "softmax",
                 manifest: Manifest | None = None) -> None:
        self.model, self.tokenizer, self.manifest = model, tokenizer, manifest
        groups = list(groups)
        order = {g: i for i, g in enumerate(groups)}   # stable sort: manifest order within a group
        self._experts = sorted(experts, key=lambda e: order.get(e.group, len(groups)))
        try:  # every group has experts, names are unique, no undeclared group
            self.layout = GroupLayout(groups, [e.name for e in self._experts], [e.group for e in self._experts])
        except ValueError as e:
            raise LoadError(str(e)) from None
        self.groups, self.experts = list(self.layout.groups), list(self.layout.experts)
        self.expert_groups = dict(zip(self.layout.experts, self.layout.expert_groups))  # expert → group
        model.requires_grad_(False)  # base and experts are frozen; only routers ever train
        self.layer_names, layer_of = layer_index(model)
        self.num_layers = len(self.layer_names)
        for ex in self._experts:  # validate against the unwrapped model before changing anything
            missing = [m for m in ex.layout if m not in layer_of]
            if missing:
                raise LoadError(f"expert '{ex.name}': modules {missing[:3]} are not inside a decoder layer")
        self.state = RoutingState(self.num_layers).to(self.device)
        self.fused = fuse_experts(model, self._experts, layer_of, self.state)
        add_routing_hooks(self.state, decoder_layers(model)[1])
        self._decode_buffers: DecodeBuffers | None = None   # the last decode shape's cache (under state.lock)
        self._step: Any = None                               # the compiled decode step (settings.cuda_graphs)
        self._digit_vocab: DigitVocab | None = None          # what grounded decoding reads of the vocabulary, once
        # what `merge=True` keeps once used: one weight per projection group (the base's fused projections)
        self.merge_bytes = sum(g.stacked[:g.num_out].nbytes for layer in self.state.layers for g in layer.groups)
        cfg = RouterConfig(self.groups, self.experts, list(self.layout.expert_groups), self.num_layers,
                           model.config.get_text_config().hidden_size, mode=router_mode)
        if isinstance(router, (str, Path)):
            router = load_router(router, expected=cfg)  # its errors name the file
        if router is not None:
            router.config.check_shape(cfg, "router")
        self.router = (router or GroupedRouter(cfg)).to(self.device)
        parameters = inspect.signature(model.forward).parameters
        self._keep_last = "logits_to_keep" in parameters
        # transformers ≥ 5.2x names the KV cache argument `cache`, earlier 5.x releases `past_key_values`
        self._cache_name = "cache" if "cache" in parameters else "past_key_values"
        context = getattr(model.config.get_text_config(), "max_position_embeddings", None)
        self.context_length = int(context or getattr(model.config, "n_positions", 2048))

    # ------------------------------------------------------------------ construction
    @classmethod
    def load(cls, manifest: str | Path | Manifest, *, base: str | None = None, device: str = "auto",
             dtype: str | torch.dtype | None = None, trust_remote_code: bool = False,
             device_map: str | dict[str, Any] | None = None, offload_folder: str | Path | None = None,
             quantization_config: Any = None, prepare_base: Callable[[nn.Module], None] | None = None,
             gate_floor: float | None = None, stay_out_threshold: float | None = None) -> ATMoE:
        """Load base model, experts and router from a manifest. `base` overrides the manifest's base model; experts
        are still checked against the manifest's recorded base signature and their own shapes.

        Bases larger than one device (docs/scale.md): `device_map` / `offload_folder` place the decoder layers with
        accelerate, `quantization_config` loads the base quantized (the experts then run beside the base layers,
        unmerged), and `prepare_base(model)` runs on the loaded base before the experts are fused into it (e.g.
        `atmoe.train.distributed.shard_base` for FSDP2).

        `gate_floor` replaces the router's (`RouterConfig.gate_floor`: sigmoid gates at or below it read as 0); None
        keeps the one its file holds. A server setting: every call of this model answers with it. So is
        `stay_out_threshold`, for a router with a stay-out head (`RouterConfig.stay_out_threshold`): higher keeps fewer
        requests out, of every kind (its trade-off on the demo: docs/abstention.md)."""
        m = manifest if isinstance(manifest, Manifest) else Manifest.load(manifest)
        base = base if base is not None else m.base_model
        if base and not Path(base).is_absolute() and (m.root / base).is_dir():
            base = str(m.resolve(base, "base model"))  # a base folder shipped next to the manifest
        model, tokenizer = load_base(base, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                                     device_map=device_map, offload_folder=offload_folder,
                                     quantization_config=quantization_config)
        if m.base_signature:
            check_signature(m.base_signature, model, what=f"experts of manifest {m.root}")
        if prepare_base is not None:
            prepare_base(model)
        out = cls.from_experts(model, tokenizer, [(g, e.name, m.expert_source(e), e.description) for g, e in m.experts],
                               groups=[g.name for g in m.groups], router=m.router_path(), manifest=m)
        if gate_floor is not None:
            out.router.config = replace(out.router.config, gate_floor=float(gate_floor))
        if stay_out_threshold is not None:
            if not out.router.config.stay_out:
                raise ValueError("stay_out_threshold needs a router with a stay-out head; the router of "
                                 f"{m.root} has none")
            out.router.config = replace(out.router.config, stay_out_threshold=float(stay_out_threshold))
        return out

    @classmethod
    def from_experts(cls, model: nn.Module, tokenizer: Any, experts: Sequence[tuple[str, str, str | Path, str]],
                     *, groups: Sequence[str] | None = None, router: str | Path | GroupedRouter | None = None,
                     router_mode: str = "softmax", manifest: Manifest | None = None) -> ATMoE:
        """`experts`: (group, name, adapter folder or hub id, description). Groups default to first-seen order."""
        groups = list(groups or dict.fromkeys(g for g, *_ in experts))
        _, layer_of = layer_index(model)
        loaded = [read_expert(name, g, src, model, layer_of, desc) for g, name, src, desc in experts]
        return cls(model, tokenizer, loaded, groups, router, router_mode=router_mode, manifest=manifest)

    # ------------------------------------------------------------------ properties
    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def __getattr__(self, name: str) -> Any:
        """The methods this release moved out of the class (training and call plumbing) keep working one release,
        with a DeprecationWarning naming their new home."""
        moved = _MOVED.get(name)
        if moved is None:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        home = "atmoe.router.save_router(router, path)" if name == "save_router" else \
            f"{moved.__module__}.{moved.__name__}(m, ...)"
        warnings.warn(f"ATMoE.{name} is deprecated: use {home}", DeprecationWarning, stacklevel=2)
        return moved(self) if name in _MOVED_PROPERTIES else partial(moved, self)

    def _checkpoint_context(self) -> tuple[object, object]:
        """`context_fn` for torch's non-reentrant checkpoint: the backward recompute of a layer runs after the call
        has released the workspace, so it takes it again with the same call (whose weights carry the router's
        autograd graph)."""
        call = self.state.call
        return nullcontext(), (self._hold(call) if call is not None else nullcontext())

    @contextmanager
    def _hold(self, call: RoutingCall) -> Iterator[RoutingCall]:
        """Give `call` the model's routing workspace for the forwards inside (one call at a time; see state.py)."""
        state = self.state
        if state.owner == threading.get_ident():
            raise RuntimeError("this thread is already inside a call of this model (an unfinished stream?): finish "
                               "or close it before starting another")
        with state.lock:
            state.owner = threading.get_ident()
            try:
                B = call.read_mask.shape[0]
                if not state.stackable or torch.is_grad_enabled():
                    path = "separate"
                elif call.granularity == "token" or B > 1:
                    path = "rows"
                else:
                    path = "merged" if call.merge else "folded"
                state.install(call, path)
                call.path = path
                yield call
            finally:
                state.clear()
                state.owner = None

    # ------------------------------------------------------------------ calls
    def check_overrides(self, overrides: Overrides | CompiledOverrides | dict | None,
                        router: GroupedRouter | None = None) -> CompiledOverrides | None:
        """Validate `overrides` against this model (names, layer range, budgets: ValueError naming every fault) and
        turn them into the masks a call applies. `router` decides whether groups share a budget (not sigmoid)."""
        if overrides is None:
            return None
        competitive = (router or self.router).config.mode != "sigmoid"
        if isinstance(overrides, CompiledOverrides):   # compiled once (e.g. checked when the user applied them)
            if overrides.competitive_groups != competitive or len(overrides.layer_mask) != self.num_layers or \
                    len(overrides.expert_fixed) != len(self.experts):
                raise ValueError("these overrides were compiled for another model or router mode; pass Overrides")
            return overrides
        if isinstance(overrides, dict):
            overrides = Overrides.from_dict(overrides)
        if not isinstance(overrides, Overrides):
            raise ValueError(f"overrides must be an Overrides, a dict or None, got {type(overrides).__name__}")
        return compile_overrides(overrides, layout=self.layout, num_layers=self.num_layers,
                                 competitive_groups=competitive)

    def _new_call(self, prompt_mask: torch.Tensor, overrides: Overrides | CompiledOverrides | dict | None = None,
                  router: GroupedRouter | None = None, granularity: str | None = None,
                  merge: bool = False, instruction_mask: torch.Tensor | None = None,
                  gate_floor: float | None = None, input_ids: torch.Tensor | None = None) -> RoutingCall:
        """A call's routing, as values (`RoutingCall`). `merge` (batch 1, sequence routing): the weighted experts are
        folded into one weight per projection group, W0 + Σ w·s·B·A, written into buffers the model keeps
        (`merge_bytes`, allocated by the first merging call) — base-model decode speed. The base weights are never
        written. The router pools over `instruction_mask` when it reads the instruction and one is given, else
        `prompt_mask`. `gate_floor`: None reads the router's (`RouterConfig.gate_floor`); training passes 0.
        `input_ids`: the call's tokens, which a router with a stay-out head scores before the forward (one embedding
        lookup; `GroupedRouter.stay_out_scores`)."""
        router = router or self.router
        if merge and not self.state.stackable:
            raise ValueError("merge=True needs plain, resident base weights, and this base is quantized or offloaded "
                             "(a LoRA cannot be merged into 4-bit weights exactly): decode without merge")
        if router.config.reads == "instruction" and instruction_mask is not None:
            prompt_mask = instruction_mask
        granularity = granularity or router.config.granularity
        if granularity not in GRANULARITIES:
            raise ValueError(f"granularity must be 'sequence' or 'token', got {granularity!r}")
        read = prompt_mask.to(self.device)
        scores = None
        if router.config.stay_out and input_ids is not None:
            with torch.no_grad():   # a decision, not trained through (no_grad: a training forward may use it)
                scores = router.stay_out_scores(self.model.get_input_embeddings()(input_ids.to(self.device)), read)
        return RoutingCall(router, read, granularity, self.check_overrides(overrides, router),
                           merge=bool(merge) and prompt_mask.shape[0] == 1,
                           gate_floor=router.config.gate_floor if gate_floor is None else float(gate_floor),
                           stay_scores=scores)

    def _run(self, call: RoutingCall, **kwargs: Any) -> Any:
        """One routed forward of `call` (the HF output)."""
        with self._hold(call):
            return self.model(**kwargs)

    def encode(self, instruction: str, input: str = "") -> list[int]:
        """Token ids of a request as the model reads it: the tokenizer's chat template when it has one, else the
        plain text (what `score(input_ids=...)` takes)."""
        return self._encode(instruction, input).ids

    def _encode(self, prompt: str, input: str = "") -> EncodedPrompt:
        """The chat-templated prompt's token ids, and where the instruction's tokens are (what the router reads)."""
        if not isinstance(prompt, str) or not isinstance(input, str):
            raise ValueError("prompt and input must be strings")
        check_text(prompt, "prompt")
        check_text(input, "input")
        if not (prompt.strip() or input.strip()):
            raise ValueError("the prompt is empty")
        return tokenize(self.tokenizer, prompt, input)

    def _batch(self, rows: Sequence[EncodedPrompt]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Left-pad prompts → input_ids, attention_mask, instruction_mask [B, T]."""
        width = max(len(r.ids) for r in rows)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        ids = torch.full((len(rows), width), pad, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        instruction = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):
            left = width - len(r.ids)
            if r.ids:
                ids[i, left:] = torch.tensor(r.ids)
                mask[i, left:] = 1
                instruction[i, left + r.instruction[0]:left + r.instruction[1]] = 1
        return ids.to(self.device), mask.to(self.device), instruction.to(self.device)

    def _check_length(self, n_prompt: int, max_new_tokens: int = 0) -> None:
        if n_prompt == 0:
            raise ValueError("the prompt is empty")
        if n_prompt + max_new_tokens > self.context_length:
            over = n_prompt + max_new_tokens - self.context_length
            raise ValueError(f"the prompt is {n_prompt} tokens and {max_new_tokens} new tokens were asked for, but the "
                             f"model's context is {self.context_length}: shorten the prompt by {over} tokens")

    def route(self, prompt: str, overrides: Overrides | dict | None = None, *, input: str = "",
              router: GroupedRouter | None = None, granularity: str | None = None) -> RoutingTrace:
        """The routing of a prompt, without generating (decoder layers only, no LM head)."""
        return self.route_batch([prompt], overrides, inputs=[input], router=router, granularity=granularity)[0]

    def route_batch(self, prompts: Sequence[str], overrides: Overrides | dict | None = None, *,
                    inputs: Sequence[str] | None = None, router: GroupedRouter | None = None,
                    granularity: str | None = None) -> list[RoutingTrace]:
        rows = [self._encode(p, i) for p, i in zip(prompts, inputs or [""] * len(prompts), strict=True)]
        for r in rows:
            self._check_length(len(r.ids))
        ids, mask, instruction = self._batch(rows)
        call = self._new_call(mask, overrides, router, granularity, instruction_mask=instruction, input_ids=ids)
        with torch.inference_mode(), self._hold(call):
            self.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
        return [self._trace(call, b, ids[b][mask[b].bool()].tolist()) for b in range(len(rows))]

    def score(self, text: str | None = None, *, input_ids: Sequence[int] | torch.Tensor | None = None,
              overrides: Overrides | dict | None = None, router: GroupedRouter | None = None,
              granularity: str | None = None) -> Score:
        """Logits [seq, vocab] for exactly these tokens (text is tokenized as given, no chat template)."""
        if (text is None) == (input_ids is None):
            raise ValueError("give exactly one of text or input_ids")
        if text is not None:
            if not isinstance(text, str):
                raise ValueError("text must be a string")
            check_text(text, "text")
            input_ids = self.tokenizer(text)["input_ids"]
        ids = torch.as_tensor(input_ids, dtype=torch.long).reshape(1, -1).to(self.device)
        self._check_length(ids.shape[1])
        mask = torch.ones_like(ids)
        with torch.inference_mode():
            out, call = forward_routed(self, ids, mask, mask, overrides=overrides, router=router,
                                            granularity=granularity, use_cache=False)
        return Score(out.logits[0].float(), self._trace(call, 0, ids[0].tolist()))

    def stream(self, prompt: str, *, input: str = "", settings: GenerationSettings | None = None,
               overrides: Overrides | dict | None = None, router: GroupedRouter | None = None,
               stop: threading.Event | None = None, **changes: Any) -> Iterator[str | Generation]:
        """Yield text pieces as tokens are generated ("" while a character is incomplete), then the whole
        `Generation` (text, token ids, finish reason, trace), exactly what `generate` would return.
        `settings` is one `GenerationSettings`; keyword `changes` replace some of its fields (`max_new_tokens=64`,
        `seed=1`, `granularity="token"`, `merge=True`, …). `merge=True` trades one weight copy per call for
        base-model decode speed (see `new_call`). Setting `stop` ends it after the current token."""
        settings = GenerationSettings.of(settings, **changes)
        for item in self._generate_rows([prompt], [input], settings, overrides, router, stop):
            yield item if isinstance(item, str) else item[0]

    def generate(self, prompt: str, *, input: str = "", settings: GenerationSettings | None = None,
                 overrides: Overrides | dict | None = None, router: GroupedRouter | None = None,
                 **changes: Any) -> Generation:
        """One answer and its routing; `settings` and `changes` as in `stream`."""
        return self.generate_batch([prompt], inputs=[input], settings=settings, overrides=overrides, router=router,
                                   **changes)[0]

    def generate_batch(self, prompts: Sequence[str], *, inputs: Sequence[str] | None = None,
                       settings: GenerationSettings | None = None, overrides: Overrides | dict | None = None,
                       router: GroupedRouter | None = None, **changes: Any) -> list[Generation]:
        """One answer per prompt (left-padded, decoded together); `settings` and `changes` as in `stream`."""
        settings = GenerationSettings.of(settings, **changes)
        *_, result = self._generate_rows(prompts, inputs or [""] * len(prompts), settings, overrides, router)
        return result

    def _generate_rows(self, prompts: Sequence[str], inputs: Sequence[str], settings: GenerationSettings,
                       overrides: Overrides | dict | None, router: GroupedRouter | None,
                       stop: threading.Event | None = None) -> Iterator[str | list[Generation]]:
        """Yields text pieces of row 0 as they come, then the list of Generations."""
        start = time.perf_counter()
        rows = [self._encode(p, i) for p, i in zip(prompts, inputs, strict=True)]
        for r in rows:
            self._check_length(len(r.ids), settings.max_new_tokens)
        ids, mask, instruction = self._batch(rows)
        call = self._new_call(mask, overrides, router, settings.granularity, settings.merge,
                             instruction_mask=instruction, input_ids=ids)
        if call.granularity == "token" and len(rows) > 1:
            raise ValueError("token-level routing is for one prompt at a time")
        tok = self.tokenizer
        configured = getattr(self.model.generation_config, "eos_token_id", None)
        configured = configured if isinstance(configured, list) else [configured]
        eos = {e for e in [tok.eos_token_id, *configured] if e is not None}
        pad = tok.pad_token_id if tok.pad_token_id is not None else next(iter(eos), 0)

        state = self.state

        def forward(model: Any = self.model, **kw: Any) -> torch.Tensor:
            if self._keep_last:
                kw["logits_to_keep"] = 1
            if self._cache_name != "cache":
                kw[self._cache_name] = kw.pop("cache")
            logits = model(**kw).logits
            state.route_now = call.granularity == "token"   # sequence routing: fixed by the prompt from here on
            return logits

        new: list[list[int]] = [[] for _ in rows]
        finished = [False] * len(rows)
        shown = ""
        # The call holds the model's workspace (and its KV cache) from the prompt to the last token, also while the
        # consumer of this generator works between tokens: other calls wait; closing the generator releases it.
        step = self._compiled_step(forward) if settings.cuda_graphs else None
        guard = self._number_guard([f"{p}\n{i}" for p, i in zip(prompts, inputs)], eos, call) \
            if settings.grounded else None
        with torch.inference_mode(), self._hold(call):
            buffers = self._decode_buffers_for(len(rows), ids.shape[1] + settings.max_new_tokens)
            for token in decode(forward, ids, mask, settings, eos, pad, buffers, stop, step, guard):
                for b, t in enumerate(token.tolist()):
                    if not finished[b]:
                        if t in eos:
                            finished[b] = True
                        else:
                            new[b].append(t)
                text = tok.decode(new[0], skip_special_tokens=True)
                piece = "" if text.endswith("\ufffd") else text[len(shown):]
                shown += piece
                yield piece
        seconds = time.perf_counter() - start
        stopped = stop is not None and stop.is_set()
        out = []
        for b, r in enumerate(rows):
            reason = "eos" if finished[b] else ("stopped" if stopped else "length")
            full = ids[b][mask[b].bool()].tolist() + new[b]
            out.append(Generation(tok.decode(new[b], skip_special_tokens=True), new[b], self._trace(call, b, full),
                                  len(r.ids), seconds, reason, call.path))
        yield out

    def _number_guard(self, sources: Sequence[str], end_ids: Iterable[int], call: RoutingCall) -> NumberGuard:
        """Grounded decoding for one batch (`GenerationSettings.grounded`): each row may write the values of its
        source and, once the prompt has routed, the reference values (`Manifest.reference_values`; a named one only
        on a line that names it) of the experts whose weight is above 0 on some layer — none when the stay-out head
        keeps the request out or every expert is disabled. Whatever the routing, no value follows the name of a
        measurement the manifest declares (`Manifest.measurements`) that its source does not name."""
        if self._digit_vocab is None:   # built once; a second build by a concurrent call is the same, and harmless
            self._digit_vocab = DigitVocab(self.tokenizer, self.model.get_output_embeddings().weight.shape[0])
        declared = self.manifest.reference_values if self.manifest else {}

        def engaged() -> list[list[Reference]]:
            return [[v for name, x in zip(self.experts, row) if x > 0 for v in declared.get(name, [])]
                    for row in call.highest_weights().tolist()]

        return NumberGuard(self._digit_vocab, sources, end_ids=sorted(end_ids), later=engaged if declared else None,
                           measurements=self.manifest.measurements if self.manifest else ())

    def _compiled_step(self, forward: Any) -> Any:
        """The decode step compiled whole (no graph break: tests/test_speed.py) and, on CUDA, captured as a CUDA
        graph that replays with the step's inputs at fixed addresses (DecodeBuffers, the folded expands, the merged
        weights). Compiled once per model and shape; on a CPU the same graph runs without capture (the check of
        everything but the capture itself)."""
        if self._step is None:
            cuda = self.device.type == "cuda"
            self._step = torch.compile(self.model, fullgraph=True, dynamic=False,
                                       **({"mode": "reduce-overhead"} if cuda else {"backend": "eager"}))

        def step(**kw: Any) -> torch.Tensor:
            return forward(model=self._step, **kw)
        return step

    def _decode_buffers_for(self, batch: int, length: int) -> DecodeBuffers:
        """The decode buffers for this shape: the last ones when they fit (the same addresses call after call)."""
        buffers = self._decode_buffers
        if buffers is None or not buffers.fits(batch, length):
            self._decode_buffers = None            # free the old cache before allocating the new one
            buffers = self._decode_buffers = DecodeBuffers(self.model.config, batch, cache_length(length), self.device,
                                                           self.model.dtype)
        return buffers

    def _trace(self, call: RoutingCall, row: int, token_ids: list[int]) -> RoutingTrace:
        return RoutingTrace.from_call(call, row, token_ids, self.layer_names, self.tokenizer)

    def explain(self, prompt: str, input: str = "", layers: Sequence[int] | None = None,
                router: GroupedRouter | None = None) -> Explanation:
        """Why the router chose its weights for this prompt: every group and expert logit at each layer split exactly
        into one contribution per token it read, plus the bias (see `atmoe.explain`). One routed forward pass, no
        overrides, sequence routing; `layers` limits the layers reported (default all)."""
        row = self._encode(prompt, input)
        self._check_length(len(row.ids))
        ids, mask, instruction = self._batch([row])
        call = self._new_call(mask, router=router, granularity="sequence", instruction_mask=instruction)
        call.keep_inputs = True   # keep the hidden state entering each layer, for this call only
        with torch.inference_mode():
            with self._hold(call):
                self.model.base_model(input_ids=ids, attention_mask=mask, use_cache=False)
            return Explanation.from_call(call, row.ids, self.tokenizer, self._trace(call, 0, row.ids), layers)


# ---------------------------------------------------------------------------------------------------------------------
# Training and call plumbing: functions of a model, not part of the user API.

def new_call(m: ATMoE, prompt_mask: torch.Tensor, overrides: Overrides | CompiledOverrides | dict | None = None,
             router: GroupedRouter | None = None, granularity: str | None = None, merge: bool = False,
             instruction_mask: torch.Tensor | None = None) -> RoutingCall:
    """A call's routing for `m` (see `ATMoE._new_call`): what `forward_routed` runs, and tests inspect."""
    return m._new_call(prompt_mask, overrides, router, granularity, merge, instruction_mask)


def forward_routed(m: ATMoE, input_ids: torch.Tensor, attention_mask: torch.Tensor, prompt_mask: torch.Tensor, *,
                   instruction_mask: torch.Tensor | None = None,
                   overrides: Overrides | CompiledOverrides | dict | None = None, router: GroupedRouter | None = None,
                   granularity: str | None = None, merge: bool = False, gate_floor: float | None = None,
                   **kwargs: Any) -> tuple[Any, RoutingCall]:
    """One routed forward pass (the training entry point): the HF output and the call (`call.stacked(...)`).
    Training passes `gate_floor=0`: a gate the floor would close still needs its gradient."""
    call = m._new_call(prompt_mask, overrides, router, granularity, merge, instruction_mask=instruction_mask,
                       gate_floor=gate_floor, input_ids=input_ids)
    return m._run(call, input_ids=input_ids, attention_mask=attention_mask, **kwargs), call


def new_router(m: ATMoE, **changes: Any) -> GroupedRouter:
    """A fresh, untrained router for `m` (e.g. `mode="sigmoid"`), on the model's device; without a stay-out head
    unless `stay_out=True` is asked (an untrained head would keep every request out)."""
    return GroupedRouter(replace(m.router.config, **{"stay_out": False, **changes})).to(m.device)


def save_experts(m: ATMoE, out_dir: str | Path, card: dict[str, Any] | None = None,
                 dtype: torch.dtype = torch.float32) -> dict[str, Path]:
    """Write every expert as the fused layers hold it now (e.g. co-adapted), one PEFT adapter folder each."""
    return {e.name: save_fused_expert(m.model, e, i, Path(out_dir) / e.name, card or {}, dtype)
            for i, e in enumerate(m._experts)}


def enable_gradient_checkpointing(m: ATMoE) -> None:
    """Checkpoint decoder layers; the backward recompute takes the call's routing again (non-reentrant)."""
    m.model.gradient_checkpointing_enable(
        gradient_checkpointing_kwargs={"use_reentrant": False, "context_fn": m._checkpoint_context})


def encode_prompt(m: ATMoE, instruction: str, input: str = "") -> EncodedPrompt:
    """`encode`, plus where the instruction's tokens are (what the router reads)."""
    return m._encode(instruction, input)


def expert(m: ATMoE, name: str) -> Expert:
    """One expert's details (group, source, PEFT config, card) by name."""
    return m._experts[m.experts.index(name)]


def router_config(m: ATMoE) -> RouterConfig:
    return m.router.config


def dtype(m: ATMoE) -> torch.dtype:
    return m.model.dtype


def _save_router(m: ATMoE, path: str | Path, router: GroupedRouter | None = None) -> Path:
    return save_router(router or m.router, path)


_MOVED = {"new_call": new_call, "forward_routed": forward_routed, "new_router": new_router,
          "save_experts": save_experts, "gradient_checkpointing_enable": enable_gradient_checkpointing,
          "encode_prompt": encode_prompt, "expert": expert, "router_config": router_config, "dtype": dtype,
          "save_router": _save_router}
_MOVED_PROPERTIES = {"router_config", "dtype"}

