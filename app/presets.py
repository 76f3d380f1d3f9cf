"""Override presets: JSON files, the compact URL form, and the slider → override rule. Pure functions, no Streamlit.

The app keeps `Overrides` objects; dicts exist only here, at the JSON / URL edges (`Overrides.to_dict/from_dict`).

The slider rule matters in softmax mode, where fixed group weights must sum to ≤ 1 and the free groups share the rest:
only the sliders the user actually MOVED away from the router's value become fixed overrides (plus disabled experts).
"""

from __future__ import annotations

import base64
import binascii
import json
from collections.abc import Mapping
from typing import Any

from atmoe import Overrides

MAX_PRESET_BYTES = 64_000
_TOL = 1e-6


def to_json(overrides: Overrides | None) -> str:
    return json.dumps((overrides or Overrides()).to_dict(), indent=2)


def from_json(data: bytes | str) -> Overrides:
    """A preset file's contents → `Overrides` (ValueError with the reason otherwise)."""
    if isinstance(data, bytes):
        if len(data) > MAX_PRESET_BYTES:
            raise ValueError(f"the preset file is {len(data):,} bytes; presets are small JSON files "
                             f"(at most {MAX_PRESET_BYTES:,} bytes)")
        try:
            data = data.decode("utf-8-sig")
        except UnicodeDecodeError:
            raise ValueError("the preset file is not UTF-8 text") from None
    try:
        obj = json.loads(data)
    except json.JSONDecodeError as e:
        raise ValueError(f"the preset is not valid JSON: {e.msg} at line {e.lineno}, column {e.colno}") from None
    return Overrides.from_dict(obj)


def encode_url(overrides: Overrides | None) -> str:
    """Compact, URL-safe form of a preset (base64 of minified JSON, no padding)."""
    d = {k: v for k, v in (overrides or Overrides()).to_dict().items() if v not in ({}, [], None)}
    raw = json.dumps(d, separators=(",", ":"), sort_keys=True).encode()
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def decode_url(text: str) -> Overrides:
    if not isinstance(text, str) or len(text) > MAX_PRESET_BYTES:
        raise ValueError("the preset in the link is too long or not text")
    try:
        raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ValueError("the preset in the link is not valid base64") from None
    return from_json(raw)


def slider_base(group_weights: Any, expert_weights: Any, groups: list[str], experts: list[str],
                layers: tuple[int, int]) -> dict[str, float]:
    """Router α and β averaged over `layers` (inclusive), rounded to the sliders' 0.01 step; keys 'g:…' / 'e:…'."""
    a, b = layers
    out = {f"g:{g}": round(float(group_weights[a:b + 1, i].mean()), 2) for i, g in enumerate(groups)}
    out.update({f"e:{e}": round(float(expert_weights[a:b + 1, i].mean()), 2) for i, e in enumerate(experts)})
    return out


def overrides_from_sliders(values: Mapping[str, float], base: Mapping[str, float], disabled: list[str],
                           layers: tuple[int, int], num_layers: int) -> Overrides | None:
    """Moved sliders → fixed weights; disabled experts → disabled (their slider is ignored). None: nothing fixed."""
    moved = {k: float(v) for k, v in values.items() if abs(float(v) - base.get(k, -1.0)) > _TOL}
    groups = {k[2:]: v for k, v in moved.items() if k.startswith("g:")}
    experts = {k[2:]: v for k, v in moved.items() if k.startswith("e:") and k[2:] not in disabled}
    if not (groups or experts or disabled):
        return None
    full = (0, num_layers - 1)
    return Overrides(groups=groups, experts=experts, disabled=list(disabled),
                     layers=None if tuple(layers) == full else (int(layers[0]), int(layers[1])))


def slider_values(base: Mapping[str, float], overrides: Overrides | None) -> dict[str, float]:
    """Slider positions for a preset: fixed values where it fixes one, the router's value elsewhere."""
    values = dict(base)
    if overrides is not None:
        values.update({f"g:{name}": round(float(v), 2) for name, v in overrides.groups.items()})
        values.update({f"e:{name}": round(float(v), 2) for name, v in overrides.experts.items()})
    return values


def describe(overrides: Overrides | None) -> str:
    """One line for captions, e.g. 'style α=0.00 · bullets β=1.00 · off: labs · layers 0–11'."""
    if overrides is None or overrides.is_empty():
        return "none (router only)"
    parts = [f"{g} α={v:.2f}" for g, v in overrides.groups.items()]
    parts += [f"{e} β={v:.2f}" for e, v in overrides.experts.items()]
    if overrides.disabled:
        parts.append("off: " + ", ".join(overrides.disabled))
    if overrides.layers is not None:
        a, b = overrides.layers
        parts.append(f"layers {a}–{b}")
    return " · ".join(parts)
