"""atmoe — AT-MoE: grouped LoRA experts routed layer by layer (arXiv 2410.10896).

    from atmoe import ATMoE, Overrides
    m = ATMoE.load("assets/experts.json")
    out = m.generate("List the lab results in plain words", input=note, overrides=Overrides(groups={"style": 0.0}))
    out.text, out.trace.to_frame()
"""

from .export import export_adapter
from .model import ATMoE, Generation, Score
from .overrides import Overrides
from .router import GroupedRouter, RouterConfig
from .trace import RoutingTrace

__all__ = ["ATMoE", "Generation", "export_adapter", "GroupedRouter", "Overrides", "RouterConfig", "RoutingTrace", "Score"]
