"""What `tests/test_distributed.py` launches: `atmoe.train.router.main` / `atmoe.train.expert.main`, as
`python -m atmoe.train.router` runs them, instrumented for the test only.

    torchrun --standalone --nproc_per_node 2 tests/dist_worker.py router --manifest ... (the module's own flags)

$ATMOE_TEST_RECORD (a folder): each process appends to `calls-<rank>.jsonl` one line per training forward (the data
rows it trained on, router only), one per output it writes and, with --shard-base, the base elements it holds.
$ATMOE_TEST_CRASH_AT=k: the k-th forward raises, as a killed run would stop. `kill_while_writing_checkpoint` stops a
run in-process inside a checkpoint write (`test_train_*.py`).
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import torch

from atmoe.train import distributed as train_distributed
from atmoe.train import expert as train_expert
from atmoe.train import router as train_router


def _recorder(folder: Path):
    path = folder / f"calls-{os.environ.get('RANK', '0')}.jsonl"

    def record(entry: dict) -> None:
        with path.open("a") as f:
            f.write(json.dumps(entry) + "\n")
    return record


def instrument(folder: Path, crash_at: int = 0) -> None:
    """Patch the training modules: record rows and writes to `folder`, raise at the `crash_at`-th forward."""
    record = _recorder(folder)
    encode, collate, forward = train_router.encode_dataset, train_router._Collator.__call__, \
        train_router.RouterTrainingModule.forward
    save_router, save_expert = train_router.save_router, train_expert.save_expert
    calls = []

    def encode_with_ids(*args, **kwargs):
        features, n = encode(*args, **kwargs)
        for i, f in enumerate(features):
            f["row"] = i
        return features, n

    def collate_with_ids(self, features):
        return {**collate(self, features), "row": torch.tensor([f["row"] for f in features])}

    def recording_forward(self, *args, row: torch.Tensor, **kwargs):
        calls.append(1)
        if len(calls) == crash_at:
            raise RuntimeError(f"simulated kill at forward {crash_at}")
        record({"rows": row.tolist()})
        return forward(self, *args, **kwargs)

    def recording(name, save):
        def wrapped(*args, **kwargs):
            record({"write": name})
            return save(*args, **kwargs)
        return wrapped

    shard_base = train_distributed.shard_base

    def recording_shard(model):
        out = shard_base(model)
        record({"base_share": list(train_distributed.base_share(model))})
        return out

    train_distributed.shard_base = recording_shard
    train_router.encode_dataset = encode_with_ids
    train_router._Collator.__call__ = collate_with_ids
    train_router.RouterTrainingModule.forward = recording_forward
    train_router.save_router = recording("router", save_router)
    train_expert.save_expert = recording("expert", save_expert)


def kill_while_writing_checkpoint(monkeypatch, nth: int = 2) -> None:
    """Raise (as a kill would stop the run) when the Trainer writes its `nth` trainer_state.json: that checkpoint has
    its weights but no trainer state, and the one before it is not yet rotated away."""
    from transformers.trainer_callback import TrainerState

    saves, original = [], TrainerState.save_to_json

    def killed(self, path):
        saves.append(path)
        if len(saves) == nth:
            raise KeyboardInterrupt(f"simulated kill while writing trainer state {nth}")
        return original(self, path)

    monkeypatch.setattr(TrainerState, "save_to_json", killed)


def main() -> None:
    torch.set_num_threads(1)
    which, argv = sys.argv[1], sys.argv[2:]
    if os.environ.get("ATMOE_TEST_RECORD"):
        instrument(Path(os.environ["ATMOE_TEST_RECORD"]), int(os.environ.get("ATMOE_TEST_CRASH_AT", "0")))
    {"router": train_router.main, "expert": train_expert.main}[which](argv)


if __name__ == "__main__":
    main()
