"""A deterministic synthetic medical instruction suite for AT-MoE experts and routers.

Seven experts in three groups (see ``GROUPS``); :func:`write_suite` writes per-expert
training sets, complex router-training instructions and a held-out eval split;
:func:`score_example` scores a model's answer automatically.
"""

from atmoe.medical.cases import EXPERT_DESCRIPTIONS, GROUPS, Case, compose, note, sample_case
from atmoe.medical.generator import (
    HELDOUT_COMBOS,
    TRAIN_COMBOS,
    complex_rows,
    expert_rows,
    write_suite,
)
from atmoe.medical.metrics import SCORERS, score_example

__all__ = [
    "EXPERT_DESCRIPTIONS", "GROUPS", "HELDOUT_COMBOS", "SCORERS", "TRAIN_COMBOS", "Case", "complex_rows",
    "compose", "expert_rows", "note", "sample_case", "score_example", "write_suite",
]
