"""Sampling follows its settings: temperature reshapes the distribution, top_p → 0 is greedy, the seed matters.

`decode` is driven by a fake forward that returns the same logits for every row, so one step over many rows is many
independent draws from one distribution; then the tiny demo model checks that `generate` hands the settings down.
"""

from __future__ import annotations


import numpy as np
import pytest
import torch
from tiny_models import tiny_demo

from atmoe import ATMoE
from atmoe.generation import GenerationSettings, decode

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LOGITS = torch.tensor([2.0, 1.0, 0.0, -1.0, 0.5])   # distinct values: one greedy token (index 0)
ROWS = 20_000                                         # draws per distribution: frequency s.d. ≤ 0.0036
PROMPT = "List the lab results. Use bullet points."


def _draw(temperature: float, top_p: float = 1.0, seed: int = 0, rows: int = ROWS) -> np.ndarray:
    """One decode step over `rows` identical rows → the sampled token of each row."""
    def forward(input_ids, **_):
        B = input_ids.shape[0]
        return LOGITS.expand(B, 1, -1)

    ids = torch.zeros(rows, 1, dtype=torch.long)
    settings = GenerationSettings(max_new_tokens=1, temperature=temperature, top_p=top_p, seed=seed)
    (token,) = list(decode(forward, ids, torch.ones_like(ids), settings, eos_ids={99}, pad_id=0))
    return token.numpy()


@pytest.mark.parametrize("temperature", [0.5, 1.0, 1.5])
def test_sampled_distribution_is_softmax_of_logits_over_temperature(temperature):
    freq = np.bincount(_draw(temperature), minlength=len(LOGITS)) / ROWS
    expected = (LOGITS / temperature).softmax(-1).numpy()
    np.testing.assert_allclose(freq, expected, atol=0.015)
    if temperature != 1.0:  # the check can tell temperatures apart
        assert np.abs(LOGITS.softmax(-1).numpy() - expected).max() > 0.06


def test_temperature_changes_the_draws_for_the_same_seed():
    assert (_draw(1.5, seed=3) != _draw(1.0, seed=3)).mean() > 0.1


@pytest.mark.parametrize("seed", range(5))
def test_top_p_near_zero_is_greedy_whatever_the_seed(seed):
    assert (_draw(1.5, top_p=1e-9, seed=seed, rows=2_000) == int(LOGITS.argmax())).all()
    assert (_draw(1.5, seed=seed, rows=2_000) != int(LOGITS.argmax())).any()  # without top_p it samples


def test_top_p_keeps_the_smallest_set_over_p():
    # softmax(LOGITS): 0.55, 0.20, 0.07, 0.03, 0.12 → top_p 0.7 keeps tokens 0 and 1 only, renormalised.
    p = LOGITS.softmax(-1).numpy()
    freq = np.bincount(_draw(1.0, top_p=0.7), minlength=len(LOGITS)) / ROWS
    np.testing.assert_allclose(freq, [p[0] / (p[0] + p[1]), p[1] / (p[0] + p[1]), 0, 0, 0], atol=0.015)


# ---------------------------------------------------------------- through ATMoE.generate

@pytest.fixture(scope="module")
def model(tmp_path_factory) -> ATMoE:
    return ATMoE.load(tiny_demo(tmp_path_factory.mktemp("sampling")), device="cpu")


def test_generate_hands_temperature_and_top_p_to_the_sampler(model):
    greedy = model.generate(PROMPT, max_new_tokens=8).token_ids
    assert len(greedy) >= 4
    for seed in range(4):
        assert model.generate(PROMPT, max_new_tokens=8, temperature=1.5, top_p=1e-9, seed=seed).token_ids == greedy
    hot = model.generate(PROMPT, max_new_tokens=8, temperature=1.5, seed=0).token_ids
    warm = model.generate(PROMPT, max_new_tokens=8, temperature=1.0, seed=0).token_ids
    assert hot != warm
    assert hot == model.generate(PROMPT, max_new_tokens=8, temperature=1.5, seed=0).token_ids  # seeded
