"""Tiny tokenizers for random-weight demo and test pipelines (no model hub here).

A byte-level BPE trained on a few sentences covers any input text (bytes are its alphabet),
so real prompts tokenize without unknown tokens.
"""

from __future__ import annotations

_CORPUS = [
    "a photo of a cat sitting on a red chair in the sun",
    "a watercolor painting of mountains at dawn, soft light",
    "an astronaut riding a horse on the moon, highly detailed",
    "a bowl of fruit on a wooden table, studio lighting",
    "<|im_start|>user\nhello<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n",
]

# Qwen-style special tokens that chat templates and pipelines refer to by name.
QWEN_SPECIAL = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<think>", "</think>"]

# Accepts enable_thinking as Qwen3's template does; ZImagePipeline passes enable_thinking=True.
QWEN3_CHAT_TEMPLATE = (
    "{% for message in messages %}<|im_start|>{{ message['role'] }}\n{{ message['content'] }}<|im_end|>\n"
    "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n"
    "{% if enable_thinking is defined and enable_thinking is false %}<think>\n\n</think>\n\n{% endif %}{% endif %}"
)


def train_bpe(vocab_size: int = 400, special: list[str] | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A tiny byte-level BPE: (vocab, merges as tuples)."""
    import json

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(special or []),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(_CORPUS, trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def qwen2_tokenizer(chat_template: str | None = None, model_max_length: int = 1024):
    """A tiny Qwen2Tokenizer (used by Qwen-Image and, with a chat template, by Z-Image)."""
    from transformers import Qwen2Tokenizer

    vocab, merges = train_bpe(special=QWEN_SPECIAL)
    tok = Qwen2Tokenizer(
        vocab=vocab,
        merges=merges,
        unk_token=None,
        bos_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        model_max_length=model_max_length,
    )
    if chat_template is not None:
        tok.chat_template = chat_template
    return tok
