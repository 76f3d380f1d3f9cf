"""AT-MoE performance benchmarks: every number is a ratio of peers timed in the same process, interleaved.

    python -m bench.run [--device cpu|cuda] [--model smollm2|qwen2.5-0.5b|qwen2.5-1.5b|tiny] [--quick] [--only ...]
"""
