"""Tiny offline models and tokenizers for fast tests (no downloads).

``tiny_tokenizer()`` is a byte-level BPE trained in memory with a ChatML chat template
(like SmolLM2's); ``tiny_llama(vocab_size)`` a randomly initialised 2-layer Llama that has
every LoRA target module (q/k/v/o/gate/up/down projections).
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

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
