"""Resumable store writing: shards of a soft-label store that survive a kill, assembled into one store."""

from __future__ import annotations

import json
import logging
import os
import shutil
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from kd_lightning.artifacts import fault_point, remove_leftovers
from kd_lightning.atomic import atomic_write_text
from kd_lightning.data.soft_labels import SoftLabelStore, SparseRows, write_arrays, write_store
from kd_lightning.data.store_checks import verify_checksums
from kd_lightning.data.store_format import StoreWrite

log = logging.getLogger(__name__)


class ShardedStoreWriter:
    """Resumable writer: shard ``j`` covers sequences ``[j·S, (j+1)·S)``; finished shards survive a kill.

    Usage::

        writer = ShardedStoreWriter(folder, offsets, provenance, shard_size=64)
        for shard in writer.pending():          # skips shards a killed run already wrote
            writer.write(shard, compute(shard))  # rows for those sequences, in order
        store = writer.finish()                  # concatenates, renames into place, removes .partial

    ``write``: how :meth:`finish` writes the assembled store (format 1 when absent); shards are always
    written in format 1, the rows as the estimator made them.
    ``clean=False`` (the other ranks of a ``torchrun`` group, which rank 0 has already checked the folder
    for) neither discards a ``.partial`` folder of another layout nor removes half-written shards.
    """

    def __init__(
        self,
        folder: str | os.PathLike,
        offsets: np.ndarray,
        provenance: Mapping[str, Any],
        shard_size: int,
        clean: bool = True,
        write: StoreWrite | None = None,
    ) -> None:
        self.folder = Path(folder)
        self.partial = self.folder.with_name(self.folder.name + ".partial")
        self.offsets = np.asarray(offsets, dtype=np.int64)
        self.provenance = dict(provenance)
        self.write_as = write or StoreWrite()
        if shard_size < 1:
            raise ValueError(f"shard_size must be >= 1, got {shard_size}")
        self.shard_size = shard_size
        self.num_shards = -(-(len(self.offsets) - 1) // shard_size)
        marker = self.partial / "provenance.json"
        # what decides which sequences a shard file holds, beside the store's own provenance
        layout = {"provenance": self.provenance, "shard_size": shard_size, "rows": int(self.offsets[-1])}
        expected = json.loads(json.dumps(layout, sort_keys=True, default=str))
        if self.partial.exists() and clean:
            try:
                found = json.loads(marker.read_text()) if marker.is_file() else None
            except (json.JSONDecodeError, UnicodeDecodeError):
                found = None
            if found != expected:  # leftovers of another run or layout: they cannot be reused
                log.warning("%s: discarding finished shards of a different run or shard size", self.partial)
                shutil.rmtree(self.partial)
        self.partial.mkdir(parents=True, exist_ok=True)
        if clean:  # (not while other ranks of a torchrun group may be writing shards)
            remove_leftovers(self.partial, ".shard-*.tmp-*")  # a shard write cut short by a kill
        if not marker.is_file():
            atomic_write_text(marker, json.dumps(expected, sort_keys=True))

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
        write_arrays(
            self._shard_path(shard),
            {"ids": rows.ids, "probs": rows.probs, "tail": rows.tail},
            {"shard": shard},
        )
        fault_point("shard:written")

    def finish(self) -> SoftLabelStore:
        missing = list(self.pending())
        if missing:
            raise RuntimeError(f"{len(missing)} shards not written yet (first: {missing[0]})")
        for shard in range(self.num_shards):  # a shard's bytes as written, before they join the store
            path = self._shard_path(shard)
            meta = json.loads((path / "meta.json").read_text())
            verify_checksums(path, meta, f"delete {path} and rerun the same command (it rebuilds that shard)")
        rows = SparseRows.concat(
            [
                SparseRows(
                    *(np.load(self._shard_path(s) / f"{name}.npy") for name in ("ids", "probs", "tail"))
                )
                for s in range(self.num_shards)
            ]
        )
        store = write_store(self.folder, rows, self.offsets, self.provenance, write=self.write_as)
        shutil.rmtree(self.partial, ignore_errors=True)
        return store
