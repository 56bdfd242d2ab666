"""Two tiny tokenizers with different merges, built in-process (cross-tokenizer tests), and their texts.

A GPT-2-style byte-level BPE (whitespace folded into the next token) and a Llama/Gemma-style BPE with ``▁``
word markers and byte fallback.
"""

from __future__ import annotations

import random

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from kd_lightning.data.records import Record

CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Distillation trains a small student to imitate a large teacher.",
    "Tokenizers of different families split the same words differently, e.g. 'unbelievable'.",
    "Numbers like 12345 and 3.14159 and code like x = f(y) + 2 appear too.",
] * 20
SPECIAL = "<|im_end|>"


def byte_level_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[SPECIAL]
    )
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL)


def byte_fallback_tokenizer(vocab_size: int) -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.BPE(byte_fallback=True, unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Sequence([decoders.ByteFallback(), decoders.Metaspace()])
    bytes_ = [f"<0x{i:02X}>" for i in range(256)]
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL, *bytes_])
    tok.train_from_iterator(CORPUS, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token=SPECIAL)


def random_texts(n: int, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    pieces = [
        "the",
        " fox",
        "  ",
        "\n",
        "distil",
        "lation",
        "é",
        "ü",
        "😀",
        "日本",
        "12",
        ".",
        ",",
        " ",
        "'",
        "x=1",
    ]
    return ["".join(rng.choice(pieces) for _ in range(rng.randint(1, 30))) for _ in range(n)]


RECORDS = [
    Record(instruction=f"Say something about item {i}.", response=text)
    for i, text in enumerate([*CORPUS[:4], "Emoji 😀 and ünïcödé, then 12345.", "short"])
]
