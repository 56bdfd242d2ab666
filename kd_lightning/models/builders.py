"""Students built rather than loaded: selected layers of a bigger model, small random Llamas."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM

from kd_lightning.atomic import atomic_folder
from kd_lightning.models.hub import resolve_model_path
from kd_lightning.models.loading import load_causal_lm, load_tokenizer


def layer_selected_student(
    teacher_path: str | os.PathLike, layers: list[int], dtype: torch.dtype | str = torch.float32
) -> nn.Module:
    """A student made of selected decoder layers of a larger model (DistilBERT-style initialisation).

    Keeps embeddings, final norm and head; ``layers`` are indices into the source model's layers.
    Truncation is only an initialisation: the student must be trained before it says anything.
    """
    model = load_causal_lm(teacher_path, dtype=dtype)
    source = model.model.layers
    if not layers or any(i < 0 or i >= len(source) for i in layers):
        raise ValueError(f"layers={layers} must be non-empty indices in [0, {len(source)}) of {teacher_path}")
    model.model.layers = nn.ModuleList([source[i] for i in layers])
    for new_index, layer in enumerate(model.model.layers):
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new_index
    model.config.num_hidden_layers = len(layers)
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = [model.config.layer_types[i] for i in layers]
    return model


def layer_selected_folder(
    source_path: str | os.PathLike, layers: list[int], cache_dir: str | os.PathLike
) -> Path:
    """:func:`layer_selected_student` saved as an HF folder (cached by source and layers), for model slots
    that take a path, e.g. a weaker proxy than the teacher it is aligned to (``proxy=smollm2_layers``)."""
    folder = resolve_model_path(source_path)
    key = hashlib.sha256(json.dumps({"source": str(folder), "layers": list(layers)}).encode()).hexdigest()[
        :12
    ]
    target = Path(cache_dir) / f"{folder.name}-{len(layers)}layers-{key}"
    if (target / "config.json").is_file():
        return target
    model = layer_selected_student(folder, list(layers))
    with atomic_folder(target) as tmp:
        model.save_pretrained(tmp)
        load_tokenizer(folder).save_pretrained(tmp)
    return target


def tiny_llama(
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    tie_word_embeddings: bool = True,
) -> nn.Module:
    """A small randomly initialised Llama (unit tests, or a from-scratch student with a real tokenizer)."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def random_llama(
    tokenizer_path: str,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 704,
    seed: int = 0,
) -> nn.Module:
    """A randomly initialised small Llama sized to a tokenizer's vocabulary (a from-scratch student)."""
    tokenizer = load_tokenizer(tokenizer_path)
    return tiny_llama(
        max(len(tokenizer), tokenizer.vocab_size),
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        intermediate_size=intermediate_size,
        seed=seed,
    )
