"""Behaviours users rely on that no other test pinned (issue 20), each checked through the public API on tiny models
so that the test survives rewrites of the code under it. Each one fails on a realistic one-line bug (docs/mutations.md
lists the bugs tried)."""

from __future__ import annotations

import json
import pickle
import shutil
import threading
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from torch.utils._python_dispatch import TorchDispatchMode

from atmoe import ATMoE, GroupedRouter, Overrides
from atmoe.load.files import LoadError
from tiny_models import TARGETS, randomize, save_adapter, tiny_demo, tiny_model, tiny_tokenizer

IDS = torch.tensor([5, 17, 33, 2, 99, 64, 7, 21, 40, 11])
PROMPT = "List the medications as JSON."
NOTE = "72 yo M w/ hx HTN c/o SOB. HR 88, BP 142/90."

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def router_like(m: ATMoE, seed: int = 0, **changes) -> GroupedRouter:
    """A trained (random) router for `m` with some config fields changed (mode, temperature, pooling)."""
    return randomize(GroupedRouter(replace(m.router.config, **changes)), seed)


@pytest.fixture(scope="module")
def demo(tmp_path_factory) -> ATMoE:
    """The tiny demo (Llama, tokenizer, 6 experts in 3 groups, trained softmax router)."""
    return ATMoE.load(tiny_demo(tmp_path_factory.mktemp("pinned")), device="cpu")


def three_groups(tmp_path: Path, mode: str, **lora) -> tuple[ATMoE, list[tuple]]:
    """A tiny Llama with one expert in each of three groups (a, b, c); `lora` goes to the first expert's config."""
    base = tiny_model("llama")
    specs = []
    for i, g in enumerate("abc"):
        path = save_adapter(base, tmp_path / f"e{i}", TARGETS["llama"], r=4, alpha=8, seed=10 + i,
                            **(lora if i == 0 else {}))
        specs.append((g, f"e{i}", path, ""))
    return ATMoE.from_experts(tiny_model("llama"), None, specs, router_mode=mode), specs


# ------------------------------------------------------------------ merge=True

def test_merge_leaves_the_base_weights_as_they_were_and_a_concurrent_unmerged_call_gets_its_own_answer(demo):
    before = {n: p.detach().clone() for n, p in demo.model.named_parameters()}
    plain = demo.generate(PROMPT, input=NOTE, max_new_tokens=8)
    plain_logits = demo.score(PROMPT).logits
    merged = demo.generate(PROMPT, input=NOTE, max_new_tokens=8, merge=True)
    assert merged.path == "merged" and plain.path == "folded"
    assert merged.token_ids == plain.token_ids
    after = dict(demo.model.named_parameters())
    changed = [n for n, p in before.items() if not torch.equal(p, after[n])]
    assert not changed, changed[:5]
    # An unmerged call after a merged one computes what it computed before (nothing merged is left in use).
    assert torch.equal(demo.score(PROMPT).logits, plain_logits)
    assert demo.generate(PROMPT, input=NOTE, max_new_tokens=8).token_ids == plain.token_ids
    # The experts change the answer here, so a merged weight leaking into an unmerged call would show.
    off = demo.score(PROMPT, overrides=Overrides(disabled=demo.experts)).logits
    assert (off - plain_logits).abs().max() > 1e-3

    # Concurrent: one thread decodes merged with an override, another scores unmerged; each gets its solo answer.
    ov = Overrides(groups={"style": 0.0})
    solo_merged = demo.generate(PROMPT, input=NOTE, max_new_tokens=8, merge=True, overrides=ov).token_ids
    results: dict[str, list] = {"merged": [], "plain": []}
    errors: list[BaseException] = []

    def run(kind: str) -> None:
        try:
            for _ in range(6):
                if kind == "merged":
                    g = demo.generate(PROMPT, input=NOTE, max_new_tokens=8, merge=True, overrides=ov)
                    results[kind].append(g.token_ids)
                else:
                    results[kind].append(demo.score(PROMPT).logits)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(k,)) for k in ("merged", "plain", "merged", "plain")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    assert all(ids == solo_merged for ids in results["merged"])
    assert all(torch.equal(lg, plain_logits) for lg in results["plain"])


class _CountMatmuls(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.n = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ in ("mm", "addmm", "bmm", "baddbmm", "matmul", "linear"):
            self.n += 1
        return func(*args, **(kwargs or {}))


def test_gpt2_conv1d_generation_says_which_path_ran_and_merge_gives_the_same_tokens(tmp_path):
    tok = tiny_tokenizer()
    base = tiny_model("gpt2", vocab_size=len(tok))
    specs = [(g, f"e{i}", save_adapter(base, tmp_path / f"e{i}", TARGETS["gpt2"], r=4, alpha=8, seed=10 + i), "")
             for i, g in enumerate(("task", "task", "style"))]
    m = ATMoE.from_experts(tiny_model("gpt2", vocab_size=len(tok)), tok, specs)
    randomize(m.router)
    runs = {}
    for merge in (False, True):
        with _CountMatmuls() as count:
            g = m.generate(PROMPT, input=NOTE, max_new_tokens=10, merge=merge)
        runs[merge] = (g, count.n)
    (plain, plain_mm), (merged, merged_mm) = runs[False], runs[True]
    assert plain.path == "folded" and not plain.merged
    assert merged.path in ("merged", "folded") and merged.merged == (merged.path == "merged")
    assert merged.token_ids == plain.token_ids
    # The path reported is the path that ran: a merged decode step is one GEMM per projection group, the fused
    # one two, so merged decoding launches fewer matmuls; a decode reported as not merged launches as many.
    if merged.path == "merged":
        assert merged_mm < plain_mm, (merged_mm, plain_mm)
    else:
        assert merged_mm == plain_mm, (merged_mm, plain_mm)
    # Merging applies to batch 1 with sequence routing only; token routing says it ran per row.
    tokenwise = m.generate(PROMPT, input=NOTE, max_new_tokens=4, merge=True, granularity="token")
    assert tokenwise.path == "rows" and not tokenwise.merged


# ------------------------------------------------------------------ overrides with a call's own router

@pytest.mark.parametrize("model_mode, call_mode", [("softmax", "sigmoid"), ("sigmoid", "softmax")])
def test_override_rule_follows_the_router_passed_to_the_call(tmp_path, model_mode, call_mode):
    m, _ = three_groups(tmp_path, model_mode)
    randomize(m.router, seed=1)
    router = router_like(m, seed=2, mode=call_mode)
    tr = m.score(input_ids=IDS, overrides=Overrides(groups={"a": 0.3}), router=router).trace
    own, used = tr.router_group_weights, tr.group_weights
    np.testing.assert_allclose(used[:, 0], 0.3, atol=1e-6)
    if call_mode == "sigmoid":   # independent gates: the others keep the router's gate, nothing renormalises
        np.testing.assert_allclose(used[:, 1:], own[:, 1:], atol=1e-6)
        assert np.abs(used.sum(1) - 1).max() > 1e-3
    else:                        # a shared budget: the free groups share 1 − 0.3 in proportion to the router's α
        np.testing.assert_allclose(used[:, 1:], 0.7 * own[:, 1:] / own[:, 1:].sum(1, keepdims=True), atol=1e-6)
        np.testing.assert_allclose(used.sum(1), 1.0, atol=1e-6)
    # The budget check follows the call's router too: 0.6 + 0.6 is refused only where the groups share a budget.
    too_much = Overrides(groups={"a": 0.6, "b": 0.6})
    if call_mode == "softmax":
        with pytest.raises(ValueError):
            m.score(input_ids=IDS, overrides=too_much, router=router)
    else:
        np.testing.assert_allclose(m.score(input_ids=IDS, overrides=too_much, router=router).trace
                                   .group_weights[:, :2], 0.6, atol=1e-6)


# ------------------------------------------------------------------ routing temperature

@pytest.mark.parametrize("pooling", ["mean", "attention"])
def test_explain_is_exact_and_matches_the_routing_at_a_temperature_other_than_one(demo, pooling):
    hot = router_like(demo, seed=3, mode="sigmoid", pooling=pooling, temperature=2.0)
    cold = GroupedRouter(replace(hot.config, temperature=1.0))
    cold.load_state_dict(hot.state_dict())
    ex = demo.explain(PROMPT, input=NOTE, router=hot)
    # Σ_tokens contribution + bias = logit, for every layer and head (relative and raw alike).
    sums = ex.contributions.groupby(["layer", "level", "name"])[["contribution", "raw"]].sum()
    logits = ex.logits.set_index(["layer", "level", "name"]).loc[sums.index]
    np.testing.assert_allclose(sums.contribution + logits.bias, logits.logit, atol=1e-5)
    np.testing.assert_allclose(sums.raw + logits.raw_bias, logits.raw_logit, atol=1e-5)
    # The logits explained are the ones the routing used: σ(gate logit) = α, softmax within a group = β.
    tr = ex.trace
    groups = ex.logits[ex.logits.level == "group"].pivot(index="layer", columns="name", values="raw_logit")
    np.testing.assert_allclose(1 / (1 + np.exp(-groups[tr.groups].to_numpy())), tr.group_weights, atol=1e-5)
    experts = ex.logits[ex.logits.level == "expert"].pivot(index="layer", columns="name", values="raw_logit")
    for g in tr.groups:
        cols = [e for e, eg in zip(tr.experts, tr.expert_groups) if eg == g]
        z = experts[cols].to_numpy()
        beta = np.exp(z - z.max(1, keepdims=True))
        np.testing.assert_allclose(beta / beta.sum(1, keepdims=True),
                                   tr.expert_weights[:, [tr.experts.index(e) for e in cols]], atol=1e-5)
    # τ = 2 halves every logit of τ = 1 at layer 0 (same parameters, same hidden state entering it).
    ex1 = demo.explain(PROMPT, input=NOTE, router=cold)
    z2, z1 = (e.logits[e.logits.layer == 0].raw_logit.to_numpy() for e in (ex, ex1))
    np.testing.assert_allclose(z2, z1 / 2, atol=1e-5)
    assert np.abs(z1).max() > 0.1
    # Routing (not only the explanation) uses τ: the layer-0 gates are σ(z/2), not σ(z).
    np.testing.assert_allclose(demo.route(PROMPT, input=NOTE, router=hot).group_weights[0],
                               1 / (1 + np.exp(-z1[:len(ex.trace.groups)] / 2)), atol=1e-5)


# ------------------------------------------------------------------ `last` pooling

def test_last_pooling_reads_the_last_instruction_token(demo):
    last = router_like(demo, seed=4, pooling="last")

    def layer0(instruction: str, note: str = NOTE) -> np.ndarray:
        # The hidden state entering layer 0 is the token's embedding: the routing there depends only on which
        # token was read.
        tr = demo.route(instruction, input=note, router=last)
        return np.concatenate([tr.router_group_weights[0], tr.router_expert_weights[0]])

    tok = demo.tokenizer
    a, b, c = "Summarize this case.", "List the medications as JSON.", "Summarize this case?"
    ids = {s: tok(s, add_special_tokens=False)["input_ids"] for s in (a, b, c)}
    assert ids[a][-1] == ids[b][-1] and ids[a][0] != ids[b][0] and ids[a][-2] != ids[b][-2]   # same last token only
    assert ids[a][:-1] == ids[c][:-1] and ids[a][-1] != ids[c][-1]                      # all but the last alike
    # Every earlier token changed, the last kept: the same routing at layer 0 …
    np.testing.assert_allclose(layer0(a), layer0(b), atol=1e-6)
    # … and only the last changed: another routing (the note, the template's end and earlier tokens are alike).
    assert np.abs(layer0(a) - layer0(c)).max() > 1e-3
    # The note after the instruction is not read.
    np.testing.assert_allclose(layer0(a), layer0(a, "Labs: Na 128, K 4.1."), atol=1e-6)


# ------------------------------------------------------------------ loading

def test_manifest_paths_may_not_reach_a_sibling_folder_sharing_the_prefix(tmp_path):
    demo_dir = tiny_demo(tmp_path / "demo").parent
    sibling = tmp_path / "demo-x"
    shutil.copytree(demo_dir / "experts" / "labs", sibling / "labs")
    shutil.copy(demo_dir / "router.safetensors", sibling / "router.safetensors")
    manifest = json.loads((demo_dir / "experts.json").read_text())
    ATMoE.load(demo_dir / "experts.json", device="cpu")    # the manifest as written loads

    def load_with(**change) -> None:
        m = json.loads(json.dumps(manifest))
        if "expert" in change:
            m["groups"][0]["experts"][0]["path"] = change["expert"]
        if "router" in change:
            m["router"] = change["router"]
        (demo_dir / "experts.json").write_text(json.dumps(m))
        ATMoE.load(demo_dir / "experts.json", device="cpu")

    for change in ({"expert": "../demo-x/labs"}, {"router": "../demo-x/router.safetensors"}):
        with pytest.raises(LoadError, match="escapes"):
            load_with(**change)


class _TouchWhenUnpickled:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self):
        return Path.touch, (self.path,)


def test_a_pickle_beside_the_safetensors_is_never_unpickled(tmp_path, monkeypatch):
    manifest = tiny_demo(tmp_path / "demo")
    expert = manifest.parent / "experts" / "labs"
    marker = tmp_path / "unpickled"
    (expert / "adapter_model.bin").write_bytes(pickle.dumps(_TouchWhenUnpickled(marker)))   # leaves a trace if read
    torch.save({"x": torch.zeros(1)}, expert / "adapter_model.pt")
    calls: list[str] = []

    def refuse(name):
        def f(*args, **kwargs):
            calls.append(name)
            marker.touch()
            raise AssertionError(f"{name} was called while loading experts")
        return f

    for obj, name in ((pickle, "load"), (pickle, "loads"), (pickle, "Unpickler"), (torch, "load")):
        monkeypatch.setattr(obj, name, refuse(f"{obj.__name__}.{name}"))
    m = ATMoE.load(manifest, device="cpu")
    assert not calls and not marker.exists()
    assert "labs" in m.experts
    # Without the safetensors file the pickle is named and refused, still never opened.
    (expert / "adapter_model.safetensors").unlink()
    with pytest.raises(LoadError, match="pickle"):
        ATMoE.load(manifest, device="cpu")
    assert not calls


def test_peft_rank_and_alpha_patterns_load_exactly(tmp_path):
    m, specs = three_groups(tmp_path, "softmax", rank_pattern={"v_proj": 2}, alpha_pattern={"o_proj": 32})
    cfg = json.loads((specs[0][2] / "adapter_config.json").read_text())
    assert cfg["rank_pattern"] and cfg["alpha_pattern"]
    randomize(m.router)
    ours = m.score(input_ids=IDS, overrides=Overrides(groups={"a": 1.0}, experts={"e0": 1.0})).logits
    ref = PeftModel.from_pretrained(tiny_model("llama"), specs[0][2]).eval()
    with torch.no_grad():
        theirs = ref(input_ids=IDS[None]).logits[0]
        base = tiny_model("llama")(input_ids=IDS[None]).logits[0]
    assert (theirs - base).abs().max().item() > 1e-2      # the expert really changes the output
    assert (ours - theirs).abs().max().item() <= 1e-4


# ------------------------------------------------------------------ dashboard

def test_no_free_path_box_without_the_launch_flag_built_demo_or_not(monkeypatch, tmp_path):
    import sys

    from app_session import SCRIPT, new_page

    from app.service import DEFAULT_MANIFESTS

    monkeypatch.chdir(tmp_path)                       # no assets/ here: the demo is not built
    monkeypatch.delenv("ATMOE_MANIFEST", raising=False)

    def page(*args: str):
        monkeypatch.setattr(sys, "argv", [SCRIPT, *args])
        return new_page()

    def free_boxes(at) -> list:
        return [t for t in (*at.text_input, *at.sidebar.text_input) if t.key == "manifest_path"]

    at = page()
    assert any("make assets" in e.value for e in at.error) and not free_boxes(at)
    assert free_boxes(page("--allow-any-manifest"))   # the flag (local use) is what adds it
    tiny_demo(Path(next(iter(DEFAULT_MANIFESTS.values()))).parent)   # now the default demo is built
    at = page()
    assert not at.error and not free_boxes(at)
    assert free_boxes(page("--allow-any-manifest"))
