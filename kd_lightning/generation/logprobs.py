"""An API teacher's top-k log-probabilities as a soft-label store over the student's tokenizer.

``kdl generate sampling.top_logprobs=K`` writes ``logprobs.jsonl``: per record, the generated tokens as
text, each with its log-probability and the top-K alternatives. That evidence only means something at a
position where the teacher's token is also the student's token, so rows are aligned by text: a response
position whose token starts at the same character and reads the same as a teacher token gets the
teacher's distribution (alternatives mapped to the student's ids by their text; unmappable ones fall in
the tail bucket); every other position gets the observed token with probability 1 (no evidence beyond
the text). With a teacher that shares the student's tokenizer (an open model behind an API) nearly every
position aligns; with a foreign tokenizer only the positions where both happen to split alike do.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from kd_lightning.data.records import jsonl_objects
from kd_lightning.data.soft_labels import SoftLabelStore, SparseRows, id_dtype_for, write_store
from kd_lightning.data.tokenized import TokenizedCorpus
from kd_lightning.models.vocabulary import token_text_ids


def read_logprobs(path: str | os.PathLike) -> dict[str, list[dict[str, Any]]]:
    """``{record key: per-token entries}`` from a ``logprobs.jsonl`` written by ``kdl generate``."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(
            f"log-prob file {path} does not exist; generate with sampling.top_logprobs=K (K ≥ 1) to write it"
        )
    found = {}
    for where, row in jsonl_objects(path):
        if not isinstance(row.get("key"), str) or not isinstance(row.get("tokens"), list):
            raise ValueError(f"{where}: expected {{'key': ..., 'tokens': [...]}}; regenerate the file")
        found[row["key"]] = row["tokens"]
    return found


def ids_by_text(tokenizer) -> dict[str, int]:
    """Deprecated: :func:`kd_lightning.models.vocabulary.token_text_ids` with ``skip_special=True``."""
    warnings.warn(
        "kd_lightning.generation.logprobs.ids_by_text is now "
        "kd_lightning.models.vocabulary.token_text_ids(tokenizer, skip_special=True); "
        "the old name will be removed in v0.3.0",
        FutureWarning,
        stacklevel=2,
    )
    return token_text_ids(tokenizer, skip_special=True)


def aligned_rows(
    response_ids: Sequence[int],
    teacher_tokens: Sequence[Mapping[str, Any]],
    tokenizer,
    text_to_id: Mapping[str, int],
    width: int,
    id_dtype: np.dtype,
) -> tuple[SparseRows, np.ndarray]:
    """Rows for each response position, and which of them carry the teacher's distribution (see module doc)."""
    starts: dict[tuple[int, str], int] = {}
    text = "".join(t["token"] for t in teacher_tokens)
    position = -(len(text) - len(text.lstrip()))  # the corpus keeps the stripped response
    for index, token in enumerate(teacher_tokens):
        starts[(position, token["token"])] = index
        position += len(token["token"])
    ids = np.zeros((len(response_ids), width), dtype=id_dtype)
    probs = np.zeros((len(response_ids), width), dtype=np.float16)
    tail = np.zeros(len(response_ids), dtype=np.float32)
    aligned = np.zeros(len(response_ids), dtype=bool)
    position = 0
    for row, token_id in enumerate(response_ids):
        piece = tokenizer.decode([int(token_id)])
        match = starts.get((position, piece))
        position += len(piece)
        if match is None:
            ids[row, 0], probs[row, 0] = token_id, 1.0
            continue
        aligned[row] = True
        entry = teacher_tokens[match]
        dist = {int(token_id): math.exp(float(entry["logprob"]))}
        for alternative, logprob in entry.get("top") or []:
            alt_id = text_to_id.get(alternative)
            if alt_id is not None:
                dist[alt_id] = max(dist.get(alt_id, 0.0), math.exp(float(logprob)))
        ranked = sorted(dist.items(), key=lambda kv: -kv[1])[:width]
        mass = sum(p for _, p in ranked)
        scale = 1.0 / mass if mass > 1.0 else 1.0
        for column, (alt_id, p) in enumerate(ranked):
            ids[row, column], probs[row, column] = alt_id, p * scale
        tail[row] = max(0.0, 1.0 - mass * scale)
    return SparseRows(ids, probs, tail), aligned


def build_logprob_store(
    corpus: TokenizedCorpus,
    logprobs: Mapping[str, Sequence[Mapping[str, Any]]],
    tokenizer,
    folder: str | os.PathLike,
    provenance: Mapping[str, Any],
    vocab_size: int,
) -> tuple[SoftLabelStore, dict[str, float]]:
    """A soft-label store with a row for every target position of ``corpus`` (see module doc)."""
    if corpus.record_keys is None:
        raise ValueError(
            "this tokenized corpus has no record keys; delete its artifacts/corpus folder to rebuild it"
        )
    width = 1 + max((len(t.get("top") or []) for tokens in logprobs.values() for t in tokens), default=0)
    text_to_id = token_text_ids(tokenizer, skip_special=True)
    id_dtype = id_dtype_for(vocab_size)
    parts, masks, with_evidence = [], [], 0
    for seq, key in enumerate(corpus.record_keys):
        sequence = corpus.sequence(seq)
        targets = sequence[int(corpus.prompt_lens[seq]) :].tolist()
        rows, mask = aligned_rows(targets, logprobs.get(key, []), tokenizer, text_to_id, width, id_dtype)
        parts.append(rows)
        masks.append(mask)
        with_evidence += key in logprobs
    rows = SparseRows.concat(parts)
    evidence = np.concatenate(masks) if masks else np.zeros(0, dtype=bool)
    aligned = int(evidence.sum())
    store = write_store(folder, rows, corpus.target_offsets(), provenance, evidence=evidence)
    stats = {
        "sequences": len(corpus),
        "sequences_with_logprobs": with_evidence,
        "positions": len(rows.tail),
        "aligned_positions": aligned,
        "aligned_share": aligned / max(len(rows.tail), 1),
    }
    return store, stats
