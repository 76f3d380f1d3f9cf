"""Training: JSONL data and its encoding (`data.py`), one LoRA expert (`expert.py`), a grouped router over a
manifest's experts, optionally co-adapting the experts with it (`router.py`). Each runs as
`python -m atmoe.train.<name>` (or `atmoe train-expert|train-router`), alone or as N processes (`launch.py`); a
relaunch resumes from the last complete checkpoint (`checkpoints.py`); `--shard-base` splits the frozen base over the
processes with FSDP2 (`distributed.py`, docs/scale.md)."""
