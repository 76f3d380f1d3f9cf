"""The routing of a whole data set, written for other tools: per-row α and β as `.npy`, a JSONL index, and balance
statistics (how the load spreads over experts and layers).

    export_routes(m, "rows.jsonl", "out/")        # or `atmoe route --dataset rows.jsonl --out out/`

    out/alpha.npy        float16 [N, L, G]   group weights each row used (after overrides)
    out/beta.npy         float16 [N, L, E]   within-group weights (each group's slice sums to 1)
    out/index.jsonl      line i describes row i: row, id, instruction, experts (labels, when the file has them),
                         prompt_tokens, alpha_shape, beta_shape, model, router (hashes); token mode adds
                         tokens, token_start, token_count
    out/balance.json     `balance` of the set (see below)
    out/meta.json        format, groups, experts, layers, granularity, overrides, rows, model_hash, router_hash
    token granularity:   out/token_alpha.npy [ΣT, L, G], out/token_beta.npy [ΣT, L, E] (row i's tokens are
                         token_start … token_start + token_count − 1); alpha/beta.npy then hold the token means

The effective weight of expert e is α[..., group(e)] · β[..., e] (`meta.json`'s expert_groups name the group).

Streaming and resumable: rows are read and routed `batch_size` at a time, and each chunk is written to
`out/shards/` as soon as it is routed (arrays first, then the chunk's index, which marks it complete; each file through
an atomic rename, so a kill leaves no half-written file). A rerun with the same data, model, router and settings
skips the finished chunks; the final files are assembled from the shards on disk one chunk at a time (memory holds one
chunk, not the set) and also written atomically.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from ..fused import FusedLoRA
from ..layout import GroupLayout
from ..load.files import _atomic_file, atomic_write_bytes, atomic_write_json, read_json
from ..overrides import Overrides

if TYPE_CHECKING:
    from ..model import ATMoE

FORMAT = "atmoe-routes-v1"
UNUSED_BELOW = 0.01


# ---------------------------------------------------------------------------------------------- balance statistics
class Balance:
    """Balance statistics accumulated chunk by chunk. `add(alpha [n, L, G], beta [n, L, E])`; `result()`:

        mean_alpha      [L][G]  mean group weight per layer
        mean_weight     [L][E]  mean effective weight w = α·β per layer (the expert's load)
        mean_beta       [L][E]  mean within-group weight
        entropy_alpha   [L]     mean entropy (nats) of α over groups (α normalised to sum 1 first, for sigmoid gates)
        entropy_weight  [L]     mean entropy of w over experts (normalised likewise); log E is uniform
        dominant_share  [L][E]  share of rows where the expert has the largest w at that layer
        dominant_overall [E]    share of rows where it has the largest layer-mean w
        max_mean_ratio  [L]     max over experts of mean_weight ÷ its mean over experts (1 = perfectly balanced;
                                vLLM's expert-load imbalance)
        unused          names whose mean_weight is below `unused_below` on every layer
    """

    def __init__(self, layout: GroupLayout, unused_below: float = UNUSED_BELOW) -> None:
        self.layout, self.unused_below = layout, unused_below
        self.index = np.array(layout.group_index)
        self.n = 0
        self.sums: dict[str, np.ndarray] = {}

    def _acc(self, name: str, value: np.ndarray) -> None:
        self.sums[name] = self.sums.get(name, 0) + value

    def add(self, alpha: np.ndarray, beta: np.ndarray) -> Balance:
        alpha, beta = np.asarray(alpha, np.float64), np.asarray(beta, np.float64)   # [n, L, G], [n, L, E]
        w = alpha[..., self.index] * beta                                         # [n, L, E]
        E = w.shape[-1]
        self.n += len(w)
        self._acc("mean_alpha", alpha.sum(0))
        self._acc("mean_beta", beta.sum(0))
        self._acc("mean_weight", w.sum(0))
        self._acc("entropy_alpha", _entropy(alpha).sum(0))
        self._acc("entropy_weight", _entropy(w).sum(0))
        self._acc("dominant_share", np.eye(E)[w.argmax(-1)].sum(0))                # [L, E]
        self._acc("dominant_overall", np.eye(E)[w.mean(1).argmax(-1)].sum(0))     # [E]
        return self

    def result(self) -> dict[str, Any]:
        if self.n == 0:
            raise ValueError("no rows: nothing to summarise")
        out: dict[str, Any] = {k: (v / self.n) for k, v in self.sums.items()}
        load = out["mean_weight"]
        out["max_mean_ratio"] = load.max(-1) / np.maximum(load.mean(-1), 1e-12)
        unused = [e for i, e in enumerate(self.layout.experts) if (load[:, i] < self.unused_below).all()]
        out = {k: np.round(v, 6).tolist() for k, v in out.items()}
        return {"rows": self.n, "groups": list(self.layout.groups), "experts": list(self.layout.experts),
                "unused_below": self.unused_below, "unused": unused, **out}


def _entropy(p: np.ndarray) -> np.ndarray:
    p = p / np.maximum(p.sum(-1, keepdims=True), 1e-12)
    return -(p * np.log(np.where(p > 0, p, 1.0))).sum(-1)


def balance(alpha: np.ndarray, beta: np.ndarray, layout: GroupLayout, unused_below: float = UNUSED_BELOW
            ) -> dict[str, Any]:
    """The balance statistics (`Balance`) of α [n, L, G] and β [n, L, E]."""
    return Balance(layout, unused_below).add(alpha, beta).result()


# ---------------------------------------------------------------------------------------------- hashes and rows
def _sha(tensors: Iterable[torch.Tensor], extra: str = "") -> str:
    h = hashlib.sha256(extra.encode())
    for t in tensors:
        h.update(t.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def model_hash(m: ATMoE) -> str:
    """A fingerprint of the base configuration, the layer names and every expert's A and B as fused."""
    fused = [mod for mod in m.model.modules() if isinstance(mod, FusedLoRA)]
    config = m.model.config.to_json_string(use_diff=False) if hasattr(m.model.config, "to_json_string") else ""
    return _sha((t for mod in fused for t in (mod.lora_A, mod.lora_B)),
                json.dumps([config, m.layer_names, m.experts, m.groups]))


def router_hash(m: ATMoE) -> str:
    """A fingerprint of the router's configuration and parameters."""
    return _sha((p for _, p in sorted(m.router.state_dict().items())), repr(m.router.config))


def read_rows(path: str | os.PathLike) -> Iterator[dict[str, Any]]:
    """The rows of a JSONL file, one at a time: each an object with a non-empty `instruction` (optional `input`,
    `id`, `experts`). Errors name the line."""
    with open(path, encoding="utf-8-sig") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}: line {n}: not valid JSON ({e.msg})") from None
            if not isinstance(row, dict) or not isinstance(row.get("instruction"), str) or not row["instruction"]:
                raise ValueError(f"{path}: line {n}: expected an object with a non-empty string `instruction`")
            if not isinstance(row.get("input", ""), str):
                raise ValueError(f"{path}: line {n}: `input` must be a string")
            yield row


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def _npz_bytes(**arrays: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.savez(buf, **arrays)
    return buf.getvalue()


# ---------------------------------------------------------------------------------------------- export
def export_routes(m: ATMoE, dataset: str | os.PathLike, out_dir: str | os.PathLike, *,
                  overrides: Overrides | None = None, granularity: str = "sequence", batch_size: int = 16,
                  restart: bool = False, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Route every row of the JSONL `dataset` and write `out_dir` (format in the module docstring). Resumes an
    unfinished export of the same run; `restart` discards one of another run. `progress(rows_done)` after each
    chunk. Returns the balance statistics."""
    if granularity not in ("sequence", "token"):
        raise ValueError(f"granularity must be 'sequence' or 'token', got {granularity!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    dataset, out = Path(dataset), Path(out_dir)
    m.check_overrides(overrides)
    run = {"format": FORMAT, "dataset": _file_hash(dataset), "model_hash": model_hash(m),
           "router_hash": router_hash(m), "granularity": granularity, "batch_size": batch_size,
           "overrides": overrides.to_dict() if overrides is not None else None}
    shards = out / "shards"
    if (shards / "run.json").is_file():
        before = read_json(shards / "run.json", "export run")
        if before != run and not restart:
            raise ValueError(f"{out} holds an export of another run ({_differences(before, run)}): choose another "
                             "--out, or pass --restart to discard it")
        if before != run:
            for f in shards.iterdir():
                f.unlink()
    atomic_write_json(shards / "run.json", run)
    layout, done, chunk_rows = m.layout, 0, []

    def flush(k: int, rows: list[dict[str, Any]]) -> None:
        if not (shards / f"{k:06d}.json").is_file():      # the index is written last: it marks a finished chunk
            traces = m.route_batch([r["instruction"] for r in rows], overrides,
                                   inputs=[r.get("input", "") for r in rows], granularity=granularity)
            arrays = {"alpha": np.stack([t.group_weights for t in traces]).astype(np.float16),
                      "beta": np.stack([t.expert_weights for t in traces]).astype(np.float16)}
            lines = []
            for i, (r, t) in enumerate(zip(rows, traces)):
                line = {"row": k * batch_size + i, "id": r.get("id", k * batch_size + i),
                        "instruction": r["instruction"], "prompt_tokens": len(m.encode(r["instruction"],
                                                                                        r.get("input", "")))}
                if "experts" in r:
                    line["experts"] = r["experts"]
                if granularity == "token":
                    line["tokens"] = t.tokens
                    line["token_count"] = len(t.tokens)
                lines.append(line)
            if granularity == "token":
                arrays["token_alpha"] = np.concatenate([t.token_group_weights for t in traces]).astype(np.float16)
                arrays["token_beta"] = np.concatenate([t.token_expert_weights for t in traces]).astype(np.float16)
            atomic_write_bytes(shards / f"{k:06d}.npz", _npz_bytes(**arrays))
            atomic_write_json(shards / f"{k:06d}.json", lines)
        if progress is not None:
            progress(k * batch_size + len(rows))

    k = 0
    for row in read_rows(dataset):
        chunk_rows.append(row)
        if len(chunk_rows) == batch_size:
            flush(k, chunk_rows)
            k, chunk_rows = k + 1, []
    if chunk_rows:
        flush(k, chunk_rows)
        k += 1
    if k == 0:
        raise ValueError(f"{dataset} has no rows")
    return _assemble(m, out, k, run, layout)


def _differences(before: dict[str, Any], now: dict[str, Any]) -> str:
    return ", ".join(f"{key} differs" for key in now if before.get(key) != now.get(key)) or "another format"


def _assemble(m: ATMoE, out: Path, chunks: int, run: dict[str, Any], layout: GroupLayout) -> dict[str, Any]:
    """The final files from the shards, one chunk in memory at a time."""
    shards = out / "shards"
    sizes, token_sizes = [], []
    for k in range(chunks):
        with np.load(shards / f"{k:06d}.npz") as z:
            sizes.append(len(z["alpha"]))
            token_sizes.append(len(z["token_alpha"]) if "token_alpha" in z else 0)
    L, G, E = m.num_layers, len(layout.groups), len(layout.experts)
    N, tokens = sum(sizes), run["granularity"] == "token"
    names = {"alpha": (N, L, G), "beta": (N, L, E)}
    if tokens:
        names.update(token_alpha=(sum(token_sizes), L, G), token_beta=(sum(token_sizes), L, E))
    stats = Balance(layout)
    index_lines: list[bytes] = []
    with _atomic_files([out / f"{n}.npy" for n in names]) as tmps:
        arrays = {n: np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float16, shape=shape)
                  for (n, shape), tmp in zip(names.items(), tmps)}
        row = token = 0
        for k in range(chunks):
            with np.load(shards / f"{k:06d}.npz") as z:
                n = len(z["alpha"])
                arrays["alpha"][row:row + n], arrays["beta"][row:row + n] = z["alpha"], z["beta"]
                stats.add(z["alpha"], z["beta"])
                if tokens:
                    t = len(z["token_alpha"])
                    arrays["token_alpha"][token:token + t] = z["token_alpha"]
                    arrays["token_beta"][token:token + t] = z["token_beta"]
            for line in read_json(shards / f"{k:06d}.json", "export shard index"):
                line.update(alpha_shape=[L, G], beta_shape=[L, E], model=run["model_hash"], router=run["router_hash"])
                if tokens:
                    line["token_start"] = token
                    token += line["token_count"]
                index_lines.append((json.dumps(line, ensure_ascii=False) + "\n").encode())
            row += n
        for a in arrays.values():
            a.flush()
        del arrays
    atomic_write_bytes(out / "index.jsonl", b"".join(index_lines))
    result = stats.result()
    atomic_write_json(out / "balance.json", result)
    atomic_write_json(out / "meta.json", {
        "format": FORMAT, "rows": N, "groups": list(layout.groups), "experts": list(layout.experts),
        "expert_groups": list(layout.expert_groups), "layers": list(m.layer_names), "granularity": run["granularity"],
        "overrides": run["overrides"], "router_mode": m.router.config.mode, "model_hash": run["model_hash"],
        "router_hash": run["router_hash"], "dataset_hash": run["dataset"], "dtype": "float16",
        "files": {n: list(shape) for n, shape in names.items()}})
    return result


class _atomic_files:
    """Temporary names for several files, each renamed over its destination only if the whole block succeeds."""

    def __init__(self, paths: list[Path]) -> None:
        self.managers = [_atomic_file(p) for p in paths]

    def __enter__(self) -> list[str]:
        return [cm.__enter__() for cm in self.managers]

    def __exit__(self, *exc: Any) -> None:
        for cm in self.managers:
            cm.__exit__(*exc)


def load_routes(out_dir: str | os.PathLike) -> tuple[np.ndarray, np.ndarray, list[dict[str, Any]], dict[str, Any]]:
    """(alpha [N, L, G], beta [N, L, E], index rows, meta) of an export; the arrays memory-mapped."""
    out = Path(out_dir)
    meta = read_json(out / "meta.json", "routes meta")
    if meta.get("format") != FORMAT:
        raise ValueError(f"{out} is not an atmoe routes export ({FORMAT})")
    index = [json.loads(line) for line in (out / "index.jsonl").read_text(encoding="utf-8").splitlines() if line]
    return (np.load(out / "alpha.npy", mmap_mode="r"), np.load(out / "beta.npy", mmap_mode="r"), index, meta)


__all__ = ["Balance", "balance", "export_routes", "load_routes", "model_hash", "read_rows", "router_hash"]
