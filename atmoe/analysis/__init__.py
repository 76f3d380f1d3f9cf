"""Built on the request path: the controllability curve (`sweep.py`) and one routing frozen into a plain PEFT adapter
(`export.py`)."""
