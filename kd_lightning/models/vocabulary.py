"""Vocabulary facts and surgery: what decides token ids, padded rows trimmed, one vocabulary checked."""

from __future__ import annotations

import hashlib
import json
import logging
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # annotations only: token_text_ids serves the served-teacher client, which loads no torch
    from torch import nn
    from transformers import PreTrainedTokenizerBase

log = logging.getLogger(__name__)


def trim_padded_vocabulary(model: nn.Module, vocab_size: int) -> nn.Module:
    """Drop the output rows (and embeddings) of ids beyond ``vocab_size``, in place.

    Many models pad ``config.vocab_size`` past their tokenizer for matrix-shape efficiency (Qwen: 151,936
    rows for 151,665 ids). No tokenizer ever produces those ids, but a softmax over padded logits gives them
    mass, so distributions of two models (or of a model and a store over the tokenizer's ids) only compare
    once the padding is gone. A model already at ``vocab_size`` is returned unchanged.
    """
    current = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
    if current > vocab_size:
        log.info(
            "trimming %d padded vocabulary rows (config.vocab_size %d → %d)",
            current - vocab_size,
            current,
            vocab_size,
        )
        model.resize_token_embeddings(vocab_size)
    return model


def check_same_vocabulary(student: nn.Module, teacher: nn.Module, why: str) -> None:
    """Refuse a teacher whose ``config.vocab_size`` differs from the student's (logit-level KD needs one)."""
    s_vocab = getattr(getattr(student, "config", None), "vocab_size", None)
    t_vocab = getattr(getattr(teacher, "config", None), "vocab_size", None)
    if s_vocab is not None and t_vocab is not None and s_vocab != t_vocab:
        raise ValueError(
            f"teacher config.vocab_size={t_vocab} but student config.vocab_size={s_vocab}; {why}, so both need "
            "one vocabulary (pick a student built on the teacher's tokenizer)"
        )


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash of what decides token ids: vocabulary, special tokens and chat template."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": getattr(tokenizer, "chat_template", None),
        "class": type(tokenizer).__name__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def token_text_ids(tokenizer: PreTrainedTokenizerBase, skip_special: bool = False) -> dict[str, int]:
    """Each token's decoded text → its id (the first id when several decode alike).

    A served teacher names the tokens of a prompt by this text, specials included (its prompts carry the chat
    template); an API's log-probs name the tokens of an answer, which holds none (``skip_special=True``, so
    that a special token's text cannot take an ordinary token's place).
    """
    special = set(tokenizer.all_special_ids) if skip_special else set()
    found: dict[str, int] = {}
    for token_id in range(len(tokenizer)):
        if token_id not in special:
            found.setdefault(tokenizer.decode([token_id], skip_special_tokens=False), token_id)
    return found


def vocab_size_of(model: nn.Module) -> int:
    """The number of logits the model emits (``config.vocab_size``, not ``len(tokenizer)``)."""
    return int(model.config.vocab_size)


def trim_teacher_padding(student: nn.Module, teacher: nn.Module, tokenizer: Any) -> None:
    """Trim a teacher's padded vocabulary rows to the student's width when both cover the tokenizer's ids."""
    s_vocab = int(getattr(getattr(student, "config", None), "vocab_size", 0) or 0)
    t_vocab = int(getattr(getattr(teacher, "config", None), "vocab_size", 0) or 0)
    if tokenizer is not None and t_vocab > s_vocab >= len(tokenizer) > 0:
        trim_padded_vocabulary(teacher, s_vocab)
