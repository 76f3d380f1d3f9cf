"""File I/O shared by every loader and writer: atomic writes, JSON and safetensors read with clear errors.

Every writer goes through a temporary file (or folder) in the destination's own directory followed by a rename, so a
killed process leaves either the previous file or the complete new one — never a half-written file that later loads.
Every reader accepts JSON or safetensors only (no pickle) and names the file and the fault when it refuses one.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file


class LoadError(ValueError):
    """A file that cannot be used: the message names the file and what is wrong with it."""


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def _atomic_file(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary file name next to `path`; on success it is synced and renamed over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())   # mkstemp makes 0600; the file gets the mode a plain open() would give
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> Path:
    with _atomic_file(path) as tmp:
        Path(tmp).write_bytes(data)
    return Path(path)


def atomic_write_json(path: str | os.PathLike, obj: Any) -> Path:
    return atomic_write_bytes(path, (json.dumps(obj, indent=2, ensure_ascii=False) + "\n").encode())


def atomic_save_safetensors(tensors: dict[str, torch.Tensor], path: str | os.PathLike,
                            metadata: dict[str, str] | None = None) -> Path:
    with _atomic_file(path) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, tmp, metadata=metadata)
    return Path(path)


def _exchange(a: Path, b: Path) -> bool:
    """Swap two existing paths in one atomic step (Linux `renameat2(RENAME_EXCHANGE)`); False where the platform,
    the C library or the filesystem does not support it."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


@contextmanager
def atomic_directory(final: str | os.PathLike) -> Iterator[Path]:
    """Yield a temporary folder next to `final`; on success it replaces `final` atomically.

    The new folder is complete before its name appears. Replacing a previous folder is one atomic exchange where the
    OS supports it (Linux), so `final` is always either the whole old or the whole new folder; elsewhere it takes two
    renames: the old folder is moved aside first (put back if the second rename fails) — a kill -9 between them leaves
    it intact under `.<name>.old-*/`. The previous folder is removed last.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".tmp", dir=final.parent))
    os.chmod(tmp, 0o777 & ~_umask())       # mkdtemp makes 0700; the folder gets the mode mkdir would give
    old = None
    try:
        yield tmp
        if final.exists() and _exchange(tmp, final):
            old = tmp  # the exchange put the previous folder under the temporary name
        else:
            if final.exists():
                # A unique name: a leftover of an earlier crash can never block this swap.
                old = Path(tempfile.mkdtemp(prefix=f".{final.name}.old-", dir=final.parent))
                os.rename(final, old / final.name)
            os.rename(tmp, final)
    except BaseException:
        if old is not None and old != tmp and not final.exists():
            os.rename(old / final.name, final)  # the swap failed: put the previous folder back
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)


def read_json(path: str | os.PathLike, what: str) -> Any:
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise LoadError(f"{what} not found: {path}") from None
    except (OSError, UnicodeDecodeError) as e:
        raise LoadError(f"{what} {path} cannot be read: {e}") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise LoadError(f"{what} {path} is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None


def read_safetensors(path: str | os.PathLike, what: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read every tensor of a safetensors file, refusing truncated files, non-float tensors and NaN/inf values."""
    path = Path(path)
    if not path.is_file():
        raise LoadError(f"{what} not found: {path}")
    try:
        with safe_open(str(path), framework="pt") as f:
            metadata = f.metadata() or {}
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise LoadError(f"{what} {path} is not a valid safetensors file ({e})") from None
    for name, t in tensors.items():
        if not t.is_floating_point():
            raise LoadError(f"{what} {path}: tensor '{name}' has dtype {t.dtype}, expected a floating-point dtype")
        if not torch.isfinite(t).all():
            raise LoadError(f"{what} {path}: tensor '{name}' contains NaN or inf values")
    return tensors, metadata
