"""Loading what a request runs on: the base model (`base.py`), the expert manifest (`manifest.py`), the LoRA experts
wrapped into the base's decoder layers (`experts.py`), and crash-safe file reads and writes (`files.py`)."""
