"""The demo's command line: the engine's commands on the shipped model, plus the demo's build and evaluation.

    python -m demo route "List the lab results. Flag each as low, normal or high." --input "Labs: Na 128, K 4.1."
    python -m demo generate "List the vital signs." --input "Vitals: HR 132, SpO2 88." --override style=0
    python -m demo sweep "List the vital signs." --input "..." --target group:style --reference "- HR 135"
    python -m demo build [--quick] ...    rebuild the shipped demo from scratch (`make assets`; demo/build.py)
    python -m demo eval ...               the evaluation table on the held-out instructions (demo/evaluate.py)
    python -m demo probe ...              the hand-set layer-profile probe (demo/probe.py)

route, generate and sweep are `atmoe`'s (atmoe/cli.py) with two demo choices: the model is `--manifest`, else
`$ATMOE_MANIFEST`, else the shipped one (`config.SHIPPED_MANIFEST`, what the dashboard opens too), and
`sweep --reference` scores each step by the demo's line F1 and exact match (`metrics.py`).
"""

from __future__ import annotations

import importlib
import sys

from atmoe import cli

from .config import REPO, SHIPPED_MANIFEST
from .metrics import score

COMMANDS = {"build": "demo.build", "eval": "demo.evaluate", "probe": "demo.probe"}   # each with its own parser


def reference_scores(text: str, reference: str) -> dict[str, float]:
    return score(text, {"output": reference})


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(__doc__)
        return 0
    if argv[0] in COMMANDS:
        importlib.import_module(COMMANDS[argv[0]]).main(argv[1:])
        return 0
    return cli.main(argv, prog="python -m demo", default_manifest=str(REPO / SHIPPED_MANIFEST),
                    reference_scorer=reference_scores)


if __name__ == "__main__":
    sys.exit(main())
