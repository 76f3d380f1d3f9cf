"""atmoe — AT-MoE: grouped LoRA experts routed layer by layer (arXiv 2410.10896).

The path of one request, file by file:

    prompt    data.py     tokens, and which of them spell the instruction
    → router  router.py   at each decoder layer, group weights α and within-group weights β over the experts of a
                          `GroupLayout` (layout.py), from the hidden state pooled over the instruction;
                          overrides.py fixes any of them
    → fused   fused.py    each wrapped projection adds Σ_e α·β · s_e·B_e·A_e·x (experts read by experts.py)
    → call    call.py     this call's own state carries w = α·β from the router to the fused layers; nothing
                          stays on the shared model
    → trace   trace.py    what the router proposed and what was used, per layer: a `RoutingTrace`

model.py (`ATMoE`) is the public API that runs this path: route, score, generate, stream.

    from atmoe import ATMoE, Overrides
    m = ATMoE.load("assets/coadapted/experts.json")
    out = m.generate("List the lab results in plain words", input=note, overrides=Overrides(groups={"style": 0.0}))
    out.text, out.trace.to_frame()
"""

from .explain import Explanation
from .export import export_adapter
from .generation import GenerationSettings
from .layout import GroupLayout
from .model import ATMoE, Generation, Score
from .overrides import Overrides
from .router import GroupedRouter, RouterConfig
from .trace import RoutingTrace

__all__ = ["ATMoE", "Explanation", "Generation", "GenerationSettings", "export_adapter", "GroupedRouter",
           "GroupLayout", "Overrides", "RouterConfig", "RoutingTrace", "Score"]
