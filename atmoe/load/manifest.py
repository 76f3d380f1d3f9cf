"""The expert manifest: one JSON file naming the base model, the ordered groups, their experts and the router.

    {"base_model": "HuggingFaceTB/SmolLM2-135M-Instruct" | "local/folder" | null (embedded default),
     "groups": [{"name": "task", "experts": [{"name": "labs", "path": "experts/labs",
                                              "description": "Lists the note's lab results, one per line."}]}],
     "router": "router.safetensors" | null,
     "base_signature": {"model_type": ..., "num_hidden_layers": ..., ...}   (optional; checked on load)}

Paths are relative to the manifest's folder and may not escape it. An expert may name a hub id with "hub" instead of
"path".
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..grounding import Reference
from .files import LoadError, atomic_write_json, read_json

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")


def _strings(x: Any) -> bool:
    return isinstance(x, list) and bool(x) and all(isinstance(s, str) and s for s in x)


def _value_item(v: Any) -> bool:
    """One item of an expert's `values`: a value, or values with the names of the lines they belong to."""
    return isinstance(v, str) or (isinstance(v, dict) and set(v) == {"names", "values"} and _strings(v["names"])
                                  and _strings(v["values"]))


@dataclass
class ExpertEntry:
    name: str
    path: str | None = None
    hub: str | None = None
    description: str = ""
    # Values the skill writes that no prompt holds (reference ranges): grounded decoding allows them
    # (GenerationSettings.grounded). Each item a value (on any line) or {"names": [...], "values": [...]}: values
    # allowed only on a line that names one of the names (a measurement's range after that measurement).
    values: list[str | dict[str, list[str]]] | None = None


@dataclass
class GroupEntry:
    name: str
    experts: list[ExpertEntry]


@dataclass
class Manifest:
    groups: list[GroupEntry]
    base_model: str | None = None
    router: str | None = None
    base_signature: dict[str, Any] | None = None
    description: str = ""
    root: Path = field(default_factory=Path.cwd)   # folder the relative paths are resolved from
    path: Path | None = None                        # the file it was loaded from, if any

    @property
    def experts(self) -> list[tuple[str, ExpertEntry]]:
        """(group, expert) in manifest order, grouped."""
        return [(g.name, e) for g in self.groups for e in g.experts]

    @property
    def reference_values(self) -> dict[str, list[Reference]]:
        """Per expert, the values it declares it writes without a prompt holding them (`values`: reference ranges):
        its plain values as one `Reference`, then one per named item."""
        out = {}
        for _, e in self.experts:
            if e.values:
                anywhere = tuple(v for v in e.values if isinstance(v, str))
                out[e.name] = ([Reference(anywhere)] if anywhere else []) + [
                    Reference(tuple(v["values"]), tuple(v["names"])) for v in e.values if isinstance(v, dict)]
        return out

    @property
    def measurements(self) -> list[tuple[str, ...]]:
        """The measurements the experts declare, each as its names (a named reference's `names`), each once:
        grounded decoding writes a value under one only when the prompt names it (`atmoe.grounding.NumberGuard`)."""
        return list(dict.fromkeys(r.names for refs in self.reference_values.values() for r in refs if r.names))

    def resolve(self, relative: str, what: str) -> Path:
        """A path inside the manifest's folder; refuses absolute paths and `..` escapes (symlinks included)."""
        if Path(relative).is_absolute():
            raise LoadError(f"manifest {self.root}: {what} path '{relative}' must be relative to the manifest folder")
        root = self.root.resolve()
        path = (root / relative).resolve()
        if not path.is_relative_to(root):
            raise LoadError(f"manifest {self.root}: {what} path '{relative}' escapes the manifest folder")
        return path

    def expert_source(self, e: ExpertEntry) -> str | Path:
        return e.hub if e.hub else self.resolve(e.path, f"expert '{e.name}'")

    def router_path(self) -> Path | None:
        return self.resolve(self.router, "router") if self.router else None

    def to_dict(self) -> dict[str, Any]:
        return {"base_model": self.base_model, "base_signature": self.base_signature, "description": self.description,
                "groups": [{"name": g.name, "experts": [{k: v for k, v in e.__dict__.items() if v is not None}
                                                         for e in g.experts]} for g in self.groups],
                "router": self.router}

    def save(self, path: str | Path) -> Path:
        return atomic_write_json(path, self.to_dict())

    @classmethod
    def load(cls, path: str | Path) -> Manifest:
        path = Path(path)
        if path.is_dir():
            path = path / "experts.json"
        m = cls.from_dict(read_json(path, "manifest"), root=path.parent, where=str(path))
        m.path = path
        return m

    @classmethod
    def from_dict(cls, d: Any, root: Path, where: str = "manifest") -> Manifest:
        def fail(msg: str) -> LoadError:
            return LoadError(f"manifest {where}: {msg}")

        if not isinstance(d, dict):
            raise fail("must be a JSON object")
        unknown = set(d) - {"base_model", "groups", "router", "base_signature", "description"}
        if unknown:
            raise fail(f"unknown field(s) {sorted(unknown)}")
        for k in ("base_model", "router", "description"):
            if d.get(k) is not None and not isinstance(d[k], str):
                raise fail(f"'{k}' must be a string or null")
        if not isinstance(d.get("groups"), list) or not d["groups"]:
            raise fail("'groups' must be a non-empty list")
        groups, seen = [], set()
        for gi, g in enumerate(d["groups"]):
            if not isinstance(g, dict) or not isinstance(g.get("name"), str):
                raise fail(f"group #{gi} must be an object with a string 'name'")
            if not isinstance(g.get("experts"), list) or not g["experts"]:
                raise fail(f"group '{g['name']}' has no experts (every group needs at least one)")
            experts = []
            for ei, e in enumerate(g["experts"]):
                if not isinstance(e, dict) or set(e) - {"name", "path", "hub", "description", "values"}:
                    raise fail(f"expert #{ei} of group '{g['name']}' must be an object with name, path|hub, "
                               "description, values")
                values = e.get("values")
                if values is not None and not (isinstance(values, list) and all(map(_value_item, values))):
                    raise fail(f"expert '{e.get('name')}': 'values' must be a list of strings or of "
                               '{"names": [strings], "values": [strings]}')
                if any(e.get(k) is not None and not isinstance(e[k], str) for k in ("name", "path", "hub",
                                                                                    "description")):
                    raise fail(f"expert #{ei} of group '{g['name']}': fields must be strings")
                if (e.get("path") is None) == (e.get("hub") is None):
                    raise fail(f"expert '{e.get('name')}' needs exactly one of 'path' or 'hub'")
                experts.append(ExpertEntry(e.get("name"), e.get("path"), e.get("hub"), e.get("description", ""),
                                           values))
            groups.append(GroupEntry(g["name"], experts))
            for name in [g["name"]] + [e.name for e in experts]:
                if not isinstance(name, str) or not _NAME.match(name):
                    raise fail(f"invalid name {name!r}: use letters, digits, '_', '-', '.' (max 64)")
                if name in seen:
                    raise fail(f"duplicate name '{name}' (group and expert names must be unique)")
                seen.add(name)
        sig = d.get("base_signature")
        if sig is not None and not isinstance(sig, dict):
            raise fail("'base_signature' must be an object")
        m = cls(groups, d.get("base_model"), d.get("router"), sig, d.get("description") or "", Path(root))
        for _, e in m.experts:  # check every path now, before any loading starts
            if e.path:
                m.resolve(e.path, f"expert '{e.name}'")
        m.router_path()
        return m
