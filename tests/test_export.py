"""Freezing a routing into one PEFT adapter is exact: PEFT on a fresh base gives the routed model's logits."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from peft import PeftModel
from tiny_models import tiny_demo
from transformers import AutoModelForCausalLM

from atmoe import ATMoE, Overrides
from atmoe.analysis.export import export_adapter


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    path = tiny_demo(tmp_path_factory.mktemp("export"))
    return path, ATMoE.load(path, device="cpu")


def _peft_logits(base_dir, adapter_dir, ids) -> torch.Tensor:
    base = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    peft = PeftModel.from_pretrained(base, adapter_dir).eval()
    with torch.inference_mode():
        return peft(input_ids=torch.tensor([ids])).logits[0].float()


@pytest.mark.parametrize("overrides", [None, Overrides(groups={"style": 0.0}, experts={"labs": 0.9},
                                                       layers=(1, 3), disabled=["plain"])])
def test_exported_adapter_equals_routed_model(demo, tmp_path, overrides):
    path, m = demo
    ids = m.encode("List the vital signs. Use bullet points.",
                   "72 yo M with shortness of breath.\nVitals: HR 135, SpO2 88.")
    score = m.score(input_ids=ids, overrides=overrides)
    out = export_adapter(m, score.trace, tmp_path / "frozen")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["peft_type"] == "LORA" and cfg["target_modules"]
    peft_logits = _peft_logits(path.parent / "base", out, ids)
    assert torch.allclose(peft_logits, score.logits, atol=1e-4), (peft_logits - score.logits).abs().max()
    # The adapter is not a no-op: the base alone differs.
    base = AutoModelForCausalLM.from_pretrained(path.parent / "base").eval()
    with torch.inference_mode():
        plain = base(input_ids=torch.tensor([ids])).logits[0]
    assert (plain - score.logits).abs().max() > 1e-3


def test_router_weights_export_and_refusals(demo, tmp_path):
    path, m = demo
    ids = m.encode("List the lab results.")
    # An override on the last layer only: the router at that layer reads the hidden state entering it, which the
    # override has not touched yet, so the router's own weights are those of a run without overrides on every layer.
    last = m.num_layers - 1
    ov = Overrides(groups={"task": 1.0}, experts={"bullets": 1.0}, layers=(last, last))
    routed = m.score(input_ids=ids, overrides=ov)
    plain = m.score(input_ids=ids)
    assert np.abs(routed.trace.effective_weights[last] - plain.trace.effective_weights[last]).max() > 0.05
    np.testing.assert_allclose(routed.trace.router_effective_weights, plain.trace.effective_weights, atol=1e-6)
    # use="router" freezes the router's own weights, so the overridden run exports the plain routing.
    out = export_adapter(m, routed.trace, tmp_path / "router", use="router")
    w = np.array(json.loads((out / "atmoe_routing.json").read_text())["effective_weights"])
    np.testing.assert_allclose(w, plain.trace.effective_weights, atol=1e-6)
    assert torch.allclose(_peft_logits(path.parent / "base", out, ids), plain.logits, atol=1e-4)
    used = export_adapter(m, routed.trace, tmp_path / "used")  # and "used" exports the overridden one
    assert torch.allclose(_peft_logits(path.parent / "base", used, ids), routed.logits, atol=1e-4)
    assert (routed.logits - plain.logits).abs().max() > 1e-3
    token = m.route("List the labs.", granularity="token")
    with pytest.raises(ValueError, match="sequence-level"):
        export_adapter(m, token, tmp_path / "bad")
    with pytest.raises(ValueError, match="use must be"):
        export_adapter(m, routed.trace, tmp_path / "bad", use="both")
    assert not (tmp_path / "bad").exists()
