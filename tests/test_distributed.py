"""Router and expert training across processes: `torchrun --nproc_per_node 2` (gloo, CPU) against one process.

Two processes with `batch_size` B each must take the one-process step on the same 2B rows: same rows per step (each
process its own half), same losses, same weights after the run, the same number of optimiser steps, one output
written (by the main process), and a killed run relaunched continues from its checkpoint. The processes are real
(`tests/dist_worker.py` runs the modules' own `main`, recording rows and writes).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from demo.suite import complex_rows, expert_rows
from tiny_models import tiny_demo

ROOT = Path(__file__).resolve().parents[1]
WORKER = ROOT / "tests" / "dist_worker.py"
# Two processes against one: the same arithmetic summed in another order, so only fp32 rounding may differ.
WEIGHT_TOL = 1e-4
LOSS_TOL = 1e-4


def _launch(which: str, n: int, args: list[str], record: Path, crash_at: int = 0) -> subprocess.CompletedProcess:
    record.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT),
           "ATMOE_TEST_RECORD": str(record), "ATMOE_TEST_CRASH_AT": str(crash_at)}
    launcher = [sys.executable] if n == 1 else [sys.executable, "-m", "torch.distributed.run", "--standalone",
                                                 f"--nproc_per_node={n}"]
    proc = subprocess.Popen([*launcher, str(WORKER), which, *args], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out, err = proc.communicate(timeout=600)
    except subprocess.TimeoutExpired:
        proc.terminate()  # SIGTERM: torchrun stops its workers (a SIGKILL would leave them running)
        out, err = proc.communicate(timeout=60)
        raise AssertionError(f"{which} × {n} timed out:\n{err[-4000:]}") from None
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


def _ok(proc: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def _calls(record: Path, rank: int) -> list[dict]:
    path = record / f"calls-{rank}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def _rows(record: Path, rank: int) -> list[list[int]]:
    return [c["rows"] for c in _calls(record, rank) if "rows" in c]


def _writes(record: Path, rank: int) -> list[str]:
    return [c["write"] for c in _calls(record, rank) if "write" in c]


def _log(router: Path) -> list[dict]:
    return [json.loads(line) for line in router.with_suffix(".log.jsonl").read_text().splitlines()]


def _steps(log: list[dict]) -> list[int]:
    return [e["step"] for e in log if "loss" in e]


def _max_diff(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str = "") -> float:
    """Largest |a − b| over every tensor; printed with `what` (pytest -s shows the measured tolerances)."""
    assert a.keys() == b.keys()
    d = max(float((a[k].float() - b[k].float()).abs().max()) for k in a)
    if what:
        print(f"measured: {what} max |Δ| = {d:.2e}")
    return d


@pytest.fixture(scope="module")
def work(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dist")
    tiny_demo(root / "demo", trained=False)
    for name, rows in (("router24", complex_rows(24, seed=0, off_topic=0.2)),
                       ("router23", complex_rows(23, seed=1, off_topic=0.2)),
                       ("labs", expert_rows("labs", 24, seed=0))):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def _router_args(work: Path, data: str, out: str, batch_size: int) -> list[str]:
    # balance and aux weights at 1: a term averaged the wrong way across processes would move the weights visibly
    return ["--manifest", str(work / "demo" / "experts.json"), "--data", str(work / data), "--out", str(work / out),
            "--no-update-manifest", "--steps", "6", "--batch-size", str(batch_size), "--lr", "2e-2",
            "--max-length", "480", "--logging-steps", "1", "--save-steps", "3", "--aux-weight", "1",
            "--balance-weight", "1"]


@pytest.fixture(scope="module")
def router_runs(work: Path) -> tuple[Path, Path]:
    """The same 6 steps on 24 rows: one process × 4 rows, two processes × 2 rows."""
    _ok(_launch("router", 1, _router_args(work, "router24.jsonl", "one/router.safetensors", 4), work / "rec1"))
    two = _ok(_launch("router", 2, _router_args(work, "router24.jsonl", "two/router.safetensors", 2), work / "rec2"))
    (work / "two.stderr").write_text(two.stderr)
    return work / "one" / "router.safetensors", work / "two" / "router.safetensors"


def _same_steps(work: Path, one: Path, record: Path, two: Path, what: str) -> float:
    """Assert the two-process run (`record`, router `two`) took the one-process run's steps (`rec1`, `one`): each
    step the two halves of its batch, the same losses; returns the routers' max |Δ| (printed with `what`)."""
    single, ranks = _rows(work / "rec1", 0), [_rows(record, r) for r in (0, 1)]
    assert len(single) == len(ranks[0]) == len(ranks[1]) == 6
    for rows, r0, r1 in zip(single, *ranks):
        assert not set(r0) & set(r1) and sorted(r0 + r1) == sorted(rows)
    # the same losses (step 1: the same weights, so the global normalisation alone decides) and the same weights
    log1, log2 = _log(one), _log(two)
    assert _steps(log1) == _steps(log2) == [1, 2, 3, 4, 5, 6]
    for key in ("loss", "lm_loss", "aux_loss"):
        a, b = [e[key] for e in log1 if key in e], [e[key] for e in log2 if key in e]
        assert max(abs(x - y) for x, y in zip(a, b)) < LOSS_TOL * max(map(abs, a)), (key, a, b)
    return _max_diff(load_file(one), load_file(two), what)


def test_two_processes_take_the_one_process_steps(work: Path, router_runs: tuple[Path, Path]) -> None:
    one, two = router_runs
    assert _same_steps(work, one, work / "rec2", two, "router, 2 processes vs 1") < WEIGHT_TOL


def test_only_the_main_process_writes(work: Path, router_runs: tuple[Path, Path]) -> None:
    _, two = router_runs
    assert _writes(work / "rec2", 0) == ["router"] and _writes(work / "rec2", 1) == []
    assert sorted(p.name for p in two.parent.iterdir()) == ["router.log.jsonl", "router.safetensors"]
    assert "find_unused_parameters=True" not in (work / "two.stderr").read_text()  # no needless graph traversal


@pytest.fixture(scope="module")
def shard_run(work: Path) -> Path:
    """Two processes, one epoch of 23 rows (not divisible by the world size)."""
    _ok(_launch("router", 2, _router_args(work, "router23.jsonl", "shard/router.safetensors", 2), work / "rec3"))
    return work / "shard" / "router.safetensors"


def test_each_process_trains_on_its_own_shard(work: Path, shard_run: Path) -> None:
    r0, r1 = _rows(work / "rec3", 0), _rows(work / "rec3", 1)
    assert len(r0) == len(r1) == 6  # even_batches: both processes take every step
    for a, b in zip(r0, r1):
        assert len(a) == len(b) == 2 and not set(a) & set(b)
    seen = [i for step in r0 + r1 for i in step]
    assert sorted(set(seen)) == list(range(23))  # none lost
    # one row twice: accelerate completes the last, short batch with the epoch's first row so the processes stay in step
    assert len(seen) == 24 and seen.count(r0[0][0]) == 2 and r1[-1][-1] == r0[0][0]


def test_a_killed_two_process_run_resumes_at_its_checkpoint(work: Path, shard_run: Path) -> None:
    args = _router_args(work, "router23.jsonl", "resumed/router.safetensors", 2)
    crashed = _launch("router", 2, args, work / "rec4", crash_at=5)
    assert crashed.returncode != 0 and "simulated kill" in crashed.stderr
    assert [p.name for p in (work / "resumed" / "router.checkpoints").iterdir()] == ["checkpoint-3"]
    assert not (work / "resumed" / "router.safetensors").exists()
    _ok(_launch("router", 2, args, work / "rec5"))
    full = [_rows(work / "rec3", r) for r in (0, 1)]
    for r in (0, 1):  # the relaunch trains steps 4-6 only, on the rows the uninterrupted run used there
        assert _rows(work / "rec5", r) == full[r][3:]
    assert _steps(_log(work / "resumed" / "router.safetensors")) == [1, 2, 3, 4, 5, 6]
    assert _max_diff(load_file(work / "resumed" / "router.safetensors"), load_file(shard_run),
                     "router, killed and resumed vs uninterrupted") < WEIGHT_TOL
    assert not (work / "resumed" / "router.checkpoints").exists()


def test_expert_training_two_processes_match_one(work: Path) -> None:
    def args(out: str, batch_size: int) -> list[str]:
        return ["--name", "labs", "--group", "task", "--data", str(work / "labs.jsonl"), "--out", str(work / out),
                "--base", str(work / "demo" / "base"), "--steps", "4", "--batch-size", str(batch_size), "--lr", "1e-2",
                "--logging-steps", "1", "--save-steps", "0", "--max-length", "192", "--dtype-out", "float32",
                "--targets", "q_proj", "v_proj"]

    _ok(_launch("expert", 1, args("e1", 4), work / "rec6"))
    two = _ok(_launch("expert", 2, args("e2", 2), work / "rec7"))
    assert "find_unused_parameters=True" not in two.stderr
    assert _writes(work / "rec7", 0) == ["expert"] and _writes(work / "rec7", 1) == []
    losses = [[json.loads(line)["loss"] for line in (work / e / "train_log.jsonl").read_text().splitlines()]
              for e in ("e1", "e2")]
    assert len(losses[0]) == len(losses[1]) == 4
    assert max(abs(a - b) for a, b in zip(*losses)) < LOSS_TOL * max(losses[0])
    w1, w2 = (load_file(work / e / "adapter_model.safetensors") for e in ("e1", "e2"))
    assert _max_diff(w1, w2, "expert, 2 processes vs 1") < WEIGHT_TOL


def test_coadaptation_two_processes_match_one(work: Path) -> None:
    """Stage 2 under DDP: the experts' pairs are parameters of the wrapped module, so their gradients are averaged
    like the router's; the main process alone writes experts, router and manifest."""
    def args(out: str, batch_size: int) -> list[str]:
        return [*_router_args(work, "router24.jsonl", f"{out}/router.safetensors", batch_size), "--mode", "sigmoid",
                "--train-experts", "--expert-lr", "1e-2", "--experts-out", str(work / out), "--experts-dtype",
                "float32"]

    _ok(_launch("router", 1, args("co1", 4), work / "rec8"))
    two = _ok(_launch("router", 2, args("co2", 2), work / "rec9"))
    assert "find_unused_parameters=True" not in two.stderr
    assert _writes(work / "rec9", 0) == ["router"] and _writes(work / "rec9", 1) == []
    assert _steps(_log(work / "co1" / "router.safetensors")) == _steps(_log(work / "co2" / "router.safetensors"))
    assert _max_diff(load_file(work / "co1" / "router.safetensors"), load_file(work / "co2" / "router.safetensors"),
                     "co-adapted router, 2 processes vs 1") < WEIGHT_TOL
    source = load_file(work / "demo" / "experts" / "labs" / "adapter_model.safetensors")
    for name in ("labs", "flags", "plain"):
        w1, w2 = (load_file(work / d / "experts" / name / "adapter_model.safetensors") for d in ("co1", "co2"))
        assert _max_diff(w1, w2, f"co-adapted expert {name}, 2 processes vs 1") < WEIGHT_TOL, name
    assert _max_diff(load_file(work / "co1" / "experts" / "labs" / "adapter_model.safetensors"), source) > 1e-3


def _bad_data(work: Path) -> Path:
    bad = work / "bad.jsonl"
    bad.write_text((work / "router24.jsonl").read_text().splitlines()[0] + "\n\n" + '{"instruction": "x", \n')
    return bad


def test_a_malformed_row_under_torchrun_is_one_line_once(work: Path) -> None:
    """Bare torchrun: the main process says `<file>: line N: why` once, the other is silent, no worker prints a
    traceback, the launch fails. (torchrun's own ChildFailedError report follows: a worker exited non-zero; no worker
    can silence it — see the next test for the launch that avoids it.)"""
    bad = _bad_data(work)
    args = ["--manifest", str(work / "demo" / "experts.json"), "--data", str(bad), "--out", str(work / "bad" / "r")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
                           "atmoe.train.router", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    line = f"atmoe train-router: error: {bad}: line 3: invalid JSON (Expecting property name enclosed in double quotes)"
    assert proc.returncode != 0
    assert proc.stderr.splitlines().count(line) == 1 and proc.stderr.count(str(bad)) == 1, proc.stderr[-3000:]
    assert "atmoe/" not in "".join(x for x in proc.stderr.splitlines() if x.lstrip().startswith("File "))


def test_a_malformed_row_with_nproc_per_node_is_one_line_and_no_launch(work: Path) -> None:
    """`python -m atmoe.train.router --nproc-per-node 2`: the data is read before torchrun starts any worker, so a bad
    row is the only thing on stderr, and the status is 2 (a refusal)."""
    bad = _bad_data(work)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}
    for module, flags in (("atmoe.train.router", ["--manifest", str(work / "demo" / "experts.json")]),
                          ("atmoe.train.expert", ["--name", "labs", "--group", "task", "--out", str(work / "bad" / "e"),
                                                  "--base", str(work / "demo" / "base")])):
        proc = subprocess.run([sys.executable, "-m", module, "--nproc-per-node", "2", *flags, "--data", str(bad)],
                              cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
        name = module.rpartition(".")[2]
        assert proc.returncode == 2 and proc.stderr.splitlines() == [
            f"atmoe train-{name}: error: {bad}: line 3: invalid JSON (Expecting property name enclosed in double "
            "quotes)"], proc.stderr[-3000:]


# ---------------------------------------------------------------- FSDP2: the frozen base sharded (distributed.py)

def _shares(record: Path, rank: int) -> list[list[int]]:
    return [c["base_share"] for c in _calls(record, rank) if "base_share" in c]


@pytest.fixture(scope="module")
def sharded_run(work: Path, router_runs: tuple[Path, Path]) -> Path:
    """The 6 steps of `router_runs`, two processes × 2 rows, each holding half the base (FSDP2 per decoder layer),
    with activation checkpointing per decoder layer (the backward recompute re-gathers the layer)."""
    args = [*_router_args(work, "router24.jsonl", "sharded/router.safetensors", 2), "--shard-base",
            "--gradient-checkpointing"]
    proc = _ok(_launch("router", 2, args, work / "rec10"))
    (work / "sharded.stderr").write_text(proc.stderr)
    return work / "sharded" / "router.safetensors"


def test_a_sharded_base_takes_the_one_process_steps(work: Path, router_runs: tuple[Path, Path],
                                                    sharded_run: Path) -> None:
    one, _ = router_runs
    for r in (0, 1):   # each process holds about half of the base's parameters
        [(local, total)] = _shares(work / "rec10", r)
        print(f"measured: rank {r} holds {local}/{total} base elements ({local / total:.3f})")
        assert 0.45 <= local / total <= 0.55
    assert _same_steps(work, one, work / "rec10", sharded_run, "router, sharded base × 2 vs 1 process") <= 1e-5
    assert _writes(work / "rec10", 0) == ["router"] and _writes(work / "rec10", 1) == []
    assert sorted(p.name for p in sharded_run.parent.iterdir()) == ["router.log.jsonl", "router.safetensors"]


def test_a_killed_sharded_run_resumes_to_the_same_router(work: Path, sharded_run: Path) -> None:
    args = [*_router_args(work, "router24.jsonl", "sharded_resumed/router.safetensors", 2), "--shard-base"]
    crashed = _launch("router", 2, args, work / "rec11", crash_at=5)
    assert crashed.returncode != 0 and "simulated kill" in crashed.stderr
    _ok(_launch("router", 2, args, work / "rec12"))
    assert _steps(_log(work / "sharded_resumed" / "router.safetensors")) == [1, 2, 3, 4, 5, 6]
    assert _max_diff(load_file(work / "sharded_resumed" / "router.safetensors"), load_file(sharded_run),
                     "router, sharded: killed and resumed vs uninterrupted") <= 1e-5
