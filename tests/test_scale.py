"""Bases larger than one device (docs/scale.md), on tiny models and the CPU.

- a base dispatched by accelerate with some decoder layers offloaded to disk routes exactly like the same base
  resident: prefill logits (`score`) and every greedy decode step's logits (`generate`) equal to 1e-5, with the
  router and with overrides — the offloaded layers run as accelerate's hooks make them (the "separate" path);
- a 4-bit base (bitsandbytes NF4, whose CPU backend runs here) routes with the experts beside its quantized layers:
  equal to PEFT's weighted `cat` adapter on the same quantized base for a fixed routing, prefill and decode; `merge`
  never writes into it.
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


# ---------------------------------------------------------------- a 4-bit base (bitsandbytes NF4, CPU backend)

IDS = torch.tensor([5, 17, 33, 2, 99, 64, 7, 21, 40, 11])
MIX = {"a": 0.7, "b": 0.3, "c": 0.45}    # sigmoid gates: a fixed routing PEFT's weighted `cat` adapter reproduces
# PEFT and the engine both run the same bitsandbytes 4-bit matmuls for the base and fp32 LoRA beside them; only the
# order of the sums differs: measured 1.3e-7 prefill, 9e-8 decode with fp32 compute, and 2.0e-4 prefill, 1.0e-6
# decode on a CPU with AVX512-BF16, where bitsandbytes runs a prefill's 4-bit matmuls in bf16.
Q4_TOL = 5e-4


@pytest.fixture(scope="module")
def quantized(tmp_path_factory: pytest.TempPathFactory):
    pytest.importorskip("bitsandbytes", reason="bitsandbytes is not installed (docs/scale.md: quantized bases)")
    from transformers import BitsAndBytesConfig

    from tiny_models import save_adapter, tiny_model, tiny_tokenizer

    root = tmp_path_factory.mktemp("q4")
    tok = tiny_tokenizer()
    # 64 wide: on a CPU with AVX512-BF16, bitsandbytes repacks 4-bit weights in blocks of 64 input features
    base = tiny_model("llama", vocab_size=len(tok), hidden=64)
    base.save_pretrained(root / "base")
    tok.save_pretrained(root / "base")
    specs = [(g, f"e{i}", save_adapter(base, root / f"e{i}", ["q_proj", "v_proj", "o_proj", "down_proj"], r=4,
                                       alpha=8, seed=10 + i), f"expert {i}") for i, g in enumerate(MIX)]
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=torch.float32)

    def load(quantization_config=config):
        return load_base(str(root / "base"), device="cpu", quantization_config=quantization_config)

    model, tok = load()
    return ATMoE.from_experts(model, tok, specs, router_mode="sigmoid"), specs, load


def _peft_mix(load, specs):
    from peft import PeftModel

    model, _ = load()
    ref = PeftModel.from_pretrained(model, specs[0][2], adapter_name="e0")
    for _, name, path, _ in specs[1:]:
        ref.load_adapter(path, adapter_name=name)
    ref.add_weighted_adapter([name for _, name, _, _ in specs], list(MIX.values()), "mix", combination_type="cat")
    ref.set_adapter("mix")
    return ref.eval()


def test_a_4bit_base_routes_with_the_experts_beside_it(quantized) -> None:
    import bitsandbytes as bnb

    m, specs, load = quantized
    q = m.model.model.layers[0].self_attn.q_proj.base_layer
    assert isinstance(q, bnb.nn.Linear4bit) and q.weight.dtype == torch.uint8   # packed NF4, never dequantized
    assert not m.state.stackable
    ours = m.score(input_ids=IDS, overrides={"groups": MIX}).logits
    ref = _peft_mix(load, specs)
    with torch.no_grad():
        theirs = ref(input_ids=IDS[None]).logits[0]
    diff = (ours - theirs).abs().max().item()
    print(f"measured: 4-bit base, routed vs PEFT weighted cat: prefill max |Δ| = {diff:.2e}")
    assert diff <= Q4_TOL
    fp32, _ = load(None)   # the 4-bit weights are what ran: the fp32 base with the same experts differs
    full = ATMoE.from_experts(fp32, None, specs, router_mode="sigmoid").score(input_ids=IDS, overrides={"groups": MIX})
    assert (full.logits - ours).abs().max().item() > 1e-3


def test_a_4bit_base_decodes_like_peft(quantized) -> None:
    m, specs, load = quantized
    seen: list[torch.Tensor] = []
    hook = m.model.lm_head.register_forward_hook(lambda mod, args, out: seen.append(out[:, -1].float().clone()))
    try:
        g = m.generate("List the lab results.", max_new_tokens=5, overrides={"groups": MIX})
    finally:
        hook.remove()
    ref = _peft_mix(load, specs)
    ids = torch.tensor([m.encode("List the lab results.")])
    with torch.no_grad():
        out = ref.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=len(g.token_ids),
                           do_sample=False, output_logits=True, return_dict_in_generate=True,
                           eos_token_id=None, pad_token_id=0)
    assert g.path == "separate" and out.sequences[0, ids.shape[1]:].tolist() == g.token_ids
    diff = max((a[0] - b[0]).abs().max().item() for a, b in zip(seen, out.logits))
    print(f"measured: 4-bit base, routed vs PEFT weighted cat: decode ({len(seen)} steps) max |Δ| = {diff:.2e}")
    assert diff <= Q4_TOL


def test_merge_on_a_4bit_base_is_refused_with_a_clear_message(quantized) -> None:
    """A LoRA cannot be merged into 4-bit weights exactly: `merge=True` is refused, naming why and what to do."""
    m, _, _ = quantized
    with pytest.raises(ValueError, match=r"merge=True needs plain, resident base weights.*4-bit.*decode without merge"):
        m.generate("List the lab results.", max_new_tokens=2, merge=True)
