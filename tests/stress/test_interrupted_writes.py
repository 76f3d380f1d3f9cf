"""kill -9 a process while it writes, then check the destination: the previous complete version or the new complete
one, never a partial one; leftovers may exist but only under hidden names ('.'-prefixed), never under the final name.

One helper process (kill_writer.py) imports torch once and forks a writer per round, so each kill costs milliseconds.
"""

from __future__ import annotations

import json
import os
import queue
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

from safetensors.torch import load_file

from atmoe.load import base
from atmoe.load.files import read_safetensors
from atmoe.router import load_router

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from kill_writer import JSON_CHARS, PART_BYTES, PARTS, ROUTER  # noqa: E402

ROUNDS = 3
KINDS = ["json", "router", "directory", "adapter", "export", "cache"]


class Writer:
    """The helper process, with its stdout read by a thread into a queue (so every wait has a timeout)."""

    def __init__(self) -> None:
        env = {**os.environ, "OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}
        self.proc = subprocess.Popen([sys.executable, str(HERE / "kill_writer.py")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True, env=env)
        self.lines: queue.Queue[str] = queue.Queue()
        threading.Thread(target=lambda: [self.lines.put(x.strip()) for x in self.proc.stdout], daemon=True).start()
        assert self.next(120) == "ready"

    def next(self, timeout: float = 60) -> str:
        line = self.lines.get(timeout=timeout)
        assert not line.startswith("error"), line
        return line

    def kill_mid_write(self, kind: str, dest: Path, first: int, rng: random.Random) -> list[int]:
        """Start a writer, let it finish one write, kill -9 it at a random moment; returns the versions it finished."""
        self.proc.stdin.write(f"{kind} {dest} {first}\n")
        self.proc.stdin.flush()
        pid = int(self.next().split()[1])
        done = [int(self.next().split()[1])]  # one complete version exists before the kill
        t0 = time.perf_counter()
        done.append(int(self.next().split()[1]))  # time one full write, then kill somewhere inside the next
        time.sleep(rng.uniform(0, time.perf_counter() - t0))
        os.kill(pid, signal.SIGKILL)
        while not (line := self.next()).startswith("exit"):
            done.append(int(line.split()[1]))
        assert os.WIFSIGNALED(int(line.split()[1]))
        return done

    def close(self) -> None:
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


def loaded_version(kind: str, dest: Path) -> int | None:
    """Load the destination the way its reader would; return the version it holds (None: absent)."""
    if kind == "json":
        d = json.loads(dest.read_text())
        assert len(d["payload"]) == JSON_CHARS
        return d["version"]
    if kind == "router":
        router = load_router(dest, expected=ROUTER)
        v = router.norm_weight[0, 0].item()
        assert (router.norm_weight == v).all()
        return int(v)
    if kind == "directory":
        v = json.loads((dest / "version.json").read_text())["version"]
        for i in range(PARTS):
            assert (dest / f"part{i}.bin").read_bytes() == bytes([v % 256]) * PART_BYTES
        return v
    if kind == "adapter":
        tensors, _ = read_safetensors(dest / "adapter_model.safetensors", "adapter")
        values = {float(t.flatten()[0]) for t in tensors.values()}
        assert len(values) == 1 and all(bool((t == t.flatten()[0]).all()) for t in tensors.values())
        assert json.loads((dest / "adapter_config.json").read_text())["r"] == 32
        assert json.loads((dest / "atmoe_expert.json").read_text())["name"] == "killed"
        return int(values.pop())
    if kind == "export":  # export_adapter: weights, config and routing record must come from the same export
        tensors, meta = read_safetensors(dest / "adapter_model.safetensors", "exported adapter")
        routing = json.loads((dest / "atmoe_routing.json").read_text())
        assert json.loads(meta["weights"]) == routing["effective_weights"] and tensors
        assert json.loads((dest / "adapter_config.json").read_text())["peft_type"] == "LORA"
        return round(routing["overrides"]["groups"]["task"] * 1000)
    if kind == "cache":
        final = dest / base.CACHE_NAME
        if not final.exists():
            return None  # a stale cache is removed before its rebuild; the next load converts again
        marker = json.loads((final / base.MARKER).read_text())
        load_file(final / "model.safetensors")
        json.loads((final / "config.json").read_text())
        json.loads((final / "tokenizer.json").read_text())
        return marker["size"] - 10
    raise ValueError(kind)


def test_kill_9_mid_write_never_leaves_a_partial_file(tmp_path: Path):
    rng = random.Random(0)
    writer = Writer()
    stats: Counter = Counter()
    try:
        for kind in KINDS:
            folder = tmp_path / kind
            folder.mkdir()
            dest = folder / ("state.json" if kind == "json" else "router.safetensors" if kind == "router" else
                             "cache" if kind == "cache" else "out")
            for r in range(ROUNDS):
                done = writer.kill_mid_write(kind, dest, first=100 * r + 1, rng=rng)
                v = loaded_version(kind, dest)
                stats[kind, "kills"] += 1
                if v is None:
                    stats[kind, "absent (stale cache removed)"] += 1
                else:
                    assert v in (done[-1], done[-1] + 1), f"{kind}: loaded version {v}, writer finished {done}"
                    stats[kind, "new" if v == done[-1] + 1 else "previous"] += 1
                parent = dest if kind == "cache" else folder
                final_name = base.CACHE_NAME if kind == "cache" else dest.name
                stray = [p.name for p in parent.iterdir() if p.name not in (final_name, "source.gguf")]
                assert all(name.startswith(".") for name in stray), stray
                stats[kind, "hidden leftovers after the last kill"] = len(stray)
    finally:
        writer.close()
    print(f"\nkill -9 mid-write: {sorted(stats.items())}")
    assert sum(n for (k, what), n in stats.items() if what == "kills") == ROUNDS * len(KINDS)
