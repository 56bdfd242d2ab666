"""Checks that keep a soft-label store from being read wrong: every file's checksum (written with it), its
indexes (monotone, in bounds, consistent with the entries), its provenance against the run's, and its rows
as distributions over valid ids. Every failure is one line naming the file, the store and the fix."""

from __future__ import annotations

import hashlib
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


CHECKSUM = "sha256"
_VERIFIED: set[tuple[str, int, int, str]] = set()
"""(file, size, mtime_ns, digest) already verified in this process: a store opened once per variant of a
pipeline is hashed once."""


def file_checksum(path: Path) -> str:
    """sha256 of a file's bytes (hex), read in 4 MiB blocks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def folder_checksums(folder: Path) -> dict[str, str]:
    """The checksum of every file in ``folder`` but ``meta.json`` (which records them)."""
    return {
        p.name: file_checksum(p) for p in sorted(folder.iterdir()) if p.is_file() and p.name != "meta.json"
    }


def verify_checksums(folder: Path, meta: Mapping[str, Any], fix: str) -> None:
    """Refuse, in one line naming the file, a store file whose bytes are not those written (a file
    overwritten in place keeps its size, and a log8 row is renormalised on reading, so nothing else would
    notice), or a file the writer recorded that is missing."""
    for name, digest in (meta.get("checksums") or {}).items():
        path = folder / name
        if not path.is_file():
            raise StoreCorruptError(f"{path} is missing (the store {folder} was written with it); {fix}")
        stat = path.stat()
        stamp = (str(path.resolve()), stat.st_size, stat.st_mtime_ns, str(digest))
        if stamp in _VERIFIED:
            continue
        if file_checksum(path) != digest:
            raise StoreCorruptError(
                f"{path} does not hold the bytes it was written with ({CHECKSUM} differs): the store {folder} is "
                f"corrupted; {fix}"
            )
        _VERIFIED.add(stamp)


def check_offsets(offsets: np.ndarray, rows: int, sequences_name: str, where: Path, fix: str) -> None:
    """A row index: starts at 0, never decreases, ends at ``rows``."""
    offsets = np.asarray(offsets, dtype=np.int64)
    if len(offsets) < 1 or int(offsets[0]) != 0:
        raise StoreCorruptError(f"{where}: {sequences_name} does not start at 0; {fix}")
    if (np.diff(offsets) < 0).any():
        at = int(np.nonzero(np.diff(offsets) < 0)[0][0])
        raise StoreCorruptError(
            f"{where}: {sequences_name} decreases at sequence {at} (a broken index); {fix}"
        )
    if int(offsets[-1]) != rows:
        raise StoreCorruptError(f"{where}: {sequences_name} ends at {int(offsets[-1])}, not at {rows}; {fix}")


def check_ragged_index(
    entries: np.ndarray, entry_offsets: np.ndarray, offsets: np.ndarray, where: Path, fix: str
) -> None:
    """A ragged store's entry index: each sequence's first entry is the sum of the entry counts of the rows
    before it (so a shifted offset reads another sequence's entries, which this refuses)."""
    ends = np.concatenate([[0], np.cumsum(np.asarray(entries, dtype=np.int64))])
    expected = ends[np.asarray(offsets, dtype=np.int64)]
    found = np.asarray(entry_offsets, dtype=np.int64)
    if found.shape != expected.shape or not np.array_equal(found, expected):
        at = int(np.nonzero(found != expected)[0][0]) if found.shape == expected.shape else 0
        raise StoreCorruptError(
            f"{where}/entry_offsets.npy: sequence {at} starts at entry {int(found[at]) if len(found) else None}, "
            f"but the row counts put it at {int(expected[at])} (a broken index); {fix}"
        )
