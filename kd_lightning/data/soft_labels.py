"""Soft-label store: sparse per-position teacher distributions, memory-mapped, with provenance.

Layout of a store folder (one row per target position of a tokenised corpus, in corpus order)::

    meta.json      provenance (tokenizer fingerprint, corpus fingerprint, estimator settings), shapes
    ids.npy        (rows, k) uint16 / int32 token ids, sorted by probability (descending)
    probs.npy      (rows, k) float16 probabilities of those ids
    tail.npy       (rows,)   float32 probability mass outside the top-k ("tail bucket")
    offsets.npy    (num_seqs + 1,) int64 row offsets of each sequence

Writes are atomic: a store is built in a hidden sibling folder and renamed into place, so a killed
writer leaves either nothing or a complete store. Long stages write shards into ``<store>.partial/``
(each shard atomic too, :mod:`kd_lightning.data.store_shards`) so a rerun continues where the killed one
stopped.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from kd_lightning.artifacts import fault_point, remove_leftovers
from kd_lightning.atomic import atomic_folder
from kd_lightning.data.store_checks import (
    CHECKSUM,
    VALIDATE_CHUNK_ROWS,
    StoreCorruptError,
    StoreMismatchError,
    check_offsets,
    check_provenance,
    check_ragged_index,
    fix_hint,
    folder_checksums,
    validate_rows,
    verify_checksums,
)
from kd_lightning.data.store_format import StoreWrite, check_arrays, decode, encode

FORMAT_VERSION = 1
FORMAT_VERSIONS = (1, 2)
"""Format 1: K float16 slots per row (the default). Format 2: :mod:`kd_lightning.data.store_format`."""
log = logging.getLogger(__name__)


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


def write_arrays(
    folder: Path, arrays: Mapping[str, np.ndarray], meta: Mapping[str, Any], fault: str | None = None
) -> None:
    """Write arrays + meta.json into ``folder`` atomically (hidden temp sibling, then rename); meta.json
    records every file's checksum, which opening the store verifies.

    ``fault`` names the :func:`~kd_lightning.artifacts.fault_point` just before the rename.
    """
    with atomic_folder(folder, (lambda: fault_point(fault)) if fault else None) as tmp:
        for name, array in arrays.items():
            np.save(tmp / f"{name}.npy", array)
        meta = {**meta, "checksums": folder_checksums(tmp), "checksum": CHECKSUM}
        (tmp / "meta.json").write_text(json.dumps(meta, indent=1, sort_keys=True))


@runtime_checkable
class SoftLabelSource(Protocol):
    """What a run reads soft labels from: a store on disk (:class:`SoftLabelStore`), a mixture of stores
    (:class:`~kd_lightning.data.store_mixture.MixedStore`) or any source of your own. ``key`` names it in a
    student's record of what it read (a store's folder name, a mixture's digest); ``parts`` is what it is made
    of (a mixture's teachers and weights; empty for a store); nothing fakes a folder."""

    @property
    def offsets(self) -> np.ndarray: ...

    @property
    def key(self) -> str: ...

    @property
    def parts(self) -> Mapping[str, Any]: ...

    @property
    def channels(self) -> tuple[str, ...]: ...

    def __len__(self) -> int: ...

    def rows(self, seq: int) -> SparseRows: ...


class SoftLabelStore:
    """Read side: memory-mapped sparse soft labels for each sequence of a tokenised corpus.

    Opening checks the files against ``meta.json`` (present, readable, of the shapes it records) and the
    indexes (offsets, a ragged store's entry index); with ``validate=True`` (the default) also every file's
    checksum (once per process per file) and the contents (:func:`validate_rows`, on the decoded rows of a
    format-2 store); ``vocab_size`` adds the id range. Every failure is one line naming the store folder and the fix.
    Format-1 stores (K float16 slots per row) and format-2 stores (:mod:`kd_lightning.data.store_format`)
    read the same: :meth:`rows` gives K slots per row.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        expect: Mapping[str, Any] | None = None,
        vocab_size: int | None = None,
        validate: bool = True,
    ) -> None:
        self.folder = Path(folder)
        fix = fix_hint(self.folder)
        if not (self.folder / "meta.json").is_file():
            raise FileNotFoundError(f"no soft-label store at {self.folder}; run its estimation stage first")
        try:
            self.meta = json.loads((self.folder / "meta.json").read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise StoreCorruptError(f"{self.folder}/meta.json is cut or corrupted ({err}); {fix}") from None
        version = self.meta.get("format_version") if isinstance(self.meta, dict) else self.meta
        if version not in FORMAT_VERSIONS:
            raise StoreMismatchError(
                f"{self.folder}: format_version {version} is not one this kd_lightning reads "
                f"({', '.join(map(str, FORMAT_VERSIONS))}); {fix}"
            )
        if expect:
            check_provenance(self.meta["provenance"], expect, self.folder)
        if validate:  # every file's bytes as written, before anything is read from them
            verify_checksums(self.folder, self.meta, fix)
        self.encoding: dict[str, Any] | None = self.meta.get("encoding") if version == 2 else None
        names = ("ids", "probs", "tail", "offsets") if self.encoding is None else self._format2_names()
        arrays = {}
        for name in names:
            path = self.folder / f"{name}.npy"
            try:
                arrays[name] = np.load(path, mmap_mode=None if name == "offsets" else "r")
            except (OSError, ValueError, EOFError) as err:
                raise StoreCorruptError(f"{path} is missing, cut or corrupted ({err}); {fix}") from None
        self.offsets = arrays.pop("offsets")
        self._arrays = arrays
        self._channel_arrays: dict[str, np.ndarray] = {}
        rows, k = int(self.meta.get("rows", -1)), int(self.meta.get("top_k", -1))
        self.num_rows = rows
        check_offsets(self.offsets, rows, "offsets.npy", self.folder, fix)
        if self.encoding is None:
            ids, probs, tail = arrays["ids"], arrays["probs"], arrays["tail"]
            if not (ids.shape == (rows, k) and probs.shape == (rows, k) and tail.shape == (rows,)):
                raise StoreCorruptError(
                    f"{self.folder}: files hold ids {ids.shape}, probs {probs.shape}, tail {tail.shape}, "
                    f"but meta.json says {rows} rows of top-{k}; {fix}"
                )
        else:
            wrong = check_arrays(arrays, self.encoding, rows, len(self.offsets) - 1)
            if wrong:
                raise StoreCorruptError(f"{self.folder}: {wrong}; {fix}")
            if self.encoding.get("ragged"):
                check_ragged_index(arrays["entries"], arrays["entry_offsets"], self.offsets, self.folder, fix)
        if validate:
            self.validate(vocab_size, fix)

    def _format2_names(self) -> tuple[str, ...]:
        assert self.encoding is not None
        names = ["ids", "values", "offsets"]
        names += ["entries", "entry_offsets"] if self.encoding.get("ragged") else []
        names += [] if self.encoding.get("probabilities") == "counts" else ["tail"]
        return tuple(names)

    def validate(self, vocab_size: int | None = None, fix: str = "") -> None:
        """:func:`validate_rows` over every row, in chunks of sequences (decoded, for format 2)."""
        if self.encoding is None:
            a = self._arrays
            validate_rows(a["ids"], a["probs"], a["tail"], self.folder, vocab_size, fix)
            return
        first = 0
        while first < len(self):
            last = first + 1
            while (
                last < len(self) and int(self.offsets[last + 1] - self.offsets[first]) <= VALIDATE_CHUNK_ROWS
            ):
                last += 1
            rows = self._read(first, last)
            try:
                validate_rows(rows.ids, rows.probs, rows.tail, self.folder, vocab_size, fix)
            except StoreCorruptError as err:  # name the row in the whole store, not in the chunk
                raise StoreCorruptError(f"{err} (sequences {first}..{last - 1})") from None
            first = last

    @property
    def provenance(self) -> dict[str, Any]:
        return self.meta["provenance"]

    @property
    def top_k(self) -> int:
        return int(self.meta["top_k"])

    @property
    def ids(self) -> np.ndarray:
        """(rows, K) ids of every row (memory-mapped for format 1, decoded for format 2)."""
        return self._arrays["ids"] if self.encoding is None else self.all_rows().ids

    @property
    def probs(self) -> np.ndarray:
        return self._arrays["probs"] if self.encoding is None else self.all_rows().probs

    @property
    def tail(self) -> np.ndarray:
        return self._arrays["tail"] if self.encoding is None else self.all_rows().tail

    def __len__(self) -> int:
        return len(self.offsets) - 1

    @property
    def key(self) -> str:
        """Its name in a student's record of the stores it read: its folder's (the cache key)."""
        return self.folder.name

    @property
    def parts(self) -> Mapping[str, Any]:
        """A store on disk is one part: itself."""
        return {}

    def _read(self, first: int, last: int) -> SparseRows:
        """The rows of sequences ``[first, last)``."""
        start, stop = int(self.offsets[first]), int(self.offsets[last])
        if self.encoding is None:
            a = self._arrays
            return SparseRows(
                np.asarray(a["ids"][start:stop]),
                np.asarray(a["probs"][start:stop]),
                np.asarray(a["tail"][start:stop]),
            )
        entry = int(self._arrays["entry_offsets"][first]) if self.encoding.get("ragged") else 0
        return SparseRows(*decode(self._arrays, self.encoding, start, stop, entry))

    def rows(self, seq: int) -> SparseRows:
        return self._read(seq, seq + 1)

    def all_rows(self) -> SparseRows:
        return self._read(0, len(self))

    def evidence(self, seq: int) -> np.ndarray:
        """(rows of ``seq``,) bool: the rows that carry a teacher's distribution (all of them, for a store
        written without an ``evidence`` mask)."""
        start, stop = int(self.offsets[seq]), int(self.offsets[seq + 1])
        path = self.folder / "evidence.npy"
        if not path.is_file():
            return np.ones(stop - start, dtype=bool)
        return np.load(path, mmap_mode="r")[start:stop].astype(bool)

    @property
    def channels(self) -> tuple[str, ...]:
        """Names of the per-position numbers this store carries beside its rows (``channel_<name>.npy``)."""
        return tuple(self.meta.get("channels", ()))

    def channel(self, name: str, seq: int | None = None) -> np.ndarray:
        """(rows of ``seq``,) or, with ``seq`` None, (rows,) values of a per-position channel."""
        if name not in self.channels:
            raise KeyError(
                f"{self.folder} carries no {name!r} channel (it has {list(self.channels) or 'none'})"
            )
        values = self._channel_arrays.get(name)
        if values is None:
            values = self._channel_arrays[name] = np.load(self.folder / f"channel_{name}.npy", mmap_mode="r")
        if seq is None:
            return np.asarray(values)
        return np.asarray(values[int(self.offsets[seq]) : int(self.offsets[seq + 1])])

    def nbytes(self) -> int:
        """Bytes of the store's files (arrays and meta.json)."""
        return sum(path.stat().st_size for path in self.folder.iterdir() if path.is_file())

    def nbytes_per_row(self) -> float:
        return self.nbytes() / max(self.num_rows, 1)


def write_store(
    folder: str | os.PathLike,
    rows: SparseRows,
    offsets: np.ndarray,
    provenance: Mapping[str, Any],
    vocab_size: int | None = None,
    evidence: np.ndarray | None = None,
    channels: Mapping[str, np.ndarray] | None = None,
    write: StoreWrite | None = None,
) -> SoftLabelStore:
    """Validate rows (:func:`validate_rows`), write a complete store atomically and return it opened.

    An estimator that produced non-finite, negative or unnormalised rows fails here, before anything is
    cached, with a one-line error naming the store. ``evidence`` (rows,) bool marks the rows that carry a
    teacher's distribution (an API's log-probs that aligned); the others only restate the observed token.
    ``channels`` name → (rows,) numbers per position (the prior's context counts and orders).
    ``write`` (:class:`~kd_lightning.data.store_format.StoreWrite`) decides how the rows are written: absent,
    format 1. The provenance is only recorded (and checked when the store is opened), never read for it.
    """
    if len(rows.ids) != int(offsets[-1]):
        raise ValueError(f"{len(rows.ids)} rows but offsets end at {int(offsets[-1])}")
    validate_rows(
        rows.ids,
        rows.probs,
        rows.tail,
        folder,
        vocab_size,
        "the estimator produced it; check its settings (nothing was cached)",
    )
    write = write or StoreWrite()
    fmt = write.fmt
    if provenance.get("format") != write.key().get("format"):  # the key would misname the bytes
        raise ValueError(
            f"{folder}: the provenance records format {provenance.get('format')} but the rows are written as "
            f"{write.key().get('format') or 'format 1'}; key the store with "
            "kd_lightning.estimation.stores.formatted(provenance, write)"
        )
    meta: dict[str, Any] = {
        "format_version": FORMAT_VERSION if fmt.is_legacy else 2,
        "provenance": dict(provenance),
        "rows": len(rows.ids),
        "top_k": int(rows.ids.shape[1]),
        "id_dtype": str(rows.ids.dtype),
    }
    offsets = np.asarray(offsets, dtype=np.int64)
    channels = {name: np.asarray(values) for name, values in (channels or {}).items()}
    for name, values in channels.items():
        if values.shape != (len(rows.ids),):
            raise ValueError(
                f"channel {name!r} has shape {values.shape}, not ({len(rows.ids)},) (one per row)"
            )
    if channels:
        meta["channels"] = sorted(channels)
    if fmt.is_legacy:
        arrays = {"ids": rows.ids, "probs": rows.probs, "tail": rows.tail}
    else:
        arrays, meta["encoding"] = encode(rows.ids, rows.probs, rows.tail, offsets, fmt, write.draws)
    remove_leftovers(Path(folder).parent, f".{Path(folder).name}.tmp-*")  # a write cut short by a kill
    write_arrays(
        Path(folder),
        {
            **arrays,
            "offsets": offsets,
            **({} if evidence is None else {"evidence": np.asarray(evidence, dtype=bool)}),
            **{f"channel_{name}": values for name, values in channels.items()},
        },
        meta,
        fault="store:before-rename",
    )
    return SoftLabelStore(folder, validate=False)  # just validated
