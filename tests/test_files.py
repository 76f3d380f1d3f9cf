"""Atomic writes: a write that fails part-way (disk full after some bytes, a failed rename) leaves the previous file
byte for byte, and no partial or temporary file next to it."""

from __future__ import annotations

import builtins
import errno
import io
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from atmoe.load.files import atomic_save_safetensors, atomic_write_bytes, atomic_write_json

OLD = b"previous contents, complete\n" * 8


class _DiskFullAfter:
    """A writable file that accepts `budget` bytes (really written and flushed), then fails like a full disk."""

    def __init__(self, f, budget: int, log: list[int]) -> None:
        self._f, self._budget, self._log = f, budget, log

    def write(self, data) -> int:
        data = bytes(data)
        room = max(self._budget - sum(self._log), 0)
        if len(data) <= room:
            self._log.append(len(data))
            return self._f.write(data)
        self._f.write(data[:room])
        self._f.flush()
        self._log.append(room)
        raise OSError(errno.ENOSPC, "No space left on device")

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()

    def __getattr__(self, name):
        return getattr(self._f, name)


@pytest.fixture
def disk_full_after(monkeypatch, tmp_path):
    """Files opened for writing under `tmp_path` fail once `budget` bytes went in. Returns the bytes written."""
    real_open = io.open
    written: list[int] = []

    def install(budget: int) -> list[int]:
        def fake_open(file, mode="r", *args, **kwargs):
            f = real_open(file, mode, *args, **kwargs)
            inside = isinstance(file, (str, os.PathLike)) and Path(file).resolve().is_relative_to(tmp_path.resolve())
            if inside and any(c in mode for c in "wax"):
                return _DiskFullAfter(f, budget, written)
            return f

        monkeypatch.setattr(io, "open", fake_open)          # pathlib opens through io.open
        monkeypatch.setattr(builtins, "open", fake_open)
        return written

    return install


def _only(tmp_path: Path, name: str) -> None:
    assert sorted(p.name for p in tmp_path.iterdir()) == [name], "a partial or temporary file was left behind"


@pytest.mark.parametrize("write", ["bytes", "json"])
def test_a_write_that_fails_midstream_keeps_the_previous_file(tmp_path, disk_full_after, write):
    path = tmp_path / "state.json"
    path.write_bytes(OLD)
    written = disk_full_after(budget=10)
    with pytest.raises(OSError, match="No space"):
        if write == "bytes":
            atomic_write_bytes(path, b"new contents that will not fit" * 10)
        else:
            atomic_write_json(path, {"version": 2, "payload": "x" * 200})
    assert sum(written) == 10  # the failure really came mid-stream, after some bytes were on disk
    assert path.read_bytes() == OLD
    _only(tmp_path, "state.json")


def test_a_failed_rename_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "weights.safetensors"
    atomic_save_safetensors({"w": torch.ones(4)}, path, {"v": "1"})
    old = path.read_bytes()

    def replace(src, dst):
        assert Path(src).stat().st_size > 0  # the new file was complete when the rename failed
        raise OSError(errno.EIO, "Input/output error")

    monkeypatch.setattr(os, "replace", replace)
    with pytest.raises(OSError, match="Input/output"):
        atomic_save_safetensors({"w": torch.zeros(1000)}, path, {"v": "2"})
    with pytest.raises(OSError, match="Input/output"):
        atomic_write_json(path, {"v": 2})
    monkeypatch.undo()
    assert path.read_bytes() == old
    _only(tmp_path, "weights.safetensors")


def test_successful_writes_replace_the_file_and_leave_nothing_else(tmp_path):
    path = tmp_path / "state.json"
    path.write_bytes(OLD)
    atomic_write_json(path, {"version": 2})
    assert json.loads(path.read_text()) == {"version": 2}
    atomic_save_safetensors({"w": torch.arange(3.0)}, tmp_path / "w.safetensors")
    assert torch.equal(load_file(tmp_path / "w.safetensors")["w"], torch.arange(3.0))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json", "w.safetensors"]


def test_atomic_writes_get_the_modes_plain_writes_would(tmp_path):
    """mkstemp/mkdtemp make 0600/0700; a written file or folder must be readable as a plain write's would be."""
    import stat

    from atmoe.load.files import atomic_directory, atomic_write_bytes

    old = os.umask(0o022)
    try:
        f = atomic_write_bytes(tmp_path / "a.json", b"{}")
        with atomic_directory(tmp_path / "d") as d:
            (d / "x").write_text("x")
    finally:
        os.umask(old)
    assert stat.S_IMODE(f.stat().st_mode) == 0o644
    assert stat.S_IMODE((tmp_path / "d").stat().st_mode) == 0o755
