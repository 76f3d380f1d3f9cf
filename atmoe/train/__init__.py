"""Training: JSONL data and its encoding (`data.py`), one LoRA expert (`expert.py`), a grouped router over a
manifest's experts, optionally co-adapting the experts with it (`router.py`). Each runs as
`python -m atmoe.train.<name>` (or `atmoe train-expert|train-router`)."""
