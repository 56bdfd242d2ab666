"""Several teachers read as one soft-label store: a weighted mixture per position, or routing per record.

Each named teacher (``teachers:``) has its own offline store over the student's vocabulary. A loss term
with ``kd_target=teacher_mixture`` reads :class:`MixedStore`, which merges those stores' rows when a
sequence is read; nothing new is written, so the mixture is as cached as its parts.

* **Mixture** (weights ``w_i``, normalised to sum 1): ``p(v) = Σ_i w_i·p_i(v)`` on the union of the rows'
  ids, and ``tail = Σ_i w_i·tail_i``. An id stored by one teacher and not another gets only the first's
  mass: the other's share of it is inside that teacher's tail, which the store contract spreads over the
  ids a row does not list, exactly as a single store's tail is read.
* **Routing** (``teacher_routing=<record field>``): each training record's field names the teacher whose
  rows it gets (NeMo-RL's MOPD, ms-swift's routing); the others are not read for it.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from kd_lightning.data.soft_labels import SoftLabelStore, SparseRows


def mix_rows(rows: Sequence[SparseRows], weights: Sequence[float]) -> SparseRows:
    """``Σ_i w_i·rows_i`` per position: (n, K_i) rows → (n, ΣK_i) rows, ids merged, unused slots (0, 0).

    ``weights`` must be non-negative and sum to 1. Entries keep descending probability order, as every
    store's rows do.
    """
    if len(rows) != len(weights) or not rows:
        raise ValueError(f"{len(rows)} row sets but {len(weights)} weights")
    n = len(rows[0].ids)
    if any(len(r.ids) != n for r in rows):
        raise ValueError(f"row sets of different lengths: {[len(r.ids) for r in rows]}")
    ids = np.concatenate([np.asarray(r.ids, dtype=np.int64) for r in rows], axis=1)
    probs = np.concatenate([np.asarray(r.probs, dtype=np.float64) * w for r, w in zip(rows, weights)], axis=1)
    tail = sum(np.asarray(r.tail, dtype=np.float64) * w for r, w in zip(rows, weights))
    probs = np.where(probs > 0, probs, 0.0)
    width = ids.shape[1]
    # merge equal ids within a row: one key per (row, id); absent slots (probability 0) are dropped
    row_of = np.repeat(np.arange(n), width)
    present = probs.reshape(-1) > 0
    span = int(ids.max(initial=0)) + 1
    keys = row_of[present] * span + ids.reshape(-1)[present]
    unique, inverse = np.unique(keys, return_inverse=True)
    mass = np.bincount(inverse, weights=probs.reshape(-1)[present], minlength=len(unique))
    unique_rows, unique_ids = unique // span, unique % span
    order = np.lexsort((-mass, unique_rows))  # by row, then descending probability
    unique_rows, unique_ids, mass = unique_rows[order], unique_ids[order], mass[order]
    starts = np.searchsorted(unique_rows, np.arange(n))
    slot = np.arange(len(unique_rows)) - starts[unique_rows]
    out_ids = np.zeros((n, width), dtype=rows[0].ids.dtype)
    out_probs = np.zeros((n, width), dtype=np.float32)
    out_ids[unique_rows, slot] = unique_ids
    out_probs[unique_rows, slot] = mass
    return SparseRows(out_ids, out_probs, tail.astype(np.float32))


@dataclass
class MixedStore:
    """Named teachers' stores read as one (see the module docstring).

    Args:
        stores: teacher name → its offline store (all over the same corpus rows).
        weights: teacher name → mixture weight (normalised here); ignored with ``routes``.
        routes: with routing, the teacher name of each sequence.
    """

    stores: Mapping[str, SoftLabelStore]
    weights: Mapping[str, float]
    routes: Sequence[str] | None = None

    def __post_init__(self) -> None:
        if len(self.stores) < 1:
            raise ValueError("kd_target=teacher_mixture needs teachers: (a name → teacher config each)")
        names = list(self.stores)
        first = self.stores[names[0]]
        for name in names[1:]:
            if not np.array_equal(self.stores[name].offsets, first.offsets):
                raise ValueError(
                    f"teachers {names[0]!r} and {name!r} have stores over different rows; both must be built "
                    "on the same corpus and tokenizer (rebuild them with the same data settings)"
                )
        bad = {n: w for n, w in self.weights.items() if not w >= 0}
        total = sum(float(self.weights.get(n, 0.0)) for n in names)
        if bad or (self.routes is None and not total > 0):
            raise ValueError(
                f"teachers' weights must be non-negative with a positive sum, got {dict(self.weights)}; "
                "set teachers.<name>.weight"
            )
        self._names = names
        self._weights = [float(self.weights.get(n, 0.0)) / total if total > 0 else 0.0 for n in names]
        if self.routes is not None:
            if len(self.routes) != len(first):
                raise ValueError(f"{len(self.routes)} routes for {len(first)} sequences")
            unknown = sorted(set(self.routes) - set(names))
            if unknown:
                raise ValueError(
                    f"teacher_routing sends records to {unknown}, which teachers: does not name "
                    f"(it names {names}); add them or fix the records' field"
                )

    def __len__(self) -> int:
        return len(next(iter(self.stores.values())))

    @property
    def offsets(self) -> np.ndarray:
        return next(iter(self.stores.values())).offsets

    @property
    def parts(self) -> dict[str, Any]:
        """What the mixture is made of: each teacher's store and weight, and the routing (if any)."""
        parts = {n: {"store": s.key, "weight": w} for (n, s), w in zip(self.stores.items(), self._weights)}
        routing = None
        if self.routes is not None:
            routing = hashlib.sha256("\n".join(self.routes).encode()).hexdigest()[:16]
        return {"teachers": parts, "routing": routing}

    @property
    def key(self) -> str:
        """Its name in a student's record of its stores: a digest of its parts (it has no folder)."""
        digest = hashlib.sha256(json.dumps(self.parts, sort_keys=True).encode()).hexdigest()[:12]
        kind = "routed" if self.routes is not None else "mixture"
        return f"teacher-{kind}-{digest}"

    channels: ClassVar[tuple[str, ...]] = ()
    """A mixture carries no per-position channels (context counts are the prior's)."""

    def rows(self, i: int) -> SparseRows:
        if self.routes is not None:
            return self.stores[self.routes[i]].rows(i)
        return mix_rows([self.stores[n].rows(i) for n in self._names], self._weights)
