"""Which expert manifests a dashboard page may load. Whoever starts the server chooses them; a visitor only picks
among their names (no free text: a path box would let anyone probe the server's files and load models at will).

    streamlit run streamlit_app.py -- --manifest A --manifest B    # repeatable; the first one is the default
    streamlit run streamlit_app.py -- --models-dir DIR             # every DIR/*/experts.json and DIR/*.json manifest
    streamlit run streamlit_app.py -- --allow-any-manifest         # local use only: adds a free path box

$ATMOE_MANIFEST names one more allowed manifest. With none of these, the shipped demo's manifests that exist are
offered under their own names: the co-adapted `assets/coadapted/experts.json` first, then the stage-1
`assets/experts.json`.
No Streamlit here: the arguments parse into a `Launch` (or a `LaunchError` that the page shows).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from app.service import DEFAULT_MANIFESTS
from atmoe.load.files import LoadError
from atmoe.load.manifest import Manifest

USAGE = ("streamlit run streamlit_app.py -- [--manifest PATH ...] [--models-dir DIR ...] "
         "[--allow-any-manifest]")


class LaunchError(ValueError):
    """The server was started with arguments the dashboard cannot use."""


@dataclass(frozen=True)
class Launch:
    """The launch choice: `manifests` maps each name shown to visitors to its path (launch order; the first is the
    default); `allow_any` adds a free path box (local use)."""

    manifests: dict[str, str]
    allow_any: bool = False

    def __post_init__(self) -> None:
        if not self.manifests:
            raise LaunchError("no manifest to offer")

    @property
    def paths(self) -> list[str]:
        return list(self.manifests.values())

    def name_of(self, path: str) -> str:
        return next((n for n, p in self.manifests.items() if p == path), path)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # argparse would print usage and exit the server process
        raise LaunchError(message)


def script_argv(script: str) -> list[str]:
    """The arguments after `--` in `streamlit run SCRIPT -- …` (Streamlit sets sys.argv = [SCRIPT, …]). When the
    script runs inside another program (a test runner's AppTest), sys.argv is that program's, not ours: []."""
    try:
        ours = bool(sys.argv) and Path(sys.argv[0]).resolve() == Path(script).resolve()
    except OSError:
        ours = False
    return list(sys.argv[1:]) if ours else []


def parse(argv: Sequence[str], env_manifest: str | None = None) -> Launch:
    """Launch arguments (+ $ATMOE_MANIFEST as `env_manifest`) → `Launch`; LaunchError says what is wrong."""
    parser = _Parser(prog="streamlit_app.py", add_help=False)
    parser.add_argument("--manifest", action="append", default=[], metavar="PATH")
    parser.add_argument("--models-dir", action="append", default=[], metavar="DIR")
    parser.add_argument("--allow-any-manifest", action="store_true")
    args = parser.parse_args(list(argv))
    paths = list(args.manifest)
    for folder in args.models_dir:
        paths += _scan(folder)
    if env_manifest:
        paths.append(env_manifest)
    if not paths:  # the shipped demo: those built, under their own names (the first one when none is)
        built = {name: p for name, p in DEFAULT_MANIFESTS.items() if Path(p).is_file()}
        return Launch(built or dict([next(iter(DEFAULT_MANIFESTS.items()))]), allow_any=args.allow_any_manifest)
    for p in paths:
        if not p.strip():
            raise LaunchError("--manifest needs a path, got an empty one")
    return Launch(_named(paths), allow_any=args.allow_any_manifest)


def _scan(folder: str) -> list[str]:
    """DIR/*/experts.json (a model per sub-folder), then DIR/*.json files that parse as manifests (a results file
    lying next to them is skipped), each sorted by name."""
    root = Path(folder)
    if not root.is_dir():
        raise LaunchError(f"--models-dir {folder}: no such folder")
    found = [str(p) for p in sorted(root.glob("*/experts.json")) if p.is_file()]
    for p in sorted(root.glob("*.json")):
        try:
            Manifest.load(p)
        except (LoadError, ValueError, OSError):
            continue
        found.append(str(p))
    if not found:
        raise LaunchError(f"--models-dir {folder} holds no manifest (looked for */experts.json and *.json)")
    return found


def _named(paths: list[str]) -> dict[str, str]:
    """Name each manifest by its folder (`x/experts.json`, or a folder given itself) or its file stem, unique in
    launch order; the same file listed twice is offered once."""
    out: dict[str, str] = {}
    seen: set[Path] = set()
    for path in paths:
        resolved = Path(path).resolve()
        if resolved in seen:
            continue
        seen.add(resolved)
        p = Path(path)
        name = (resolved.parent.name if p.name == "experts.json" else p.name if p.suffix != ".json" else p.stem) \
            or path
        unique, i = name, 2
        while unique in out:
            unique, i = f"{name} ({i})", i + 1
        out[unique] = path
    return out
