"""atmoe — AT-MoE: grouped LoRA experts routed layer by layer (arXiv 2410.10896).

The path of one request, file by file (the top level of the package is that path, and nothing else):

    prompt    tokens.py   tokens, and which of them spell the instruction
    → router  router.py   at each decoder layer, group weights α and within-group weights β over the experts of a
                          `GroupLayout` (layout.py), from the hidden state pooled over the instruction;
                          overrides.py fixes any of them
    → call    call.py     the call's routing as values (the router's head, the overrides as tensors, what is read)
    → state   state.py    the model's workspace the call holds while it runs: the router step at every decoder
                          layer, in tensors at fixed addresses (one graph, no host sync); released afterwards
    → fused   fused.py    each projection group launches [W0; A] and one expand with w = α·β folded into Bᵀ:
                          W0·x + Σ_e α·β · s_e·B_e·A_e·x
    → trace   trace.py    what the router proposed and what was used, per layer: a `RoutingTrace`
                          (explain.py: why the router chose it; generation.py: the decode loop's settings and sampling)

model.py (`ATMoE`) is the public API that runs this path: route, score, generate, stream, explain; training and call
plumbing are functions beside it (new_call, forward_routed, new_router, ...).

Around the path, each in its folder:

    load/      what a request runs on: the base model (base.py), the expert manifest (manifest.py), the LoRA
               experts wrapped into the decoder layers (experts.py), crash-safe file reads and writes (files.py)
    train/     JSONL data (data.py), one LoRA expert (expert.py), a grouped router, optionally co-adapting the
               experts with it (router.py); checkpoints, launch and FSDP2 sharding (checkpoints.py, launch.py,
               distributed.py)
    analysis/  controllability curves (sweep.py), a routing frozen into one PEFT adapter (export.py), what each
               expert wrote (attribution.py), word-deletion checks (counterfactual.py), routing exports and the
               atlas over data sets (routes.py, atlas.py)
    cli.py     the `atmoe` command (cliargs.py: dataclass → argparse)

The demo (`demo/` beside this package: clinical suite, build, evaluation) is a client like the dashboard (`app/`):
the engine never imports it, and `pip install atmoe` does not ship it.

    from atmoe import ATMoE, Overrides
    m = ATMoE.load("assets/coadapted/experts.json")
    out = m.generate("List the lab results in plain words", input=note, overrides=Overrides(groups={"style": 0.0}))
    out.text, out.trace.to_frame()
"""

import logging

# bitsandbytes, imported by peft and transformers, warns at import on a CPU with AVX512-BF16 that its optional fused
# 4-bit kernel (downloaded from the Hub by the `kernels` package) is missing. It is not needed, and a bad input must
# still be one line on stderr: a handler here stops Python's last-resort print; a user's own logging still sees it.
logging.getLogger("bitsandbytes.backends.cpu.ops").addHandler(logging.NullHandler())

from .analysis.export import export_adapter
from .explain import Explanation
from .generation import GenerationSettings
from .layout import GroupLayout
from .model import ATMoE, Generation, Score
from .overrides import Overrides
from .router import GroupedRouter, RouterConfig
from .trace import RoutingTrace

__all__ = ["ATMoE", "Explanation", "Generation", "GenerationSettings", "export_adapter", "GroupedRouter",
           "GroupLayout", "Overrides", "RouterConfig", "RoutingTrace", "Score"]
