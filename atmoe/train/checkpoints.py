"""Where a relaunched training run resumes: the newest *complete* checkpoint in its checkpoints folder.

The Hugging Face Trainer writes `checkpoint-<step>/` in order — weights, optimizer, scheduler, RNG states — and
`trainer_state.json` last; only then does it delete the previous checkpoint (`save_total_limit`). A run killed between
the two leaves a folder whose trainer state is missing or torn, next to the complete one before it. The Trainer's own
`resume_from_checkpoint=True` picks the highest step regardless and fails on every relaunch
(`FileNotFoundError: …/trainer_state.json`), so both trainers (`expert.py`, `router.py`) resume through
`resume_point` instead:

- by default, a relaunch of the same command resumes: the folder only exists while a run is unfinished (a finished
  run deletes it), so its presence means "this run was stopped" — after a kill, a requeued job, a crash;
- the checkpoint it resumes from is named on stdout, and so is every incomplete one it skips (then removes, so that
  the Trainer's rotation never keeps a stale higher step over a new lower one);
- `--no-resume` starts afresh and removes the old checkpoints for the same reason.

Every process of a data-parallel run calls it and makes the same choice (they read the same folder before the main
process changes it); the main process alone prints and removes.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

from accelerate import PartialState

STATE_FILE = "trainer_state.json"   # transformers' TRAINER_STATE_NAME: the last file a checkpoint gets
_STEP = re.compile(r"^checkpoint-(\d+)$")


def checkpoint_step(folder: Path) -> int | None:
    """The step of a `checkpoint-<step>` folder, None for any other path."""
    match = _STEP.match(folder.name)
    return int(match.group(1)) if match and folder.is_dir() else None


def is_complete(folder: Path) -> bool:
    """Whether the Trainer finished writing this checkpoint: its trainer state is there, whole, and of this step."""
    try:
        state = json.loads((folder / STATE_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return isinstance(state, dict) and state.get("global_step") == checkpoint_step(folder)


def resume_point(checkpoints: str | Path, resume: bool = True) -> Path | None:
    """The checkpoint to pass to `Trainer.train(resume_from_checkpoint=...)`, or None to start from step 0."""
    root = Path(checkpoints)
    found = sorted((p for p in root.iterdir() if checkpoint_step(p) is not None), key=checkpoint_step) \
        if root.is_dir() else []
    complete = [p for p in found if is_complete(p)]
    start = complete[-1] if resume and complete else None
    # every process has chosen (from the same listing) before the main process removes anything
    state = PartialState()
    state.wait_for_everyone()
    if state.is_main_process:
        for p in found:
            if p == start or (start is not None and p in complete):
                continue   # older complete ones are the Trainer's to rotate
            why = "fresh start (--no-resume)" if not resume else f"incomplete: no whole {STATE_FILE}"
            print(f"skipping checkpoint {p}: {why}; removing it", flush=True)
            shutil.rmtree(p, ignore_errors=True)
        if start is not None:
            print(f"resuming from {start} (step {checkpoint_step(start)})", flush=True)
    state.wait_for_everyone()
    return start


__all__ = ["checkpoint_step", "is_complete", "resume_point"]
