"""Section "flops": the arithmetic the experts add to the base, computed (not timed), as the floor under the timings.

A multiply-add is 2 FLOPs. Per token and decoder layer the base does 2·P (P: the weights of the layer's Linear
modules) plus attention 4·H·d·c over a context of c keys (scores and values; a causal prefill of T tokens averages
c = (T + 1) / 2); the LM head adds 2·D·V once per sequence in a prefill (logits_to_keep=1) and per token in a decode.
The experts add, per token and layer:
  floor        Σ over projections and experts of 2·r·(I + O): each expert's shrink and expand, nothing else;
  as launched  Σ over projection groups of 2·R_g·(I + O_g): the engine's expand Bᵀ [R_g, O_g] is dense
               block-diagonal over a group's projections (q/k/v; gate/up), so a group multiplies its zero blocks too;
  router       2·T·D (pooling) + 2·D·(G + E) (one head) per layer, once per prompt.
`merge=True` adds nothing per decode token; its merge is a one-off 2·R_g·O_g·I per group and call.
Time ratios below these floors are impossible where the run is compute-bound; a memory-bound decode reads the
experts' bytes instead, in the same proportion.
"""

from __future__ import annotations

from typing import Any

from torch import nn

from atmoe.load.experts import decoder_layers


def base_costs(model: nn.Module) -> dict[str, float]:
    """Per-layer Linear weights (P), attention width (H·d), hidden size, LM head weights, layer count."""
    _, layers = decoder_layers(model)
    cfg = model.config.get_text_config()
    linear = sum(m.weight.numel() for layer in layers for m in layer.modules() if isinstance(m, nn.Linear))
    heads = cfg.num_attention_heads
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
    return dict(layers=len(layers), linear_per_layer=linear / len(layers), attention_width=heads * head_dim,
                hidden=cfg.hidden_size, lm_head=model.get_output_embeddings().weight.numel())


def expert_costs(m: Any) -> dict[str, float]:
    """Per token and layer (averaged over layers): the experts' floor and as-launched FLOPs, merge FLOPs per call."""
    floor = launched = merge = 0.0
    for layer in m.state.layers:
        for group in layer.groups:
            I, O, R = group.stacked.shape[1], group.num_out, group.num_rank
            launched += 2 * R * (I + O)
            merge += 2 * R * O * I
            for f in group.members:
                floor += 2 * f.lora_A.shape[0] * (f.in_features + f.out_features)
    L = m.num_layers
    return dict(floor_per_layer=floor / L, launched_per_layer=launched / L, merge_per_call=merge,
                groups=len(m.router.config.groups), experts=len(m.experts))


def _ratios(base_flops: float, extra: dict[str, float]) -> dict[str, float]:
    return {k: (base_flops + v) / base_flops for k, v in extra.items()}


def flops(ctx: Any) -> dict:
    b, e = base_costs(ctx.base), expert_costs(ctx.atmoe)
    L, D = b["layers"], b["hidden"]
    rows = []
    for T in sorted({t for _, t in ctx.prefill_grid}):
        base = T * L * (2 * b["linear_per_layer"] + 4 * b["attention_width"] * (T + 1) / 2) + 2 * b["lm_head"]
        router = L * (2 * T * D + 2 * D * (e["groups"] + e["experts"]))
        extra = dict(floor=T * L * e["floor_per_layer"], launched=T * L * e["launched_per_layer"] + router,
                     merged=T * L * e["launched_per_layer"] + router + e["merge_per_call"])
        rows.append(dict(phase="prefill", tokens=T, base_flops=base, extra_flops=extra, ratio=_ratios(base, extra)))
    context = ctx.cfg.decode_prompt + ctx.cfg.new_tokens // 2   # the mean context of the timed steps
    base = L * (2 * b["linear_per_layer"] + 4 * b["attention_width"] * context) + 2 * b["lm_head"]
    extra = dict(floor=L * e["floor_per_layer"], launched=L * e["launched_per_layer"], merged=0.0)
    rows.append(dict(phase="decode", context=context, base_flops=base, extra_flops=extra, ratio=_ratios(base, extra),
                     tokens_per_s_ceiling={k: 1 / v for k, v in _ratios(base, extra).items()}))
    ctx.log("FLOP floor: " + ", ".join(f"{r['phase']} {r.get('tokens', r.get('context'))} "
                                       f"{r['ratio']['floor']:.3f}/{r['ratio']['launched']:.3f}" for r in rows))
    return dict(rows=rows, base=b, experts=e,
                unit="FLOPs per sequence (prefill, batch 1) or per token (decode); ratio = (base + extra) ÷ base: "
                     "floor = the experts' own shrink and expand; launched = as the engine's grouped GEMMs do it "
                     "(dense block-diagonal expand) plus the router; merged = launched plus the one-off merge "
                     "(prefill) or nothing (decode)")
