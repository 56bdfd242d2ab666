"""Checks that keep a soft-label store from being read wrong: its provenance against the run's, and its rows
as distributions over valid ids. Every failure is one line naming the store and the fix."""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np


class StoreMismatchError(ValueError):
    """A store's provenance does not match the run that wants to use it."""


class StoreCorruptError(ValueError):
    """A store's files or contents are unusable; the message names the folder and the fix."""


SUM_TOLERANCE = 2e-2
"""How far a row's stored mass (top-k in float16, plus the tail) may be from 1 (float16 rounding of k
probabilities is ~1e-3; anything beyond a few per cent is a broken estimator, not rounding)."""
VALIDATE_CHUNK_ROWS = 1 << 18


def fix_hint(folder: Path) -> str:
    kind = folder.parent.name or "store"
    return f"delete {folder} and rerun its stage (or add rebuild=[{kind}])"


def validate_rows(
    ids: np.ndarray,
    probs: np.ndarray,
    tail: np.ndarray,
    where: str | os.PathLike,
    vocab_size: int | None = None,
    fix: str = "",
) -> None:
    """Raise a one-line :class:`StoreCorruptError` unless every row is a distribution over valid ids.

    Checked in chunks: finite, non-negative probabilities and tails, ``Σ probs + tail`` within
    :data:`SUM_TOLERANCE` of 1, and ids inside ``[0, vocab_size)`` (when the vocabulary is known).
    """
    rows = len(tail)
    if probs.shape[:1] != (rows,) or ids.shape != probs.shape:
        raise StoreCorruptError(
            f"{where}: ids {ids.shape}, probs {probs.shape} and tail {tail.shape} disagree in shape; {fix}"
        )
    for start in range(0, rows, VALIDATE_CHUNK_ROWS):
        stop = min(start + VALIDATE_CHUNK_ROWS, rows)
        p = np.asarray(probs[start:stop], dtype=np.float32)
        t = np.asarray(tail[start:stop], dtype=np.float32)
        if not (np.isfinite(p).all() and np.isfinite(t).all()):
            bad = start + int(np.nonzero(~(np.isfinite(p).all(1) & np.isfinite(t)))[0][0])
            raise StoreCorruptError(f"{where}: row {bad} holds a non-finite probability; {fix}")
        if (p < 0).any() or (t < 0).any():
            bad = start + int(np.nonzero((p < 0).any(1) | (t < 0))[0][0])
            raise StoreCorruptError(f"{where}: row {bad} holds a negative probability; {fix}")
        total = p.sum(1, dtype=np.float64) + t
        off = np.abs(total - 1.0) > SUM_TOLERANCE
        if off.any():
            bad = int(np.nonzero(off)[0][0])
            raise StoreCorruptError(
                f"{where}: row {start + bad} sums to {total[bad]:.4f}, not 1 (stored ids + tail); {fix}"
            )
        if vocab_size is not None:
            i = np.asarray(ids[start:stop])
            outside = (i.astype(np.int64) >= vocab_size) | (i.astype(np.int64) < 0)
            if outside.any():
                r, c = (int(x[0]) for x in np.nonzero(outside))
                raise StoreCorruptError(
                    f"{where}: row {start + r} holds id {int(i[r, c])}, outside the vocabulary of "
                    f"{vocab_size} ids (a store for another tokenizer?); {fix}"
                )


def check_provenance(found: Mapping[str, Any], expected: Mapping[str, Any], where: str | os.PathLike) -> None:
    """Raise a one-line :class:`StoreMismatchError` naming the first key that differs."""
    for key, value in expected.items():
        if key not in found:
            raise StoreMismatchError(
                f"{where}: provenance has no {key!r}; rebuild it with the current kd_lightning"
            )
        if json.dumps(found[key], sort_keys=True) != json.dumps(value, sort_keys=True):
            raise StoreMismatchError(
                f"{where}: {key} is {found[key]!r} but this run needs {value!r}; "
                "rebuild the store (rerun the estimation stage) or point the run at the matching one"
            )
