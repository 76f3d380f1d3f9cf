"""How a training module runs as a command: one process, or N processes started by torch's own launcher.

    python -m atmoe.train.router ...                        one process
    python -m atmoe.train.router --nproc-per-node 2 ...     flags and data checked here, then `torchrun --standalone`
    torchrun --nproc-per-node 2 -m atmoe.train.router ...   the same workers, started by hand

A refusal (a bad flag value, a malformed data row, a wrong base: every ValueError) ends the command with one line on
stderr — `<file>: line N: why` for a data row — printed by the main process only (another process speaks only when
the main one had nothing to say), exit status 2. Without this each of N processes prints its own traceback.

Under a bare `torchrun`, torchrun adds its own `ChildFailedError` report whenever a worker exits non-zero, and no
worker can silence it (the launcher prints it after the workers are gone). `--nproc-per-node` avoids it for what can
be checked before any worker starts — the flags and every data row — and then hands over to the same launcher
(`torch.distributed.run`, by `exec`: its exit status and signals are the command's own).
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Callable
from typing import Any, NoReturn

from .data import DataError, load_jsonl

NPROC_FLAG = "--nproc-per-node"
GRACE_S = 10.0


def is_worker() -> bool:
    """Whether this process was started by torchrun / accelerate launch (one of N)."""
    return "LOCAL_RANK" in os.environ


def is_main_process() -> bool:
    """Rank 0, or the only process; read from the launcher's environment, so it holds before (and without) any
    process group."""
    return int(os.environ.get("RANK", "0")) == 0


def refuse(prog: str, error: ValueError) -> NoReturn:
    """End the command on `error`: one line on stderr from the main process, exit status 2 on every process."""
    line = error.one_line() if isinstance(error, DataError) else (str(error).splitlines() or [repr(error)])[0]
    if is_main_process():
        print(f"{prog}: error: {line}", file=sys.stderr, flush=True)
    if is_worker():
        sys.stdout.flush()
        if not is_main_process():
            # the launcher stops every worker as soon as one exits: the others give the main one time to say why,
            # and speak only if it did not (then the fault was theirs alone)
            time.sleep(GRACE_S)
            print(f"{prog}: error (rank {os.environ.get('RANK')}): {line}", file=sys.stderr, flush=True)
        os._exit(2)   # no process-group teardown or atexit output from the workers
    raise SystemExit(2)


def split_nproc(argv: list[str]) -> tuple[int, list[str]]:
    """(`--nproc-per-node N`, the other flags); N is 1 when the flag is absent."""
    rest, n = [], 1
    it = iter(argv)
    for a in it:
        if a == NPROC_FLAG or a.startswith(NPROC_FLAG + "="):
            value = a.partition("=")[2] or next(it, "")
            if not value.isdigit() or int(value) < 1:
                raise ValueError(f"{NPROC_FLAG} must be a whole number ≥ 1, got {value!r}")
            n = int(value)
        else:
            rest.append(a)
    return n, rest


def run_command(prog: str, module: str, argv: list[str] | None, parse: Callable[[list[str]], Any],
                train: Callable[[Any], str]) -> None:
    """Parse `argv` into a config and `train(config)` here; with `--nproc-per-node N > 1` outside a launcher, check the
    config's data instead and `exec` torchrun on `module` with the same flags. `train` returns what the main process
    says on success."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        n, argv = split_nproc(argv)
        cfg = parse(argv)
        if n > 1 and not is_worker():
            load_jsonl(cfg.data)   # a malformed row: one line now, before N processes load the base
            sys.stdout.flush()
            os.execv(sys.executable, [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                      f"--nproc-per-node={n}", "-m", module, *argv])
        said = train(cfg)
    except ValueError as e:   # DataError, LoadError, BaseModelError, a config's __post_init__
        refuse(prog, e)
    if is_main_process():
        print(said)


__all__ = ["is_main_process", "is_worker", "refuse", "run_command", "split_nproc"]
