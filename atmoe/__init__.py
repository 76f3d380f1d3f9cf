"""atmoe — AT-MoE: grouped LoRA experts routed layer by layer (arXiv 2410.10896)."""
