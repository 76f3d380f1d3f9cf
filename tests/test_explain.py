"""Word attribution of routing decisions (`atmoe.explain`): the per-token contributions plus the bias are the
router's logits, exactly, in every mode and pooling, and those logits give the weights the trace reports."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from tiny_models import tiny_demo

from atmoe import ATMoE
from atmoe.explain import _words
from atmoe.model import encode_prompt, new_router

PROMPT = "List the vital signs. Flag each as low, normal or high."
NOTE = "72 yo M. Vitals: HR 135, SpO2 88."


@pytest.fixture(scope="module")
def m(tmp_path_factory, one_torch_thread) -> ATMoE:
    return ATMoE.load(tiny_demo(tmp_path_factory.mktemp("explain")), device="cpu")


def _router(m: ATMoE, **config):
    router = new_router(m, **config)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in router.parameters():
            p.normal_(0, 0.5)
    router.trained = True
    return router


def _softmax(z: np.ndarray) -> np.ndarray:
    e = np.exp(z - z.max(-1, keepdims=True))
    return e / e.sum(-1, keepdims=True)


def _weights(mode: str, zg: np.ndarray, ze: np.ndarray, slices) -> tuple[np.ndarray, np.ndarray]:
    """The router docstring's α [L, G], β [L, E] from its logits."""
    if mode == "flat":
        w = _softmax(ze)
        alpha = np.stack([w[:, s].sum(-1) for s in slices], -1)
        return alpha, w / np.concatenate([alpha[:, [g]].repeat(s.stop - s.start, 1) for g, s in enumerate(slices)], 1)
    alpha = _softmax(zg) if mode == "softmax" else 1 / (1 + np.exp(-zg))
    return alpha, np.concatenate([_softmax(ze[:, s]) for s in slices], -1)


def _table(ex, level: str, column: str, names: list[str]) -> np.ndarray:
    """[L, K] one column of `ex.logits`."""
    rows = ex.logits[ex.logits.level == level]
    return rows.pivot(index="layer", columns="name", values=column)[names].to_numpy()


@pytest.mark.parametrize("pooling", ["mean", "last", "attention"])
@pytest.mark.parametrize("reads", ["instruction", "prompt"])
@pytest.mark.parametrize("mode", ["softmax", "sigmoid", "flat"])
def test_contributions_add_up_to_the_routers_logits_and_weights(m, mode, reads, pooling):
    router = _router(m, mode=mode, reads=reads, pooling=pooling)
    ex = m.explain(PROMPT, input=NOTE, router=router)
    c = ex.contributions
    key = ["layer", "level", "name"]
    terms = ex.logits.set_index(key)
    for part, bias, logit in (("raw", "raw_bias", "raw_logit"), ("contribution", "bias", "logit")):
        summed = c.groupby(key)[part].sum().reindex(terms.index) + terms[bias]
        assert np.allclose(summed, terms[logit], atol=1e-5, rtol=0), (part, (summed - terms[logit]).abs().max())

    # The logits are the router's: its weights, recomputed from them, are the trace's router weights — both the
    # trace of the explained pass and that of a plain `route` (keeping the layer inputs changes nothing).
    slices = list(m.layout.slices)
    groups_used = mode != "flat"
    zg = _table(ex, "group", "raw_logit", m.groups) if groups_used else None
    ze = _table(ex, "expert", "raw_logit", m.experts)
    alpha, beta = _weights(mode, zg, ze, slices)
    plain = m.route(PROMPT, input=NOTE, router=router)
    for trace in (ex.trace, plain):
        assert np.allclose(alpha, trace.router_group_weights, atol=1e-5)
        assert np.allclose(beta, trace.router_expert_weights, atol=1e-5)
    assert not np.allclose(beta, beta[:, :1])   # random heads: the weights are not uniform, the test can fail

    # Relative (shift-invariant) logits give the same softmax; sigmoid gates stay absolute.
    assert ex.relative == ({"expert": True} if mode == "flat" else {"group": mode == "softmax", "expert": True})
    z_rel = _table(ex, "expert", "logit", m.experts)
    assert np.allclose(_weights(mode, zg, z_rel, slices)[1], beta, atol=1e-5)
    if groups_used:
        zg_rel = _table(ex, "group", "logit", m.groups)
        assert np.allclose(_weights(mode, zg_rel, ze, slices)[0], alpha, atol=1e-5)
        assert np.allclose(zg_rel, zg) == (mode == "sigmoid")
    else:
        assert "group" not in set(c.level) and all(t.startswith("expert:") for t in ex.targets)

    # The tokens explained are the ones the router reads.
    encoded = encode_prompt(m, PROMPT, NOTE)
    span = range(*encoded.instruction) if reads == "instruction" else range(len(encoded.ids))
    assert ex.token_positions == list(span)
    if reads == "instruction":
        assert " ".join(ex.words) == PROMPT   # word pieces merged back into the instruction's words
    if pooling == "attention":   # each group's weights over the tokens read, summing to 1 at every layer
        att = ex.attention
        assert set(att.token) == set(span) and np.allclose(att.groupby(["layer", "group"]).weight.sum(), 1)
        assert np.allclose(ex.attention_by_word().sum(1), 1) and list(ex.attention_by_word().index) == m.groups
    else:
        assert ex.attention is None
        with pytest.raises(ValueError, match="no attention weights"):
            ex.attention_by_word()
    per_token = c.groupby("token").raw.apply(lambda s: s.abs().sum())
    if pooling == "last":
        assert (per_token.drop(span[-1]) == 0).all() and per_token[span[-1]] > 0
    else:
        assert (per_token > 0).all() and per_token.nunique() == len(per_token)


def test_layers_words_and_targets(m):
    router = _router(m)
    ex = m.explain(PROMPT, router=router, layers=[1, 3])
    assert sorted(set(ex.contributions.layer)) == [1, 3] == sorted(set(ex.logits.layer))
    target = f"expert:{m.experts[0]}"
    matrix = ex.word_matrix(target)
    assert list(matrix.index) == [1, 3] and matrix.shape[1] == len(ex.words)
    rows = ex.contributions[(ex.contributions.name == m.experts[0]) & (ex.contributions.layer == 3)]
    assert np.isclose(matrix.loc[3].sum(), rows.contribution.sum())
    words = ex.by_word(target, (3, 3))
    assert list(words.text) == ex.words and np.allclose(words.contribution, matrix.loc[3])
    assert ex.targets == [f"group:{g}" for g in m.groups] + [f"expert:{e}" for e in m.experts]
    # Other prompts, other contributions (hidden states differ): the attribution depends on the words.
    other = m.explain("Summarize this case in one line.", router=router, layers=[3])
    assert not np.allclose(other.logits.raw_logit, ex.logits[ex.logits.layer == 3].raw_logit)
    with pytest.raises(ValueError, match="layers"):
        m.explain(PROMPT, layers=[m.num_layers])
    with pytest.raises(ValueError, match="choose one of"):
        ex.word_matrix("expert:nope")


def test_word_pieces_merge_into_words():
    labels = ["Li", "st", " the", " ", "v", "ital", ",", " ", "", "é", "<|im_end|>", "x"]
    special = [False] * 10 + [True, False]
    word_of, words = _words(labels, special)
    assert words == ["List", "the", "vital,", "é", "<|im_end|>", "x"]
    assert word_of == [0, 0, 1, 2, 2, 2, 2, 3, 3, 3, 4, 5]
