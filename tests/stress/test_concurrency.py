"""8 threads share one tiny model, each with its own overrides, router, granularity and seeds, 50 mixed requests
each (score / route / sampled generate, half of the sessions decoding with merged weights). Every result must equal
the same request run alone (0 cross-session leaks), no thread may hang, and memory must stay flat."""

from __future__ import annotations

import gc
import threading
import time

import numpy as np
import pytest
import torch
from tiny_models import tiny_demo

from atmoe import ATMoE
from atmoe.model import new_router

THREADS, REQUESTS = 8, 50
PROMPTS = ["List the lab results.", "List the vital signs. Flag each as low, normal or high.",
           "Give me the lab values. Add the normal range to each. Use bullet points.",
           "Explain K 5.6 in plain language.", "hi"]
SESSIONS = [  # (overrides, router name, granularity)
    (None, None, None),
    ({"groups": {"style": 0.0}}, None, None),
    ({"experts": {"labs": 1.0}, "layers": [0, 1]}, None, None),
    ({"disabled": ["labs", "vitals"]}, None, None),  # the task group off
    ({"groups": {"task": 0.9, "knowledge": 0.05}}, None, "token"),
    (None, "sigmoid", None),
    ({"groups": {"knowledge": 1.0}, "experts": {"flags": 0.25}}, "sigmoid", None),
    ({"disabled": ["plain", "bullets", "flags", "ranges", "labs", "vitals"]}, None, None),  # every expert off
]


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> ATMoE:
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny model: intra-op threads only add contention
    m = ATMoE.load(tiny_demo(tmp_path_factory.mktemp("demo")), device="cpu")
    yield m
    torch.set_num_threads(before)


def requests(session: int, n: int) -> list[tuple]:
    """(session, kind, prompt, seed) — 15 distinct requests per session, repeated."""
    out = []
    for j in range(n):
        kind = ("score", "route", "generate")[j % 3]
        out.append((session, kind, PROMPTS[(session + j) % len(PROMPTS)], 1000 * session + j % 3))
    return out


def run(m: ATMoE, routers: dict, req: tuple) -> tuple:
    session, kind, prompt, seed = req
    overrides, router_name, granularity = SESSIONS[session]
    kw = dict(overrides=overrides, router=routers.get(router_name), granularity=granularity)
    if kind == "score":
        s = m.score(prompt, **kw)
        return s.logits.numpy().copy(), s.trace.effective_weights
    if kind == "route":
        tr = m.route(prompt, **kw)
        return tr.router_effective_weights, tr.effective_weights
    # even sessions decode with per-call merged weights: those copies must stay private to their call too
    g = m.generate(prompt, max_new_tokens=4, temperature=0.9, top_p=0.95, seed=seed, merge=session % 2 == 0, **kw)
    return np.array(g.token_ids), g.trace.effective_weights


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS")) / 1024


def tensors() -> int:
    return sum(1 for o in gc.get_objects() if isinstance(o, torch.Tensor))


def hammer(m: ATMoE, routers: dict, n: int) -> tuple[dict, float]:
    results: dict[int, list] = {k: [] for k in range(THREADS)}
    errors: list[BaseException] = []
    start = threading.Barrier(THREADS)

    def work(k: int) -> None:
        try:
            start.wait(timeout=30)
            for req in requests(k, n):
                results[k].append((req, run(m, routers, req)))
        except BaseException as e:  # noqa: BLE001 - reported by the test
            errors.append(e)

    threads = [threading.Thread(target=work, args=(k,), daemon=True) for k in range(THREADS)]
    t0 = time.perf_counter()
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert not any(t.is_alive() for t in threads), "a request thread hung (deadlock?)"
    assert not errors, errors
    return results, time.perf_counter() - t0


def test_threads_never_see_each_others_sessions(model):
    torch.manual_seed(0)
    routers = {"sigmoid": new_router(model, mode="sigmoid")}
    with torch.no_grad():
        for p in routers["sigmoid"].parameters():
            p.normal_(0, 0.5)
    baseline_threads = threading.active_count()
    solo = {req: run(model, routers, req) for k in range(THREADS) for req in set(requests(k, REQUESTS))}
    # The sessions really differ, so a leak would show.
    firsts = [solo[requests(k, 1)[0]][0] for k in range(THREADS)]
    assert all(not np.array_equal(firsts[0], f) for f in firsts[1:])

    hammer(model, routers, 10)  # warm-up: thread-local caches and allocator arenas settle
    gc.collect()
    rss0, tensors0 = rss_mb(), tensors()
    results, seconds = hammer(model, routers, REQUESTS)
    gc.collect()
    rss1, tensors1 = rss_mb(), tensors()

    mismatches = [req[:2] for k in range(THREADS) for req, got in results[k]
                  if not all(np.array_equal(a, b) for a, b in zip(got, solo[req]))]
    served = sum(len(v) for v in results.values())
    print(f"\nconcurrency: {served} requests in {seconds:.1f} s on {THREADS} threads, {len(mismatches)} mismatches, "
          f"RSS {rss0:.0f} → {rss1:.0f} MB ({rss1 - rss0:+.1f}), tensors {tensors0} → {tensors1}")
    assert served == THREADS * REQUESTS and not mismatches, mismatches[:5]
    assert rss1 - rss0 < 50, f"RSS grew by {rss1 - rss0:.1f} MB over {served} requests"
    assert tensors1 <= tensors0 + 10
    assert threading.active_count() == baseline_threads
