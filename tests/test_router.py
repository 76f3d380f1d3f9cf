"""Each router mode normalises as its docstring says, pinned on a router with non-zero heads.

An untrained router (zero heads) is uniform in every mode, so only random heads tell the modes apart: softmax α sums
to 1, sigmoid gates are independent (their sum is not 1), flat is one softmax over all experts read back per group.
"""

from __future__ import annotations

import pytest
import torch

from atmoe.router import GroupedRouter, RouterConfig, effective_weights

GROUPS = ["task", "knowledge", "style"]
EXPERTS = ["labs", "vitals", "flags", "ranges", "bullets", "plain", "json"]
EXPERT_GROUPS = ["task", "task", "knowledge", "knowledge", "style", "style", "style"]
L, D, B = 3, 16, 8


def _router(mode: str, temperature: float = 1.0) -> GroupedRouter:
    router = GroupedRouter(RouterConfig(GROUPS, EXPERTS, EXPERT_GROUPS, L, D, mode=mode, temperature=temperature))
    torch.manual_seed(0)
    with torch.no_grad():
        for p in router.parameters():
            p.normal_(0, 1.0)
    return router


def _logits(router: GroupedRouter, layer: int, hidden: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The docstring's logits: heads applied to RMSNorm(hidden), divided by τ."""
    x = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6) * router.norm_weight[layer]
    tau = router.config.temperature
    return ((x @ router.group_weight[layer].T + router.group_bias[layer]) / tau,
            (x @ router.expert_weight[layer].T + router.expert_bias[layer]) / tau)


def _slices() -> list[list[int]]:
    return [[i for i, g in enumerate(EXPERT_GROUPS) if g == group] for group in GROUPS]


@pytest.mark.parametrize("mode", ["softmax", "sigmoid", "flat"])
@pytest.mark.parametrize("temperature", [1.0, 2.5])
def test_each_mode_normalises_as_documented(mode, temperature):
    router = _router(mode, temperature)
    torch.manual_seed(1)
    hidden = torch.randn(B, D) * 3
    for layer in range(L):
        with torch.no_grad():
            alpha, beta, fallback = router(layer, hidden)
            g_logits, e_logits = _logits(router, layer, hidden)
        assert alpha.shape == (B, len(GROUPS)) and beta.shape == (B, len(EXPERTS)) and not fallback.any()
        w = effective_weights(router, alpha, beta)
        if mode == "softmax":
            torch.testing.assert_close(alpha, g_logits.softmax(-1))
            torch.testing.assert_close(alpha.sum(-1), torch.ones(B))
        elif mode == "sigmoid":
            torch.testing.assert_close(alpha, g_logits.sigmoid())
            assert (alpha.sum(-1) - 1).abs().max() > 0.1          # independent gates, not a shared budget
        else:
            torch.testing.assert_close(w, e_logits.softmax(-1))   # one softmax over every expert
            torch.testing.assert_close(alpha.sum(-1), torch.ones(B))
            for g, cols in enumerate(_slices()):
                torch.testing.assert_close(alpha[:, g], w[:, cols].sum(-1))  # α[g] = Σ_{e∈g} w
        for g, cols in enumerate(_slices()):                      # β: a softmax within each group, every mode
            torch.testing.assert_close(beta[:, cols].sum(-1), torch.ones(B))
            if mode != "flat":
                torch.testing.assert_close(beta[:, cols], e_logits[:, cols].softmax(-1))
        torch.testing.assert_close(w, alpha[:, router.group_index] * beta)


def test_modes_differ_on_the_same_heads():
    """The same heads give three different α: a mode swapped for another cannot pass unnoticed."""
    hidden = torch.randn(B, D, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        alphas = {mode: _router(mode)(0, hidden)[0] for mode in ("softmax", "sigmoid", "flat")}
    assert (alphas["softmax"] - alphas["sigmoid"]).abs().max() > 0.05
    assert (alphas["softmax"] - alphas["flat"]).abs().max() > 0.05
    assert (alphas["sigmoid"] - alphas["flat"]).abs().max() > 0.05


def test_attention_pooling_gives_each_group_its_own_weighted_mean(tmp_path):
    """Pooling "attention": per layer and group, softmax over the tokens read of q·RMSNorm(h_t); tokens not read
    weigh nothing; a zero query is the masked mean; the group's gate and its experts read the group's vector; the
    queries are saved with the router."""
    from atmoe.router import attention_pool, attention_weights, load_router, pool, save_router

    T = 6
    hidden = torch.randn(B, T, D, generator=torch.Generator().manual_seed(3))
    mask = torch.ones(B, T)
    mask[:, :2] = 0                                       # the first two tokens are not read
    query = torch.randn(len(GROUPS), D, generator=torch.Generator().manual_seed(4))
    a = attention_weights(hidden, mask, query)            # [B, G, T]
    assert a.shape == (B, len(GROUPS), T) and torch.all(a[..., :2] == 0)
    assert torch.allclose(a.sum(-1), torch.ones(B, len(GROUPS)))
    h = hidden * torch.rsqrt(hidden.pow(2).mean(-1, keepdim=True) + 1e-6)
    expected = torch.softmax(torch.einsum("btd,gd->bgt", h[:, 2:], query), -1)
    assert torch.allclose(a[..., 2:], expected, atol=1e-6)
    zero = attention_pool(hidden, mask, torch.zeros_like(query))
    assert torch.allclose(zero, pool(hidden, mask, "mean")[:, None].expand_as(zero), atol=1e-6)

    config = RouterConfig(GROUPS, EXPERTS, EXPERT_GROUPS, L, D, mode="sigmoid", pooling="attention")
    router = GroupedRouter(config)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in router.parameters():
            p.normal_(0, 1.0)
    x = router.pool(1, hidden, mask)                      # [B, G, D]
    assert torch.allclose(x, attention_pool(hidden, mask, router.query[1]))
    zg, ze = router.logits(1, x)
    for g in range(len(GROUPS)):                          # group g's heads read x[:, g] only
        ref_g, ref_e = _logits(router, 1, x[:, g])
        assert torch.allclose(zg[:, g], ref_g[:, g], atol=1e-5)
        for e in _slices()[g]:
            assert torch.allclose(ze[:, e], ref_e[:, e], atol=1e-5)
    loaded = load_router(save_router(router, tmp_path / "attention.safetensors"))
    assert loaded.config.pooling == "attention" and torch.equal(loaded.query, router.query)
