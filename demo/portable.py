"""Shipped files carry no build-machine paths: the base by its portable identity, every other path relative.

The engine's writers record what they were given: an expert card's `"base"` is the folder the base was loaded from
(`~/.cache/atmoe/SmolLM2-135M-Instruct-Q4_1` on the machine that built it), PEFT's `base_model_name_or_path` the
same, and the training config its absolute output and data paths. None of these means anything on another machine,
so after each build stage `make_portable` rewrites the JSON files under the asset folder:

    "base"                     → `base_identity`: {"id", "package", "file", "sha256", "signature"} for the embedded
                                 base (the wheel and GGUF it comes from, and the architecture the experts need);
                                 {"id", "signature"} for a hub id or a local folder (its name only)
    "base_model_name_or_path"  → the identity's "id" (PEFT does not load the base from it)
    any other absolute path    → relative to the repository when inside it, else its last component

The model card (README.md) of each expert gets the same "base" line. Weights are untouched, so the evaluation's
fingerprints (weights, rows, budget) and the stored table stay valid.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import re
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import Any

from atmoe.load.base import DEFAULT_BASE, GGUF_DIST, GGUF_FILE, embedded_gguf_path
from atmoe.load.files import atomic_write_json

from .config import REPO

# A path written by a machine: POSIX absolute, home-relative, or a Windows drive path.
ABSOLUTE = re.compile(r"^(/|~/|[A-Za-z]:[\\/])")


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def base_identity(base: str | None, signature: dict[str, Any]) -> dict[str, Any]:
    """The base as another machine can find and check it: `signature` is `atmoe.load.base.base_signature(model)`."""
    if base is None or base == DEFAULT_BASE:
        gguf = embedded_gguf_path()
        return {"id": DEFAULT_BASE, "package": f"{GGUF_DIST}=={importlib.metadata.version(GGUF_DIST)}",
                "file": GGUF_FILE, "sha256": _sha256(gguf), "signature": dict(signature)}
    return {"id": portable_path(base), "signature": dict(signature)}


def portable_path(value: str) -> str:
    """`value` unchanged unless it is an absolute path: then relative to the repository, or its last component."""
    if not ABSOLUTE.match(value):
        return value
    if value.startswith("~/"):
        return PurePosixPath(value).name
    if re.match(r"^[A-Za-z]:", value):
        return PureWindowsPath(value).name
    path = Path(value)
    try:
        return path.relative_to(REPO).as_posix()
    except ValueError:
        return path.name


def _relative(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _relative(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_relative(v) for v in value]
    return portable_path(value) if isinstance(value, str) else value


def portable_card(card: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """An expert card (atmoe_expert.json) with the base's identity and no absolute path. The training config's own
    `"base"` field (the command-line value, None for the embedded base) is kept as given, made relative."""
    return {k: base if k == "base" else _relative(v) for k, v in card.items()}


def portable_adapter_config(config: dict[str, Any], base: dict[str, Any]) -> dict[str, Any]:
    """PEFT's adapter_config.json with the base named by its identity's id."""
    return {k: base["id"] if k == "base_model_name_or_path" else _relative(v) for k, v in config.items()}


def make_portable(root: str | Path, base: dict[str, Any]) -> list[Path]:
    """Rewrite every expert card, adapter config and model card under `root` (see the module docstring); returns
    the files that changed. Idempotent."""
    changed = []
    for path in sorted(Path(root).rglob("*")):
        if path.name == "atmoe_expert.json":
            fix = portable_card
        elif path.name == "adapter_config.json":
            fix = portable_adapter_config
        elif path.name == "README.md" and (path.parent / "adapter_config.json").exists():
            text = path.read_text(encoding="utf-8")
            new = re.sub(r"^- base: `[^`]*`", f"- base: `{base['id']}`", text, flags=re.M)
            new = re.sub(r"(- data: `)([^`]*)(`)", lambda m: m[1] + portable_path(m[2]) + m[3], new)
            if new != text:
                path.write_text(new, encoding="utf-8")
                changed.append(path)
            continue
        else:
            continue
        data = json.loads(path.read_text(encoding="utf-8"))
        new = fix(data, base)
        if new != data:
            atomic_write_json(path, new)
            changed.append(path)
    return changed


def absolute_paths(value: Any) -> list[str]:
    """Every string inside a JSON value that is, or contains, an absolute path (what the shipped files must not
    hold)."""
    found: list[str] = []
    if isinstance(value, dict):
        for k, v in value.items():
            found += absolute_paths(k) + absolute_paths(v)
    elif isinstance(value, list):
        for v in value:
            found += absolute_paths(v)
    elif isinstance(value, str) and (ABSOLUTE.match(value) or re.search(r"(^|[\s\"'`(=])(/(root|home|work|tmp|Users|"
                                                                       r"mnt|var|opt|private)/|~/|[A-Za-z]:\\)", value)):
        found.append(value)
    return found
