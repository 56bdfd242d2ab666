"""Soft-label store: sparse per-position teacher distributions, memory-mapped, with provenance.

Layout of a store folder (one row per target position of a tokenised corpus, in corpus order)::

    meta.json      provenance (tokenizer fingerprint, corpus fingerprint, estimator settings), shapes
    ids.npy        (rows, k) uint16 / int32 token ids, sorted by probability (descending)
    probs.npy      (rows, k) float16 probabilities of those ids
    tail.npy       (rows,)   float32 probability mass outside the top-k ("tail bucket")
    offsets.npy    (num_seqs + 1,) int64 row offsets of each sequence

Writes are atomic: a store is built in a hidden sibling folder and renamed into place, so a killed
writer leaves either nothing or a complete store. Long stages write shards into ``<store>.partial/``
(each shard atomic too) so a rerun continues where the killed one stopped.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

FORMAT_VERSION = 1


class StoreMismatchError(ValueError):
    """A store's provenance does not match the run that wants to use it."""


def id_dtype_for(vocab_size: int) -> np.dtype:
    """The smallest id dtype that holds the vocabulary (uint16 up to 65,535 ids)."""
    return np.dtype(np.uint16) if vocab_size <= np.iinfo(np.uint16).max else np.dtype(np.int32)


@dataclass
class SparseRows:
    """A block of sparse distributions: top-k ids and probabilities plus the remaining tail mass."""

    ids: np.ndarray  # (rows, k)
    probs: np.ndarray  # (rows, k)
    tail: np.ndarray  # (rows,)

    @classmethod
    def from_dense(cls, probs: torch.Tensor, top_k: int, id_dtype: np.dtype) -> SparseRows:
        """Top-k of dense distributions ``(rows, V)``; tail = 1 - kept mass (clamped at 0)."""
        values, ids = torch.topk(probs.float(), k=min(top_k, probs.shape[-1]), dim=-1)
        tail = (1.0 - values.sum(-1)).clamp_min(0.0)
        return cls(
            ids.cpu().numpy().astype(id_dtype),
            values.cpu().numpy().astype(np.float16),
            tail.cpu().numpy().astype(np.float32),
        )

    @classmethod
    def concat(cls, parts: list[SparseRows]) -> SparseRows:
        """Rows of several blocks, in order."""
        return cls(*(np.concatenate([getattr(p, name) for p in parts]) for name in ("ids", "probs", "tail")))

    def slice(self, start: int, stop: int) -> SparseRows:
        return SparseRows(self.ids[start:stop], self.probs[start:stop], self.tail[start:stop])

    def to_dense(self, vocab_size: int) -> torch.Tensor:
        """Dense ``(rows, V)`` float32; the tail mass is spread evenly over the ids a row does not store.

        Rows with fewer than k entries are padded with (id 0, probability 0). Those slots are not entries:
        only slots with positive probability are written, so a real entry for id 0 (``!`` in GPT-2, Llama 3
        and Qwen vocabularies) is never overwritten by padding, and the tail is spread over every id outside
        the row's real entries.
        """
        ids = torch.from_numpy(self.ids.astype(np.int64))
        probs = torch.from_numpy(self.probs.astype(np.float32))
        tail = torch.from_numpy(self.tail.astype(np.float32))
        real = probs > 0
        outside = (vocab_size - real.sum(1)).clamp_min(1).float()
        dense = (tail / outside).unsqueeze(1).expand(-1, vocab_size).clone()
        rows = torch.arange(ids.shape[0]).unsqueeze(1).expand_as(ids)
        dense[rows[real], ids[real]] = probs[real]
        return dense


def _write_arrays(folder: Path, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any]) -> None:
    """Write arrays + meta.json into ``folder`` atomically (hidden temp sibling, then rename)."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.tmp-", dir=folder.parent))
    try:
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", array)
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))
        if folder.exists():
            shutil.rmtree(folder)
        os.replace(tmp, folder)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


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


class SoftLabelStore:
    """Read side: memory-mapped sparse soft labels for each sequence of a tokenised corpus."""

    def __init__(self, folder: str | os.PathLike, expect: Mapping[str, Any] | None = None) -> None:
        self.folder = Path(folder)
        if not (self.folder / "meta.json").is_file():
            raise FileNotFoundError(f"no soft-label store at {self.folder}; run its estimation stage first")
        self.meta = json.loads((self.folder / "meta.json").read_text())
        if self.meta.get("format_version") != FORMAT_VERSION:
            raise StoreMismatchError(
                f"{self.folder}: format_version {self.meta.get('format_version')} != {FORMAT_VERSION}; rebuild it"
            )
        if expect:
            check_provenance(self.meta["provenance"], expect, self.folder)
        self.ids = np.load(self.folder / "ids.npy", mmap_mode="r")
        self.probs = np.load(self.folder / "probs.npy", mmap_mode="r")
        self.tail = np.load(self.folder / "tail.npy", mmap_mode="r")
        self.offsets = np.load(self.folder / "offsets.npy")

    @property
    def provenance(self) -> dict[str, Any]:
        return self.meta["provenance"]

    @property
    def top_k(self) -> int:
        return int(self.ids.shape[1])

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def rows(self, seq: int) -> SparseRows:
        start, stop = int(self.offsets[seq]), int(self.offsets[seq + 1])
        return SparseRows(
            np.asarray(self.ids[start:stop]),
            np.asarray(self.probs[start:stop]),
            np.asarray(self.tail[start:stop]),
        )

    def all_rows(self) -> SparseRows:
        return SparseRows(np.asarray(self.ids), np.asarray(self.probs), np.asarray(self.tail))

    def nbytes_per_row(self) -> float:
        total = sum((self.folder / f"{n}.npy").stat().st_size for n in ("ids", "probs", "tail", "offsets"))
        return total / max(len(self.tail), 1)


def write_store(
    folder: str | os.PathLike, rows: SparseRows, offsets: np.ndarray, provenance: Mapping[str, Any]
) -> SoftLabelStore:
    """Write a complete store atomically and return it opened."""
    if len(rows.ids) != int(offsets[-1]):
        raise ValueError(f"{len(rows.ids)} rows but offsets end at {int(offsets[-1])}")
    meta = {
        "format_version": FORMAT_VERSION,
        "provenance": dict(provenance),
        "rows": len(rows.ids),
        "top_k": int(rows.ids.shape[1]),
        "id_dtype": str(rows.ids.dtype),
    }
    _write_arrays(
        Path(folder),
        {
            "ids": rows.ids,
            "probs": rows.probs,
            "tail": rows.tail,
            "offsets": np.asarray(offsets, dtype=np.int64),
        },
        meta,
    )
    return SoftLabelStore(folder)


class ShardedStoreWriter:
    """Resumable writer: shard ``j`` covers sequences ``[j·S, (j+1)·S)``; finished shards survive a kill.

    Usage::

        writer = ShardedStoreWriter(folder, offsets, provenance, shard_size=64)
        for shard in writer.pending():          # skips shards a killed run already wrote
            writer.write(shard, compute(shard))  # rows for those sequences, in order
        store = writer.finish()                  # concatenates, renames into place, removes .partial
    """

    def __init__(
        self, folder: str | os.PathLike, offsets: np.ndarray, provenance: Mapping[str, Any], shard_size: int
    ) -> None:
        self.folder = Path(folder)
        self.partial = self.folder.with_name(self.folder.name + ".partial")
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.provenance = dict(provenance)
        self.shard_size = shard_size
        self.num_shards = -(-(len(self.offsets) - 1) // shard_size)
        marker = self.partial / "provenance.json"
        if marker.is_file() and json.loads(marker.read_text()) != json.loads(
            json.dumps(self.provenance, sort_keys=True)
        ):
            shutil.rmtree(self.partial)  # leftovers of a different run: they cannot be reused
        self.partial.mkdir(parents=True, exist_ok=True)
        if not marker.is_file():
            marker.write_text(json.dumps(self.provenance, sort_keys=True))

    def shard_sequences(self, shard: int) -> range:
        return range(shard * self.shard_size, min((shard + 1) * self.shard_size, len(self.offsets) - 1))

    def _shard_path(self, shard: int) -> Path:
        return self.partial / f"shard-{shard:06d}"

    def pending(self) -> Iterator[int]:
        for shard in range(self.num_shards):
            if not (self._shard_path(shard) / "meta.json").is_file():
                yield shard

    def done_count(self) -> int:
        return self.num_shards - sum(1 for _ in self.pending())

    def write(self, shard: int, rows: SparseRows) -> None:
        seqs = self.shard_sequences(shard)
        expected = int(self.offsets[seqs.stop] - self.offsets[seqs.start])
        if len(rows.ids) != expected:
            raise ValueError(f"shard {shard}: {len(rows.ids)} rows, expected {expected}")
        _write_arrays(
            self._shard_path(shard),
            {"ids": rows.ids, "probs": rows.probs, "tail": rows.tail},
            {"shard": shard},
        )

    def finish(self) -> SoftLabelStore:
        missing = list(self.pending())
        if missing:
            raise RuntimeError(f"{len(missing)} shards not written yet (first: {missing[0]})")
        rows = SparseRows.concat(
            [
                SparseRows(
                    *(np.load(self._shard_path(s) / f"{name}.npy") for name in ("ids", "probs", "tail"))
                )
                for s in range(self.num_shards)
            ]
        )
        store = write_store(self.folder, rows, self.offsets, self.provenance)
        shutil.rmtree(self.partial, ignore_errors=True)
        return store
