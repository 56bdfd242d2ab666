"""How a soft-label store keeps its rows on disk: :class:`StoreFormat`.

Today's rows (format 1) hold K slots per target position: uint16 ids, float16 probabilities and a float32
tail, 132 bytes per position at K = 32. Format 2 spends fewer bytes where a row does not need them:

* ``probabilities: log8``: one byte per entry, the log-probability on 255 even steps over [e^-16, 1]
  (±3.2% relative per entry; each row is rescaled on reading so that its entries and its tail, kept in
  float32, sum to 1);
* ``probabilities: counts``: a sampled store's rows (K draws, repeats merged) as uint8 draw counts (exact);
  a store whose rows are not draws (the prior, the posterior, a top-k teacher) falls back to ``log8``;
* ``floor``: top-k entries below this probability move into the tail (the row gets shorter);
* ``ragged``: each row keeps only its entries (a uint8 entry count per row) instead of K slots, so a
  sampled row of 12 draws over 4 distinct tokens costs 4 entries, not 12.

Readers see the same :class:`~kd_lightning.data.soft_labels.SparseRows` either way: K slots per row, the
missing ones as (id 0, probability 0), which every divergence counts as absent.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

PROBABILITY_CODES = ("fp16", "log8", "counts")
LOG8_MIN = -16.0
"""ln of the smallest probability a log8 entry holds (code 1); code 255 is probability 1, code 0 is none."""
MAX_RAGGED_K = 255
"""A ragged row's entry count is one byte."""


@dataclass(frozen=True)
class StoreFormat:
    """How a store's rows are written (part of every store's provenance, so a format change rebuilds).

    Args:
        probabilities: ``fp16`` (format 1, today's), ``log8`` or ``counts`` (see the module docstring).
        floor: entries below this probability move into the tail (needs ``ragged``); 0 keeps all K.
        ragged: rows keep only their positive entries.
    """

    probabilities: str = "fp16"
    floor: float = 0.0
    ragged: bool = False

    def __post_init__(self) -> None:
        if self.probabilities not in PROBABILITY_CODES:
            raise ValueError(
                f"store_format.probabilities must be one of {', '.join(PROBABILITY_CODES)}, "
                f"got {self.probabilities!r}"
            )
        if not 0.0 <= self.floor < 1.0:
            raise ValueError(f"store_format.floor must be in [0, 1), got {self.floor}")
        if self.floor > 0 and not self.ragged:
            raise ValueError(
                "store_format.floor drops entries from rows, which only ragged rows can do; "
                "add store_format.ragged=true (or use store_format=topk_floor)"
            )

    @property
    def is_legacy(self) -> bool:
        """Format 1: K float16 slots per row, the layout every earlier release wrote and reads."""
        return self == StoreFormat()

    def settings(self) -> dict[str, Any]:
        """What goes into a store's provenance (nothing for format 1, so its keys are as before)."""
        return (
            {}
            if self.is_legacy
            else {"probabilities": self.probabilities, "floor": self.floor, "ragged": self.ragged}
        )


@dataclass(frozen=True)
class StoreWrite:
    """How one store's rows are written: the run's :class:`StoreFormat` and, for a sampled store, the draws
    per row (which ``counts`` keeps exactly).

    A parameter of writing (:func:`~kd_lightning.data.soft_labels.write_store`, the sharded writer, every
    estimator's ``estimate``). The cache key records it (:meth:`key`) so that stores of two formats never share
    a folder, but no writer reads its instructions back out of a key.
    """

    fmt: StoreFormat = StoreFormat()
    draws: int | None = None

    def key(self) -> dict[str, Any]:
        """What a store's provenance records of its format (nothing for format 1, so old keys stay)."""
        if self.fmt.is_legacy:
            return {}
        return {"format": {**self.fmt.settings(), **({"draws": int(self.draws)} if self.draws else {})}}


def encode_log8(probs: np.ndarray) -> np.ndarray:
    """Probabilities → uint8 codes: 0 for 0, else 1..255 over ln p in [LOG8_MIN, 0]."""
    p = np.asarray(probs, dtype=np.float32)
    with np.errstate(divide="ignore"):
        steps = np.rint(254.0 * (1.0 - np.log(np.maximum(p, 1e-30)) / LOG8_MIN))
    codes = np.clip(steps, 0, 254).astype(np.uint8) + 1
    return np.where(p > 0, codes, 0).astype(np.uint8)


def decode_log8(codes: np.ndarray) -> np.ndarray:
    """uint8 codes → float32 probabilities (before the row's rescaling)."""
    c = np.asarray(codes, dtype=np.float32)
    return np.where(c > 0, np.exp(LOG8_MIN * (1.0 - (c - 1.0) / 254.0)), 0.0).astype(np.float32)


def rescale(probs: np.ndarray, tail: np.ndarray) -> np.ndarray:
    """Rows rescaled so that entries + tail sum to 1 (the tail is exact; quantisation error is shared by
    the entries in proportion)."""
    total = probs.sum(-1, dtype=np.float64)
    want = np.clip(1.0 - tail.astype(np.float64), 0.0, None)
    scale = np.divide(want, total, out=np.ones_like(total), where=total > 0)
    return (probs * scale[..., None]).astype(np.float32)


def counts_of(probs: np.ndarray, draws: int) -> np.ndarray | None:
    """The draw counts of sampled rows (``probs · draws`` whole numbers), or None if the rows are not draws.

    Rows arrive as float16 (the shards' form): c/draws is off by at most draws·2^-12 < 0.07 counts for
    draws ≤ 255, so rounding recovers every count exactly; a row further than 0.25 from whole counts is not
    draws."""
    counts = np.asarray(probs, dtype=np.float64) * draws
    whole = np.rint(counts)
    if draws > MAX_RAGGED_K or np.abs(counts - whole).max(initial=0.0) > 0.25:
        return None
    return whole.astype(np.uint8)


def encode(
    ids: np.ndarray,
    probs: np.ndarray,
    tail: np.ndarray,
    offsets: np.ndarray,
    fmt: StoreFormat,
    draws: int | None = None,
) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Rows (rows, K) → the arrays of a format-2 store and what its ``meta.json`` records of the encoding.

    ``draws``: the rows are ``draws`` samples each (a sampled store), so ``counts`` can keep them exactly.
    """
    k = int(ids.shape[1]) if ids.ndim == 2 else 0
    p = np.asarray(probs, dtype=np.float32)
    t = np.asarray(tail, dtype=np.float32)
    code = fmt.probabilities
    counts = None
    if code == "counts":
        counts = counts_of(p, draws) if draws and float(np.abs(t).max(initial=0.0)) == 0.0 else None
        code = "counts" if counts is not None else "log8"  # not draws: the prior, a posterior, top-k rows
    if fmt.floor > 0 and counts is None:
        drop = (p > 0) & (p < fmt.floor)
        t = t + np.where(drop, p, 0.0).sum(1, dtype=np.float32)
        p = np.where(drop, 0.0, p).astype(np.float32)
    if counts is not None:
        values = counts
    elif code == "log8":
        values = encode_log8(p)
    else:
        values = p.astype(np.float16)
    arrays: dict[str, np.ndarray] = {}
    if fmt.ragged:
        if k > MAX_RAGGED_K:
            raise ValueError(f"ragged rows hold at most {MAX_RAGGED_K} entries; this store has top-{k}")
        keep = values > 0
        entries = keep.sum(1).astype(np.uint8)
        ends = np.concatenate([[0], np.cumsum(entries, dtype=np.int64)])
        arrays.update(
            entries=entries,
            entry_offsets=ends[np.asarray(offsets, dtype=np.int64)],
            ids=np.asarray(ids)[keep],
            values=values[keep],
        )
    else:
        arrays.update(ids=np.asarray(ids), values=values)
    if counts is None:
        arrays["tail"] = t
    info = {"probabilities": code, "floor": fmt.floor, "ragged": fmt.ragged, "top_k": k}
    if counts is not None:
        info["draws"] = int(draws)
    return arrays, info


def decode(
    arrays: dict[str, np.ndarray], info: dict[str, Any], start: int, stop: int, entry_start: int = 0
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows ``[start, stop)`` of a format-2 store as (ids (n, K), probs (n, K) float32, tail (n,) float32).

    ``entry_start``: for ragged rows, the index of row ``start``'s first entry.
    """
    k, n = int(info["top_k"]), stop - start
    if info["ragged"]:
        entries = np.asarray(arrays["entries"][start:stop], dtype=np.int64)
        total = int(entries.sum())
        row = np.repeat(np.arange(n), entries)
        column = np.arange(total) - np.repeat(np.cumsum(entries) - entries, entries)
        flat_ids = np.asarray(arrays["ids"][entry_start : entry_start + total])
        flat_values = np.asarray(arrays["values"][entry_start : entry_start + total])
        ids = np.zeros((n, k), dtype=flat_ids.dtype)
        values = np.zeros((n, k), dtype=flat_values.dtype)
        ids[row, column], values[row, column] = flat_ids, flat_values
    else:
        ids, values = np.asarray(arrays["ids"][start:stop]), np.asarray(arrays["values"][start:stop])
    tail = (
        np.asarray(arrays["tail"][start:stop], dtype=np.float32)
        if "tail" in arrays
        else np.zeros(n, dtype=np.float32)
    )
    code = info["probabilities"]
    if code == "counts":
        probs = values.astype(np.float32) / float(info["draws"])
    elif code == "log8":
        probs = rescale(decode_log8(values), tail)
    else:
        probs = values.astype(np.float32)
    return ids, probs, tail


def check_arrays(
    arrays: dict[str, np.ndarray], info: dict[str, Any], rows: int, sequences: int
) -> str | None:
    """What is wrong with a format-2 store's arrays (shapes, counts, codes), or None."""
    k = int(info.get("top_k", -1))
    if info.get("probabilities") not in PROBABILITY_CODES:
        return f"unknown probability encoding {info.get('probabilities')!r}"
    if info["probabilities"] == "counts" and not 0 < int(info.get("draws") or 0) <= MAX_RAGGED_K:
        return f"counts without a valid number of draws ({info.get('draws')!r})"
    if "tail" in arrays and arrays["tail"].shape != (rows,):
        return f"tail {arrays['tail'].shape} for {rows} rows"
    if info.get("ragged"):
        entries, starts = arrays.get("entries"), arrays.get("entry_offsets")
        if entries is None or starts is None or entries.shape != (rows,) or starts.shape != (sequences + 1,):
            return "the ragged row index (entries, entry_offsets) is missing or of the wrong shape"
        total = int(np.asarray(entries, dtype=np.int64).sum())
        if int(starts[-1]) != total or arrays["ids"].shape != (total,) or arrays["values"].shape != (total,):
            return f"{total} entries by the row index, but ids {arrays['ids'].shape} and values {arrays['values'].shape}"
        if int(np.asarray(entries).max(initial=0)) > k:
            return f"a row holds more than top-{k} entries"
    elif arrays["ids"].shape != (rows, k) or arrays["values"].shape != (rows, k):
        return f"ids {arrays['ids'].shape} and values {arrays['values'].shape} for {rows} rows of top-{k}"
    if info["probabilities"] == "counts" and "tail" in arrays:
        return "a counts store has no tail"
    return None
