"""atmoe — AT-MoE: grouped LoRA experts routed layer by layer (arXiv 2410.10896).

The path of one request, file by file (the top level of the package is that path, and nothing else):

    prompt    tokens.py   tokens, and which of them spell the instruction
    → router  router.py   at each decoder layer, group weights α and within-group weights β over the experts of a
                          `GroupLayout` (layout.py), from the hidden state pooled over the instruction;
                          overrides.py fixes any of them
    → fused   fused.py    each wrapped projection adds Σ_e α·β · s_e·B_e·A_e·x
    → call    call.py     this call's own state carries w = α·β from the router to the fused layers; nothing
                          stays on the shared model
    → trace   trace.py    what the router proposed and what was used, per layer: a `RoutingTrace`
                          (explain.py: why the router chose it; generation.py: the decode loop's settings and sampling)

model.py (`ATMoE`) is the public API that runs this path: route, score, generate, stream.

Around the path, each in its folder:

    load/      what a request runs on: the base model (base.py), the expert manifest (manifest.py), the LoRA
               experts wrapped into the decoder layers (experts.py), crash-safe file reads and writes (files.py)
    train/     JSONL data (data.py), one LoRA expert (expert.py), a grouped router, optionally co-adapting the
               experts with it (router.py)
    analysis/  the controllability curve (sweep.py) and a routing frozen into one PEFT adapter (export.py)
    cli.py     the `atmoe` command (cliargs.py: dataclass → argparse)

The demo (`demo/` beside this package: clinical suite, build, evaluation) is a client like the dashboard (`app/`):
the engine never imports it, and `pip install atmoe` does not ship it.

    from atmoe import ATMoE, Overrides
    m = ATMoE.load("assets/coadapted/experts.json")
    out = m.generate("List the lab results in plain words", input=note, overrides=Overrides(groups={"style": 0.0}))
    out.text, out.trace.to_frame()
"""

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
