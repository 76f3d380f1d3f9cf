"""AT-MoE performance benchmarks: every timing is a ratio of peers run in the same process, interleaved, against the
pristine base (the same checkpoint loaded by transformers, never wrapped), beside the launches per decoder layer and
the FLOP floor of the experts. See docs/performance.md.

    python -m bench.run [--device cpu|cuda] [--model smollm2|qwen2.5-0.5b|qwen2.5-1.5b|tiny] [--quick]
                        [--only flops,launches,prefill,decode,scaling,memory,train] [--compile reduce-overhead]
    bench/gpu.sh        # issue 21's GPU check on a fresh CUDA machine (random-init Qwen2.5-1.5B, bf16)
"""
