"""Bases larger than one device (docs/scale.md), on tiny models and the CPU.

- a base dispatched by accelerate with some decoder layers offloaded to disk routes exactly like the same base
  resident: prefill logits (`score`) and every greedy decode step's logits (`generate`) equal to 1e-5, with the
  router and with overrides — the offloaded layers run as accelerate's hooks make them (the "separate" path);
- a 4-bit base: see `test_a_4bit_base` (bitsandbytes on this CPU).
"""

from __future__ import annotations

from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from atmoe import ATMoE
from atmoe.load.base import BaseModelError, load_base
from atmoe.load.manifest import Manifest
from tiny_models import tiny_demo

TOL = 1e-5
# The resident model's own fast path ("folded": one GEMM for [W0; A]) sums in another order than the "separate" path
# an offloaded base must take (base layer, then LoRA beside it): measured 1.2e-5 on logits of max |6|, i.e. 2e-6 of
# the logits' scale. Against the resident model on the same path the offloaded one is exact (measured 0).
PATH_RTOL = 1e-5
PROMPT = "List the lab results and flag each one."
OVERRIDES = {"groups": {"task": 0.7, "knowledge": 0.0, "style": 0.3}, "experts": {"vitals": 1.0, "plain": 1.0}}


def _offload_map(num_layers: int) -> dict[str, str]:
    """Decoder layers 1 and 2 on disk, everything else on the CPU (as a 70B base on 2 GPUs + disk would be)."""
    placement = {"model.embed_tokens": "cpu", "model.norm": "cpu", "model.rotary_emb": "cpu", "lm_head": "cpu"}
    placement.update({f"model.layers.{i}": "disk" if i in (1, 2) else "cpu" for i in range(num_layers)})
    return placement


def _from_manifest(manifest: Path, model: torch.nn.Module, tokenizer) -> ATMoE:
    """`ATMoE.load` on an already loaded base (what `ATMoE.load(..., device_map=...)` would do)."""
    m = Manifest.load(manifest)
    return ATMoE.from_experts(model, tokenizer, [(g, e.name, m.expert_source(e), e.description) for g, e in m.experts],
                              groups=[g.name for g in m.groups], router=m.router_path(), manifest=m)


@contextmanager
def _separate_path(m: ATMoE):
    """Run the resident model on the path an offloaded base takes (what `stackable=False` at load would choose)."""
    m.state.stackable = False
    try:
        yield m
    finally:
        m.state.stackable = True


def _compare(resident: list[torch.Tensor], same_path: list[torch.Tensor], offloaded: list[torch.Tensor],
             what: str) -> None:
    exact = max((a - b).abs().max().item() for a, b in zip(same_path, offloaded))
    across = max((a - b).abs().max().item() for a, b in zip(resident, offloaded))
    scale = max(a.abs().max().item() for a in resident)
    print(f"measured: offloaded vs resident {what}: max |Δ| = {exact:.2e} (same path), {across:.2e} (resident "
          f"folded path; logits max |{scale:.1f}|)")
    assert exact <= TOL and across <= PATH_RTOL * max(1.0, scale)


@pytest.fixture(scope="module")
def pair(tmp_path_factory: pytest.TempPathFactory) -> tuple[ATMoE, ATMoE]:
    root = tmp_path_factory.mktemp("scale")
    manifest = tiny_demo(root / "demo")
    resident = ATMoE.load(manifest, device="cpu")
    model, tok = load_base(str(root / "demo" / "base"), device="cpu", device_map=_offload_map(4),
                           offload_folder=root / "offload")
    return resident, _from_manifest(manifest, model, tok)


def test_the_offloaded_base_is_really_offloaded(pair: tuple[ATMoE, ATMoE]) -> None:
    _, offloaded = pair
    layers = offloaded.model.model.layers
    on_meta = [i for i, layer in enumerate(layers) if all(p.device.type == "meta" for p in layer.parameters())]
    assert on_meta == [1, 2] and hasattr(layers[1], "_hf_hook")      # weights read from disk at each call
    assert not offloaded.state.stackable   # every call runs the base layers as they are, the experts beside them


@pytest.mark.parametrize("overrides", [None, OVERRIDES], ids=["router", "overrides"])
def test_offloaded_prefill_equals_the_resident_model(pair: tuple[ATMoE, ATMoE], overrides: dict | None) -> None:
    resident, offloaded = pair
    a, b = (m.score(PROMPT, overrides=overrides) for m in (resident, offloaded))
    with _separate_path(resident):
        c = resident.score(PROMPT, overrides=overrides)
    with torch.no_grad():
        plain = resident.model(**resident.tokenizer(PROMPT, return_tensors="pt")).logits[0]
    assert not torch.allclose(a.logits, plain, atol=1e-3)   # the experts do change the logits
    _compare([a.logits], [c.logits], [b.logits], "prefill logits")
    for field in ("group_weights", "expert_weights"):   # the trace too: each layer routed the same
        assert abs(getattr(a.trace, field) - getattr(b.trace, field)).max() <= TOL, field


@pytest.mark.parametrize("overrides", [None, OVERRIDES], ids=["router", "overrides"])
def test_offloaded_decode_equals_the_resident_model(pair: tuple[ATMoE, ATMoE], overrides: dict | None) -> None:
    """Greedy decoding, 6 tokens: the logits of every step (prefill and each decode step), captured at lm_head."""
    resident, offloaded = pair

    def run(m: ATMoE) -> tuple[object, list[torch.Tensor]]:
        seen: list[torch.Tensor] = []
        hook = m.model.lm_head.register_forward_hook(lambda mod, args, out: seen.append(out[:, -1].float().clone()))
        try:
            return m.generate(PROMPT, max_new_tokens=6, overrides=overrides), seen
        finally:
            hook.remove()

    (g1, steps1), (g2, steps2) = run(resident), run(offloaded)
    with _separate_path(resident):
        g3, steps3 = run(resident)
    assert (g1.path, g2.path, g3.path) == ("folded", "separate", "separate")
    assert g1.token_ids == g2.token_ids == g3.token_ids and len(steps1) == len(steps2) == len(steps3) >= 6
    _compare(steps1, steps3, steps2, f"decode logits ({len(steps1)} steps)")


def test_offload_folder_needs_a_device_map(tmp_path: Path) -> None:
    with pytest.raises(BaseModelError, match="device_map"):
        load_base(str(tmp_path), offload_folder=tmp_path / "off")
