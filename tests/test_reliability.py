"""Reliability and security on a tiny model: hostile files, safe formats, failed writes, numerics, training data,
sampling bounds, cancellation and the dashboard's exposure. Figures are recorded in docs/reliability.md.

Every refusal must be one `ValueError` (LoadError, BaseModelError, DataError) whose message names the culprit and the
fault, and the process must keep serving afterwards. Concurrency and kill -9 tests live in tests/stress/.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import re
import shutil
import threading
import time
import tomllib
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from tiny_models import save_adapter, tiny_demo, tiny_llama, tiny_tokenizer

from atmoe import ATMoE, Generation, Overrides, RoutingTrace
from atmoe.generation import MAX_NEW_TOKENS, GenerationSettings
from atmoe.load.base import BaseModelError, load_base
from atmoe.load.files import atomic_directory, atomic_write_json
from atmoe.model import new_router
from atmoe.router import GroupedRouter, RouterConfig, save_router
from atmoe.train.data import DataError, Example, encode_dataset, load_jsonl

ROOT = Path(__file__).resolve().parents[1]
PROMPT = "List the lab results. Use bullet points."


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def demo(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A complete tiny AT-MoE on disk (7 experts in 3 groups, trained softmax router, 4 layers, context 512)."""
    return tiny_demo(tmp_path_factory.mktemp("demo"))


@pytest.fixture(scope="module")
def model(demo: Path) -> ATMoE:
    return ATMoE.load(demo, device="cpu")


@pytest.fixture
def broken(demo: Path, tmp_path: Path) -> Path:
    """A private copy of the demo folder for a test to damage; returns its manifest."""
    shutil.copytree(demo.parent, tmp_path / "demo")
    return tmp_path / "demo" / demo.name


def assert_serves(manifest: Path) -> None:
    """The process is still healthy: a good model loads and generates."""
    out = ATMoE.load(manifest, device="cpu").generate(PROMPT, max_new_tokens=2)
    assert isinstance(out.text, str) and 1 <= len(out.token_ids) <= 2
    assert np.isfinite(out.trace.effective_weights).all()


def valid_trace(tr: RoutingTrace) -> None:
    for a in (tr.group_weights, tr.expert_weights, tr.router_group_weights, tr.router_expert_weights):
        assert np.isfinite(a).all() and (a >= -1e-6).all() and (a <= 1 + 1e-6).all()
    if tr.mode != "sigmoid":
        np.testing.assert_allclose(tr.group_weights.sum(-1), 1.0, atol=1e-4)


# ====================================================================== 1. hostile and broken files

def _expert(manifest: Path, name: str = "labs") -> Path:
    return manifest.parent / "experts" / name


def _weights(manifest: Path) -> Path:
    return _expert(manifest) / "adapter_model.safetensors"


def _edit_manifest(manifest: Path, edit) -> None:
    d = json.loads(manifest.read_text())
    edit(d)
    manifest.write_text(json.dumps(d))


def _rewrite_tensors(manifest: Path, change) -> None:
    path = _weights(manifest)
    tensors = load_file(path)
    save_file(change(tensors), path)


def _truncated(m: Path) -> list[str]:
    data = _weights(m).read_bytes()
    _weights(m).write_bytes(data[: len(data) // 2])
    return [str(_weights(m)), "not a valid safetensors file"]


def _header_overclaims_tensor_bytes(m: Path) -> list[str]:
    data = _weights(m).read_bytes()
    n = int.from_bytes(data[:8], "little")
    header = json.loads(data[8:8 + n])
    last = max((k for k in header if k != "__metadata__"), key=lambda k: header[k]["data_offsets"][1])
    header[last]["data_offsets"][1] += 10**6  # the last tensor claims a megabyte the file does not have
    text = json.dumps(header).encode()
    _weights(m).write_bytes(len(text).to_bytes(8, "little") + text + data[8 + n:])
    return [str(_weights(m)), "not a valid safetensors file"]


def _header_length_overclaims(m: Path) -> list[str]:
    data = _weights(m).read_bytes()
    _weights(m).write_bytes((1 << 40).to_bytes(8, "little") + data[8:])  # "my header is 1 TB long"
    return [str(_weights(m)), "not a valid safetensors file"]


def _int_weights(m: Path) -> list[str]:
    _rewrite_tensors(m, lambda ts: {k: (v * 100).to(torch.int32) for k, v in ts.items()})
    return [str(_weights(m)), "torch.int32", "floating-point"]


def _wrong_shapes(m: Path) -> list[str]:
    def change(ts):
        k = next(k for k in ts if "lora_A" in k)
        ts[k] = torch.randn(ts[k].shape[0] + 1, ts[k].shape[1])
        return ts
    _rewrite_tensors(m, change)
    return ["'labs'", "do not fit"]


def _nan_weights(m: Path) -> list[str]:
    def change(ts):
        k = next(iter(ts))
        ts[k] = ts[k].clone()
        ts[k].view(-1)[3] = float("nan")
        return ts
    _rewrite_tensors(m, change)
    return [str(_weights(m)), "NaN or inf"]


def _inf_weights(m: Path) -> list[str]:
    _rewrite_tensors(m, lambda ts: {k: v.clone().fill_(float("-inf")) if i == 1 else v
                                    for i, (k, v) in enumerate(ts.items())})
    return [str(_weights(m)), "NaN or inf"]


def _other_base(m: Path) -> list[str]:
    shutil.rmtree(_expert(m))  # same architecture and module names, hidden size 64 instead of 32
    other = tiny_llama(len(tiny_tokenizer()), hidden_size=64, layers=4)
    save_adapter(other, _expert(m), ["q_proj", "v_proj"], r=4, alpha=8)
    return ["'labs'", "do not fit", "(4, 32)"]


def _missing_config(m: Path) -> list[str]:
    (_expert(m) / "adapter_config.json").unlink()
    return [str(_expert(m)), "no adapter_config.json"]


def _unknown_target_modules(m: Path) -> list[str]:
    path = _expert(m) / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["target_modules"] = sorted(cfg["target_modules"]) + ["warp_drive"]
    path.write_text(json.dumps(cfg))
    return ["'labs'", "warp_drive", "do not exist"]


def _tensor_for_unknown_module(m: Path) -> list[str]:
    _rewrite_tensors(m, lambda ts: {k.replace("layers.0.self_attn.q_proj", "layers.0.self_attn.qq_proj"): v
                                    for k, v in ts.items()})
    return ["'labs'", "qq_proj", "no such module"]


def _pickle_only(m: Path) -> list[str]:
    weights = _weights(m)
    weights.unlink()
    # A malicious pickle: unpickling it would create `pwned` next to the manifest.
    weights.with_name("adapter_model.bin").write_bytes(_evil_pickle(m.parent / "pwned"))
    return [str(_expert(m)), "pickle files are refused", "adapter_model.bin"]


def _escaping_path(m: Path) -> list[str]:
    _edit_manifest(m, lambda d: d["groups"][0]["experts"][0].update(path="../../etc/passwd"))
    return [str(m.parent), "../../etc/passwd", "escapes the manifest folder"]


def _absolute_path(m: Path) -> list[str]:
    _edit_manifest(m, lambda d: d["groups"][0]["experts"][0].update(path="/etc/passwd"))
    return [str(m.parent), "/etc/passwd", "must be relative"]


def _symlink_escape(m: Path) -> list[str]:
    outside = m.parent.parent / "outside"
    shutil.move(str(_expert(m)), outside)
    _expert(m).symlink_to(outside, target_is_directory=True)
    return [str(m.parent), "escapes the manifest folder"]


def _router_escape(m: Path) -> list[str]:
    _edit_manifest(m, lambda d: d.update(router="../../router.safetensors"))
    return [str(m.parent), "router", "escapes the manifest folder"]


def _duplicate_expert(m: Path) -> list[str]:
    _edit_manifest(m, lambda d: d["groups"][1]["experts"][0].update(name="labs"))
    return [str(m), "duplicate name 'labs'"]


def _empty_group(m: Path) -> list[str]:
    _edit_manifest(m, lambda d: d["groups"][2].update(experts=[]))
    return [str(m), "'style' has no experts"]


def _router_for(m: Path, **change) -> None:
    good = ATMoE.load(m, device="cpu").router.config
    cfg = {**asdict(good), **change}
    save_router(GroupedRouter(RouterConfig(**cfg)), m.parent / "router.safetensors")


def _router_other_experts(m: Path) -> list[str]:
    good = ATMoE.load(m, device="cpu").router.config
    _router_for(m, experts=good.experts[:-1], expert_groups=good.expert_groups[:-1])
    return [str(m.parent / "router.safetensors"), "experts"]


def _router_other_layers(m: Path) -> list[str]:
    _router_for(m, num_layers=3)
    return [str(m.parent / "router.safetensors"), "num_layers=3"]


def _router_not_a_router(m: Path) -> list[str]:
    shutil.copy(_weights(m), m.parent / "router.safetensors")  # a valid safetensors file, but an adapter
    return [str(m.parent / "router.safetensors"), "not an atmoe router"]


def _router_garbage(m: Path) -> list[str]:
    (m.parent / "router.safetensors").write_bytes(os.urandom(4096))
    return [str(m.parent / "router.safetensors"), "not a valid safetensors file"]


def _router_nan(m: Path) -> list[str]:
    path = m.parent / "router.safetensors"
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
    ts = load_file(path)
    ts["group_bias"][0, 0] = float("nan")
    save_file(ts, path, metadata=meta)
    return [str(path), "NaN or inf"]


def _invalid_json(m: Path) -> list[str]:
    m.write_text('{"groups": [ {"name": "task",, }')
    return [str(m), "not valid JSON", "line 1"]


def _base_signature_mismatch(m: Path) -> list[str]:
    sig = {"model_type": "llama", "num_hidden_layers": 4, "hidden_size": 64, "vocab_size": len(tiny_tokenizer())}
    _edit_manifest(m, lambda d: d.update(base_signature=sig))
    return [str(m.parent), "different base model", "hidden_size: expected 64, got 32"]


HOSTILE = {f.__name__.lstrip("_"): f for f in (
    _truncated, _header_overclaims_tensor_bytes, _header_length_overclaims, _int_weights, _wrong_shapes,
    _nan_weights, _inf_weights, _other_base, _missing_config, _unknown_target_modules, _tensor_for_unknown_module,
    _pickle_only, _escaping_path, _absolute_path, _symlink_escape, _router_escape, _duplicate_expert, _empty_group,
    _router_other_experts, _router_other_layers, _router_not_a_router, _router_garbage, _router_nan, _invalid_json,
    _base_signature_mismatch)}


def _evil_pickle(sentinel: Path) -> bytes:
    import pickle

    class Evil:
        def __reduce__(self):
            return (open, (str(sentinel), "w"))

    return pickle.dumps({"base_model.model.layers.0.self_attn.q_proj.lora_A.weight": Evil()})


@pytest.fixture
def no_torch_load(monkeypatch: pytest.MonkeyPatch) -> list:
    """Any torch.load (pickle) during the test is recorded and fails loudly."""
    calls: list = []

    def refuse(*args, **kwargs):
        calls.append(args)
        raise AssertionError("torch.load was called")

    monkeypatch.setattr(torch, "load", refuse)
    monkeypatch.setattr(torch.serialization, "load", refuse)
    return calls


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_file_is_refused_with_one_clear_error(case, broken, demo, no_torch_load):
    fragments = HOSTILE[case](broken)
    with pytest.raises(ValueError) as err:
        ATMoE.load(broken, device="cpu")
    message = str(err.value)
    missing = [f for f in fragments if f not in message]
    assert not missing, f"{type(err.value).__name__} message {message!r} lacks {missing}"
    assert "\n" not in message.strip(), "one clear line, not a traceback dump"
    assert not no_torch_load and not (broken.parent / "pwned").exists()
    assert_serves(demo)


def test_pickle_only_base_is_refused_without_unpickling(tmp_path, demo, no_torch_load):
    folder = tmp_path / "base"
    shutil.copytree(demo.parent / "base", folder)
    (folder / "model.safetensors").unlink()
    (folder / "pytorch_model.bin").write_bytes(_evil_pickle(tmp_path / "pwned"))
    with pytest.raises(BaseModelError, match=r"no \*\.safetensors weights.*pytorch_model\.bin.*pickle"):
        load_base(str(folder), device="cpu")
    assert not no_torch_load and not (tmp_path / "pwned").exists()
    assert_serves(demo)


def _sources() -> list[Path]:
    files = [p for folder in ("atmoe", "demo", "app") for p in sorted((ROOT / folder).rglob("*.py"))]
    return files + [p for p in [ROOT / "streamlit_app.py"] if p.exists()]


def _calls(text: str, name: str) -> list[str]:
    """Source text of every `name(...)` call (balanced parentheses)."""
    out = []
    for m in re.finditer(re.escape(name) + r"\(", text):
        depth, i = 1, m.end()
        while depth and i < len(text):
            depth += {"(": 1, ")": -1}.get(text[i], 0)
            i += 1
        out.append(text[m.start():i])
    return out


def test_no_pickle_loading_in_sources():
    offenders = []
    for path in _sources():
        text = path.read_text(encoding="utf-8")
        rel = path.relative_to(ROOT)
        if re.search(r"^\s*(import|from)\s+(c?pickle|dill|cloudpickle|joblib)\b", text, re.M):
            offenders.append(f"{rel}: imports a pickle module")
        if re.search(r"\bpickle\.(loads?|Unpickler)\b", text):
            offenders.append(f"{rel}: unpickles")
        offenders += [f"{rel}: {c}" for c in _calls(text, "torch.load")
                      if not re.search(r"weights_only\s*=\s*True", c)]
        offenders += [f"{rel}: {c}" for c in _calls(text, "np.load") if re.search(r"allow_pickle\s*=\s*True", c)]
        if re.search(r"trust_remote_code\s*=\s*True", text):
            offenders.append(f"{rel}: hard-codes trust_remote_code=True")
    assert len(_sources()) >= 10 and not offenders


def test_trust_remote_code_defaults_false():
    for fn in (load_base, ATMoE.load):
        assert inspect.signature(fn).parameters["trust_remote_code"].default is False, fn.__qualname__


def test_chat_template_does_not_evaluate_prompt_text(model):
    ids = model.encode("{{ 7 * 7 }} {% for i in range(3) %}x{% endfor %}")
    text = model.tokenizer.decode(ids)
    assert "{{ 7 * 7 }}" in text and "49" not in text and "{% for" in text


# ====================================================================== 5. failed writes (in-process part)

def test_failed_json_write_keeps_the_previous_file(tmp_path):
    path = atomic_write_json(tmp_path / "state.json", {"version": 1})
    with pytest.raises(TypeError):
        atomic_write_json(path, {"version": 2, "bad": object()})  # not serialisable: fails before any write
    with pytest.raises(ZeroDivisionError):
        with atomic_directory(tmp_path / "folder") as tmp:
            (tmp / "half.txt").write_text("half")
            raise ZeroDivisionError
    assert json.loads(path.read_text()) == {"version": 1}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["state.json"]


def test_folder_swap_is_one_atomic_exchange_on_linux(tmp_path, monkeypatch):
    """Replacing a folder must not go through a moment where `final` is missing: with renameat2(RENAME_EXCHANGE)
    there are no renames at all (os.rename is made to fail here), and no leftovers."""
    final = tmp_path / "adapter"
    with atomic_directory(final) as tmp:
        (tmp / "weights").write_text("v1")

    def no_rename(src, dst):
        raise AssertionError(f"os.rename({src}, {dst}) — a two-step swap")

    monkeypatch.setattr(os, "rename", no_rename)
    with atomic_directory(final) as tmp:
        (tmp / "weights").write_text("v2")
    assert (final / "weights").read_text() == "v2"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def test_failed_directory_swap_keeps_the_previous_folder(tmp_path, monkeypatch):
    """Where the exchange is unsupported (two renames): if the second fails, the previous folder is put back."""
    import atmoe.load.files
    monkeypatch.setattr(atmoe.load.files, "_exchange", lambda a, b: False)
    final = tmp_path / "adapter"
    with atomic_directory(final) as tmp:
        (tmp / "weights").write_text("v1")
    real_rename = os.rename

    def rename(src, dst):
        if Path(src).name.endswith(".tmp"):  # the new folder → final: fail (disk error, permission, ...)
            raise OSError(5, "Input/output error")
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)
    with pytest.raises(OSError):
        with atomic_directory(final) as tmp:
            (tmp / "weights").write_text("v2")
    monkeypatch.undo()
    assert (final / "weights").read_text() == "v1"
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]


def _peft_result(tmp_path: Path):
    from peft import LoraConfig, get_peft_model

    from atmoe.train.expert import ExpertTrainConfig, TrainResult
    peft_model = get_peft_model(tiny_llama(len(tiny_tokenizer())), LoraConfig(r=2, target_modules=["q_proj"]))
    cfg = ExpertTrainConfig(name="labs", group="task", data="unused.jsonl", out=str(tmp_path / "adapter"),
                            description="x")
    return TrainResult(peft_model, [1.0], 1, 0), cfg


@pytest.mark.parametrize("writer", ["atomic_directory", "save_expert"])
def test_leftover_of_a_crashed_swap_does_not_block_later_writes(writer, tmp_path):
    """A kill during the clean-up of a swap leaves `.<name>.old-<pid>`; a later process may get the same pid (a
    container restarts its service with the same pid), and its writes must still succeed."""
    final = tmp_path / "adapter"

    def write(version: str) -> None:
        if writer == "atomic_directory":
            with atomic_directory(final) as tmp:
                (tmp / "adapter_config.json").write_text(version)
        else:
            from atmoe.train.expert import save_expert
            result, cfg = _peft_result(tmp_path)
            cfg.description = version
            save_expert(result, cfg, base="tiny")

    write("v1")
    stale = tmp_path / f".adapter.old-{os.getpid()}"
    stale.mkdir()
    (stale / "adapter_config.json").write_text("v0")
    write("v2")
    text = (final / "adapter_config.json").read_text() if writer == "atomic_directory" else \
        json.loads((final / "atmoe_expert.json").read_text())["description"]
    assert text == "v2"


# ====================================================================== 6. numerics

@pytest.mark.parametrize("mode", ["softmax", "sigmoid", "flat"])
def test_router_never_returns_nan_weights(model, mode):
    router = new_router(model, mode=mode)
    torch.manual_seed(0)
    with torch.no_grad():
        for p in router.parameters():
            p.normal_(0, 0.5)
    D = model.router.config.hidden_size
    rows = torch.randn(6, D)
    rows[1, 3], rows[2, 0], rows[3] = float("nan"), float("inf"), float("-inf")
    rows[4] = 1e30  # finite but its square overflows float32
    rows[5] = 0.0
    for layer in range(model.num_layers):
        alpha, beta, fallback = router(layer, rows)
        assert torch.isfinite(alpha).all() and torch.isfinite(beta).all()
        assert fallback.tolist() == [False, True, True, True, False, False]
        a0, b0 = router.uniform(torch.Size([1]), alpha.device)
        torch.testing.assert_close(alpha[1:4], a0.expand(3, -1))
        torch.testing.assert_close(beta[1:4], b0.expand(3, -1))
        clean, _, _ = router(layer, rows[:1])
        torch.testing.assert_close(alpha[:1], clean)  # a bad row never disturbs a good one


def test_fp16_overflow_falls_back_to_uniform_and_is_reported(demo):
    m = ATMoE.load(demo, device="cpu", dtype="float16")
    with torch.no_grad():  # make layer 0's MLP overflow float16 (max 65504)
        m.model.model.layers[0].mlp.down_proj.base_layer.weight.fill_(60000.0)
    tr = m.route(PROMPT)
    assert tr.fallback_layers and set(tr.fallback_layers) <= {1, 2, 3} and 0 not in tr.fallback_layers
    assert np.isfinite(tr.effective_weights).all()
    for layer in tr.fallback_layers:
        np.testing.assert_allclose(tr.group_weights[layer], 1 / 3, rtol=1e-6)
    valid_trace(tr)


# ====================================================================== 7. training data

def _jsonl(tmp_path: Path, lines: list[str | bytes], name: str = "d.jsonl") -> Path:
    path = tmp_path / name
    path.write_bytes(b"\n".join(x if isinstance(x, bytes) else x.encode() for x in lines) + b"\n")
    return path


GOOD = json.dumps({"instruction": "Triage this patient.", "input": "HR 140", "output": "EMERGENT"})
BAD_ROWS = {  # line content → what the report must say about it
    b"{oops": "invalid JSON",
    b'"just a string"': "expected a JSON object",
    b"null": "expected a JSON object",
    b'{"instruction": "x"}': "missing field(s) ['output']",
    b'{"output": "y"}': "missing field(s) ['instruction']",
    b'{"instruction": 3, "output": "y"}': "instruction must be a string",
    b'{"instruction": "x", "output": null}': "output must be a string",
    b'{"instruction": "x", "input": 1, "output": "y"}': "input must be a string",
    b'{"instruction": "   ", "output": "y"}': "instruction must be non-empty",
    b'{"prompt": "p"}': "missing field(s) ['completion']",
}


def test_every_bad_jsonl_row_is_reported_with_its_line_number(tmp_path):
    lines = [b"\xef\xbb\xbf" + GOOD.encode()]  # BOM on line 1 is fine
    for bad in BAD_ROWS:
        lines += [bad, GOOD.encode()]
    with pytest.raises(DataError) as err:
        load_jsonl(_jsonl(tmp_path, lines))
    message = str(err.value)
    assert f"{len(BAD_ROWS)} bad line(s)" in message
    for i, (bad, why) in enumerate(BAD_ROWS.items()):
        line = 2 + 2 * i
        row = re.search(rf"^\s*line {line}: (.*)$", message, re.M)
        assert row and why in row.group(1), (bad, message)
    assert not re.search(r"line (1|3|5|7|9|11|13|15|17|19|21):", message)  # good rows are not blamed


def test_wrong_types_bad_utf8_and_huge_lines_are_reported(tmp_path):
    huge = json.dumps({"instruction": "x", "output": "y" * (10 << 20)})  # a 10 MB line
    path = _jsonl(tmp_path, [GOOD, b"\xff\xfe not utf-8", huge, json.dumps({"instruction": "x", "output": "y",
                                                                         "experts": "labs"}), GOOD])
    with pytest.raises(DataError) as err:
        load_jsonl(path)
    message = str(err.value)
    assert "3 bad line(s)" in message and "line 2: not valid UTF-8" in message
    assert "line 3: longer than" in message and "line 4: experts must be a list" in message


def test_empty_files_are_refused_and_clean_files_lose_nothing(tmp_path):
    for content in (b"", b"\xef\xbb\xbf", b"\n \n\t\n"):
        (tmp_path / "e.jsonl").write_bytes(content)
        with pytest.raises(DataError, match="no examples"):
            load_jsonl(tmp_path / "e.jsonl")
    rows = [json.dumps({"instruction": f"q{i} ü 😀", "output": f"a{i}"}) for i in range(500)]
    examples = load_jsonl(_jsonl(tmp_path, [b"\xef\xbb\xbf" + rows[0].encode(), *rows[1:]]))
    assert [e.instruction for e in examples] == [f"q{i} ü 😀" for i in range(500)]  # 0 rows refused or dropped


def test_truncation_is_counted_and_an_overlong_prompt_is_named():
    tok = tiny_tokenizer()
    examples = [Example("Say hi.", "", "hi"), Example("Say hi.", "", "word " * 300), Example("Say hi.", "", "ok"),
                Example("Say hi.", "", "long " * 100)]
    features, n_truncated = encode_dataset(tok, examples, max_length=64)
    assert n_truncated == 2 and [f["truncated"] for f in features] == [False, True, False, True]
    assert all(len(f["input_ids"]) <= 64 for f in features)
    examples.append(Example("tell me " * 100, "", "x"))  # the prompt alone overflows max_length
    with pytest.raises(ValueError) as err:
        encode_dataset(tok, examples, max_length=64)
    assert re.search(r"\bexample\s*#?\s*[45]\b", str(err.value)), \
        f"the error must say which example is too long: {err.value}"


# ====================================================================== 8. sampling bounds and determinism

INVALID_SETTINGS = [
    dict(max_new_tokens=0), dict(max_new_tokens=-1), dict(max_new_tokens=MAX_NEW_TOKENS + 1),
    dict(max_new_tokens=10**18), dict(max_new_tokens=2.0), dict(max_new_tokens=True), dict(max_new_tokens="4"),
    dict(temperature=-0.1), dict(temperature=math.nan), dict(temperature=math.inf), dict(temperature=-math.inf),
    dict(temperature=100.5), dict(temperature=True), dict(temperature="0.7"), dict(temperature=None),
    dict(top_p=0.0), dict(top_p=-0.5), dict(top_p=1.0000001), dict(top_p=math.nan), dict(top_p=math.inf),
    dict(top_p=False), dict(seed=-1), dict(seed=2**63), dict(seed=1.5), dict(seed=1.0), dict(seed="7"),
    dict(seed=True), dict(seed=None), dict(granularity="word"), dict(granularity=1), dict(merge="yes"),
    dict(merge=1),
]


@pytest.mark.parametrize("bad", INVALID_SETTINGS, ids=lambda d: "-".join(f"{k}={v!r}" for k, v in d.items()))
def test_invalid_settings_are_refused_with_a_message(bad, model):
    field = next(iter(bad))
    with pytest.raises(ValueError, match=field):
        GenerationSettings(**bad)
    with pytest.raises(ValueError, match=field):
        model.generate(PROMPT, **bad)


def test_settings_are_one_object_and_unknown_names_are_refused(model):
    settings = GenerationSettings(max_new_tokens=2, granularity="sequence", merge=True)
    assert GenerationSettings.of(settings) is settings  # passed through unchanged
    assert GenerationSettings.of(settings, seed=3) == GenerationSettings(2, 0.0, 1.0, 3, "sequence", True)
    with pytest.raises(TypeError, match="max_tokens"):
        model.generate(PROMPT, max_tokens=2)  # a misspelt setting is named, not ignored
    assert model.generate(PROMPT, settings=settings).token_ids == model.generate(PROMPT, max_new_tokens=2,
                                                                                granularity="sequence").token_ids


def test_exact_limits_are_accepted(model):
    for ok in (dict(max_new_tokens=1), dict(max_new_tokens=MAX_NEW_TOKENS), dict(top_p=1.0), dict(top_p=1e-9),
               dict(temperature=0), dict(temperature=0.0), dict(temperature=100), dict(seed=0), dict(seed=2**63 - 1)):
        GenerationSettings(**ok)
    out = model.generate(PROMPT, max_new_tokens=1, temperature=0, top_p=1.0)
    assert len(out.token_ids) <= 1
    limit = model.context_length - len(model.encode(PROMPT))  # prompt + new tokens exactly fill the context
    gen = model.stream(PROMPT, max_new_tokens=limit, top_p=1e-9, temperature=1.0)
    assert isinstance(next(gen), str)
    gen.close()
    with pytest.raises(ValueError, match=r"context is 512: shorten the prompt by 1 tokens"):
        model.generate(PROMPT, max_new_tokens=limit + 1)


def test_same_request_gives_identical_tokens_and_weights(model):
    ov = Overrides(groups={"style": 0.2}, experts={"labs": 0.7}, layers=(1, 3))
    runs = [model.generate(PROMPT, max_new_tokens=6, temperature=1.5, top_p=0.95, seed=7, overrides=ov)
            for _ in range(5)]
    for r in runs[1:]:
        assert r.token_ids == runs[0].token_ids
        np.testing.assert_array_equal(r.trace.effective_weights, runs[0].trace.effective_weights)
    others = {tuple(model.generate(PROMPT, max_new_tokens=6, temperature=1.5, seed=s).token_ids) for s in range(5)}
    assert len(others) > 1  # the seed matters, so the equality above is not vacuous


def test_routing_alone_equals_routing_in_a_left_padded_batch(model):
    prompts = [PROMPT, "hi", "List the vital signs of a 72 year old man with shortness of breath, HR 88 and SBP 142. "
               "Flag each as low, normal or high.", "Explain K 5.6 in plain language."]
    batch = model.route_batch(prompts, Overrides(groups={"task": 0.5}))
    assert len({len(model.encode(p)) for p in prompts}) == 4  # four lengths → left padding
    for p, b in zip(prompts, batch):
        solo = model.route(p, Overrides(groups={"task": 0.5}))
        for name in ("router_group_weights", "router_expert_weights", "group_weights", "expert_weights"):
            np.testing.assert_allclose(getattr(b, name), getattr(solo, name), atol=1e-5, rtol=0)


# ====================================================================== 9. cancellation

def test_stop_event_ends_the_stream_promptly(model):
    baseline = threading.active_count()
    ids = model.encode(PROMPT)
    reference = model.score(input_ids=ids).logits
    stop_reference = model.generate(PROMPT, max_new_tokens=6, temperature=1.0, seed=3)
    errors: list[BaseException] = []
    done = threading.Event()

    def neighbour():  # another session running at the same time must see no effect
        try:
            while not done.is_set():
                assert torch.equal(model.score(input_ids=ids).logits, reference)
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    t = threading.Thread(target=neighbour)
    t.start()
    stop = threading.Event()
    items, stopped_at = [], None
    for item in model.stream(PROMPT, max_new_tokens=400, temperature=1.0, seed=3, stop=stop):
        items.append(item)
        if len(items) == 2:
            stop.set()
            stopped_at = time.perf_counter()
    elapsed = time.perf_counter() - stopped_at
    again = model.generate(PROMPT, max_new_tokens=6, temperature=1.0, seed=3)
    done.set()
    t.join(timeout=30)
    assert not t.is_alive() and not errors
    assert len(items) == 3 and all(isinstance(x, str) for x in items[:2]) and isinstance(items[2], Generation)
    assert elapsed < 2.0
    assert items[2].finish_reason == "stopped" and items[2].text == "".join(items[:2])
    valid_trace(items[2].trace)
    assert again.token_ids == stop_reference.token_ids
    assert threading.active_count() == baseline and released(model)


def released(model: ATMoE) -> bool:
    """No call holds the model's routing workspace: every fused layer is its base layer again."""
    return not model.state.active and not model.state.lock.locked() and model.state.call is None


def test_closing_the_stream_early_leaves_the_model_clean(model):
    baseline = threading.active_count()
    expected = model.generate(PROMPT, max_new_tokens=4, temperature=0.8, seed=1)
    for _ in range(3):
        gen = model.stream(PROMPT, max_new_tokens=200, temperature=0.8, seed=1, overrides={"groups": {"task": 1.0}})
        assert isinstance(next(gen), str)
        gen.close()
        assert released(model)
    out = model.generate(PROMPT, max_new_tokens=4, temperature=0.8, seed=1)
    assert out.token_ids == expected.token_ids
    np.testing.assert_array_equal(out.trace.effective_weights, expected.trace.effective_weights)
    assert threading.active_count() == baseline


# ====================================================================== 10. dashboard exposure

def _app_files() -> list[Path]:
    return [p for p in [ROOT / "streamlit_app.py"] if p.exists()] + sorted((ROOT / "app").rglob("*.py"))


def test_dashboard_never_renders_raw_html():
    files = _app_files()
    assert (ROOT / "streamlit_app.py").exists() and len(files) >= 2, "the dashboard (app/, streamlit_app.py) is missing"
    banned = re.compile(r"unsafe_allow_html\s*=\s*True|unsafe_allow_javascript|\bst\.html\(|components\.html\(|"
                        r"components\.v1|components\.iframe\(|\.markdown\([^)]*<script")
    offenders = [f"{p.relative_to(ROOT)}:{i}: {line.strip()}" for p in files
                 for i, line in enumerate(p.read_text(encoding="utf-8").splitlines(), 1) if banned.search(line)]
    assert not offenders


def test_streamlit_config_keeps_xsrf_on_and_limits_uploads():
    path = ROOT / ".streamlit" / "config.toml"
    assert path.exists(), ".streamlit/config.toml is missing"
    server = tomllib.loads(path.read_text()).get("server", {})
    assert server.get("enableXsrfProtection", True) is True
    size = server.get("maxUploadSize")
    assert isinstance(size, int) and not isinstance(size, bool) and 1 <= size <= 200, size
