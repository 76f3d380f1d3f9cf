"""Helper process for test_interrupted_writes.py (not a test): imports once, then forks one writer per request.

stdin:  "<kind> <destination> <first version>" per line.
stdout: "ready" once; per request "pid <child>", the child's "v <n>" after each complete write, then "exit <status>"
        once the test has killed it. The child writes versions n, n+1, ... forever, so a kill lands mid-write.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

sys.path[:0] = [str(Path(__file__).resolve().parents[2]), str(Path(__file__).resolve().parents[1])]

from atmoe.load import base  # noqa: E402
from atmoe.load.files import atomic_directory, atomic_write_json  # noqa: E402
from atmoe.router import GroupedRouter, RouterConfig, save_router  # noqa: E402

ROUTER = RouterConfig(groups=["a", "b"], experts=["e0", "e1", "e2"], expert_groups=["a", "a", "b"], num_layers=64,
                      hidden_size=8192)  # ~12 MB per checkpoint
PARTS, PART_BYTES, JSON_CHARS = 4, 2_000_000, 2_000_000


def say(line: str) -> None:
    os.write(1, (line + "\n").encode())  # one write per line: the server and its child share the pipe


def writes(kind: str, dest: Path):
    """Yield after each complete write of the next version."""
    if kind == "json":
        while True:
            v = yield
            atomic_write_json(dest, {"version": v, "payload": "x" * JSON_CHARS})
    elif kind == "router":
        router = GroupedRouter(ROUTER)
        router.trained = True
        while True:
            v = yield
            router.norm_weight.data.fill_(v)
            save_router(router, dest)
    elif kind == "directory":
        while True:
            v = yield
            with atomic_directory(dest) as tmp:
                for i in range(PARTS):
                    (tmp / f"part{i}.bin").write_bytes(bytes([v % 256]) * PART_BYTES)
                (tmp / "version.json").write_text(json.dumps({"version": v}))
    elif kind == "adapter":
        from tiny_models import tiny_llama, tiny_tokenizer
        from peft import LoraConfig, get_peft_model

        from atmoe.train.expert import ExpertTrainConfig, TrainResult, save_expert
        lora = LoraConfig(r=32, lora_alpha=32, target_modules=["q_proj", "v_proj", "up_proj", "down_proj"])
        model = get_peft_model(tiny_llama(len(tiny_tokenizer()), hidden_size=256, layers=4), lora)
        cfg = ExpertTrainConfig(name="killed", group="task", data="unused.jsonl", out=str(dest),
                                description="kill test", dtype_out="float32")
        while True:
            v = yield
            for name, p in model.named_parameters():
                if "lora_" in name:
                    p.data.fill_(v)
            save_expert(TrainResult(model, [1.0], 1, 0), cfg, base="tiny")
    elif kind == "export":
        from tiny_models import tiny_demo

        from atmoe import ATMoE
        from atmoe.analysis.export import export_adapter
        demo = dest.parent.parent / "export_demo"
        if not (demo / "experts.json").exists():
            tiny_demo(demo)
        m = ATMoE.load(demo / "experts.json", device="cpu")
        while True:
            v = yield
            export_adapter(m, m.route("Summarize this case.", {"groups": {"task": v / 1000}}), dest)
    elif kind == "cache":
        from tiny_models import tiny_llama, tiny_tokenizer
        tok = tiny_tokenizer()
        model = tiny_llama(len(tok), hidden_size=256, layers=4)
        gguf = dest.parent / "source.gguf"
        os.environ["ATMOE_CACHE"] = str(dest)
        base.embedded_gguf_path = lambda: gguf
        base._load_gguf = lambda path: (model, tok)
        while True:
            v = yield
            gguf.write_bytes(b"x" * (10 + v))  # a new source: the cache is stale and gets rebuilt
            base.ensure_embedded_cache()
    else:
        raise ValueError(kind)


def child(kind: str, dest: Path, first: int, server: int) -> None:
    gen = writes(kind, dest)
    next(gen)
    v = first
    while os.getppid() == server:  # stop if the server (and so the test) is gone
        gen.send(v)
        say(f"v {v}")
        v += 1


def main() -> None:
    say("ready")
    for line in sys.stdin:
        kind, dest, first = line.split()
        pid = os.fork()
        if pid == 0:
            try:
                child(kind, Path(dest), int(first), os.getppid())
            except BaseException as e:  # noqa: BLE001 - reported to the test
                say(f"error {type(e).__name__}: {e}")
            os._exit(1)
        say(f"pid {pid}")
        _, status = os.waitpid(pid, 0)
        say(f"exit {status}")


if __name__ == "__main__":
    main()
