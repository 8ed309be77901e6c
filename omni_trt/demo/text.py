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


def train_bpe(vocab_size: int = 400, special: list[str] | None = None, corpus: list[str] | None = None) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """A tiny byte-level BPE: (vocab, merges as tuples), learnt from `corpus` (default: a few sentences)."""
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
    tok.train_from_iterator(_CORPUS + list(corpus or []), trainer)
    model = json.loads(tok.to_str())["model"]
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
    return dict(model["vocab"]), merges


def qwen2_tokenizer(chat_template: str | None = None, model_max_length: int = 1024, corpus: list[str] | None = None):
    """A tiny Qwen2Tokenizer (used by Qwen-Image and, with a chat template, by Z-Image); corpus:
    more text its merges learn from (the trained demo's captions become a few tokens each)."""
    from transformers import Qwen2Tokenizer

    vocab, merges = train_bpe(special=QWEN_SPECIAL, corpus=corpus)
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


CLIP_BOS = "<|startoftext|>"
CLIP_EOS = "<|endoftext|>"


def clip_tokenizer(model_max_length: int = 77, pad_token: str = CLIP_EOS):
    """A tiny CLIPTokenizer: every byte and byte+</w> is a token (no merges), so any text
    tokenizes without unknowns. model_max_length must be set: Flux and SD3 pad CLIP prompts to
    it, and CLIP's position table has 77 rows. SD3's second CLIP (bigG) pads with "!"."""
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)}
    vocab.update({c + "</w>": len(chars) + i for i, c in enumerate(chars)})
    vocab[CLIP_BOS] = len(vocab)
    vocab[CLIP_EOS] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=[], pad_token=pad_token, model_max_length=model_max_length)


def t5_tokenizer(model_max_length: int = 512):
    """A tiny T5 (Unigram) tokenizer: whole corpus words, then single ASCII characters as the
    fallback (others map to <unk>). Ids 0/1/2 are <pad>/</s>/<unk> as in T5; no sentinel tokens."""
    import re
    import string

    from transformers import T5Tokenizer

    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    seen = {p for p, _ in pieces}

    def add(piece: str, score: float) -> None:
        if piece not in seen:
            seen.add(piece)
            pieces.append((piece, score))

    for c in string.ascii_letters + string.digits + string.punctuation:
        add(c, -6.0)
        add("\u2581" + c, -7.0)
    for word in sorted({w for line in _CORPUS for w in re.findall(r"[A-Za-z]+", line)}):
        add("\u2581" + word, -3.0)
    return T5Tokenizer(vocab=pieces, extra_ids=0, model_max_length=model_max_length)
