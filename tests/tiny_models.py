"""Tiny offline models, tokenizers and PEFT adapters for fast tests (no downloads).

``tiny_tokenizer()`` is a byte-level BPE trained in memory with a ChatML chat template (like SmolLM2's);
``tiny_llama(vocab_size)`` a randomly initialised 2-layer Llama that has every LoRA target module (q/k/v/o/gate/up/down
projections); ``tiny_model(arch)`` a random Llama, GPT-2 (Conv1D) or Qwen2; ``save_adapter`` a random PEFT LoRA
adapter; ``tiny_demo(folder)`` a complete tiny AT-MoE on disk; ``randomize(router)`` random
router heads.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable
from pathlib import Path

import torch
from peft import LoraConfig, get_peft_model
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import (AutoModelForCausalLM, GPT2Config, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast,
                          Qwen2Config)

CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
SPECIAL_TOKENS = ["<pad>", "<|im_start|>", "<|im_end|>"]

_DEFAULT_CORPUS = [
    "Summarize this case in one line. Triage this patient. List the medications as JSON.",
    "72 yo M w/ hx HTN c/o SOB. HR 88, BP 142/90, RR 18, SpO2 97% on RA, Temp 37.1 C.",
    '[{"drug": "metformin", "dose": "500 mg PO BID"}] - bullet points, plain language.',
    "EMERGENT URGENT ROUTINE potassium 5.6 mmol/L: high, sodium 138 mmol/L: normal.",
]


def tiny_tokenizer(corpus: Iterable[str] | None = None, vocab_size: int = 512,
                   chat_template: bool = True) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on ``corpus`` (any text encodes; nothing is unknown)."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(list(corpus) if corpus is not None else _DEFAULT_CORPUS, trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<|im_end|>",
                                   bos_token="<|im_start|>")
    if chat_template:
        fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_llama(vocab_size: int, seed: int = 0, hidden_size: int = 32, layers: int = 2,
               initializer_range: float = 0.3) -> LlamaForCausalLM:
    """A randomly initialised Llama small enough to train for a few steps in a test.

    The wide ``initializer_range`` (HF default 0.02) keeps logits far from uniform, so a
    LoRA adapter's few training steps visibly lower the loss.
    """
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden_size, intermediate_size=2 * hidden_size,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, pad_token_id=0, tie_word_embeddings=False,
                         initializer_range=initializer_range)
    return LlamaForCausalLM(config).eval()


TARGETS = {
    "llama": ["q_proj", "v_proj", "o_proj", "down_proj"],
    "gpt2": ["c_attn", "c_proj", "c_fc"],
    "qwen2": ["q_proj", "k_proj", "up_proj"],
}


def tiny_model(arch: str = "llama", seed: int = 0, vocab_size: int = 128, layers: int = 3, hidden: int = 32
               ) -> torch.nn.Module:
    torch.manual_seed(seed)
    if arch == "llama":
        cfg = LlamaConfig(vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden,
                          num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=256)
    elif arch == "gpt2":
        cfg = GPT2Config(vocab_size=vocab_size, n_embd=32, n_layer=layers, n_head=4, n_positions=256)
    elif arch == "qwen2":
        cfg = Qwen2Config(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=layers,
                          num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)
    else:
        raise ValueError(arch)
    return AutoModelForCausalLM.from_config(cfg).eval()


def save_adapter(model: torch.nn.Module, path: Path, targets: list[str], r: int = 4, alpha: float = 8,
                 seed: int = 1, **lora: object) -> Path:
    """A PEFT LoRA adapter with random, non-zero A and B, saved in the standard format."""
    torch.manual_seed(seed)
    fan = any(t.startswith("c_") for t in targets)  # GPT-2 Conv1D
    cfg = LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, init_lora_weights=False,
                     fan_in_fan_out=fan, **lora)
    peft_model = get_peft_model(copy.deepcopy(model), cfg)
    with torch.no_grad():  # larger B so the experts visibly change the logits
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    peft_model.save_pretrained(path)
    return path


def randomize(router: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random router heads (N(0, 0.5)), marked trained: an untrained router is exactly uniform and reads nothing."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in router.parameters():
            p.normal_(0, 0.5)
    router.trained = True
    return router


def tiny_demo(folder: Path, mode: str = "softmax", trained: bool = True, seed: int = 0, pooling: str = "mean") -> Path:
    """A complete tiny AT-MoE on disk: base (with tokenizer), the 6 demo experts, a router, the manifest.
    Returns the manifest path. Used by app, CLI and reliability tests."""
    from atmoe.load.manifest import ExpertEntry, GroupEntry, Manifest
    from demo.suite import EXPERT_DESCRIPTIONS, EXPERT_VALUES, GROUPS
    from atmoe.model import ATMoE
    from atmoe.router import save_router

    folder = Path(folder)
    tok = tiny_tokenizer()
    base = tiny_llama(len(tok), seed=seed, layers=4)
    base.save_pretrained(folder / "base")
    tok.save_pretrained(folder / "base")
    targets = ["q_proj", "v_proj", "o_proj", "up_proj", "down_proj"]
    groups = []
    for gi, (group, names) in enumerate(GROUPS.items()):
        entries = []
        for ei, name in enumerate(names):
            save_adapter(base, folder / "experts" / name, targets[(gi + ei) % 2:], r=4, alpha=8,
                         seed=seed + 100 * gi + ei)
            entries.append(ExpertEntry(name, f"experts/{name}", description=EXPERT_DESCRIPTIONS[name],
                                       values=EXPERT_VALUES.get(name)))
        groups.append(GroupEntry(group, entries))
    manifest = Manifest(groups, base_model="base", root=folder)
    path = manifest.save(folder / "experts.json")
    if trained:
        m = ATMoE.load(path, device="cpu")
        from atmoe.model import new_router
        router = randomize(new_router(m, mode=mode, pooling=pooling), seed)
        save_router(router, folder / "router.safetensors")
        manifest.router = "router.safetensors"
        manifest.save(path)
    return path
