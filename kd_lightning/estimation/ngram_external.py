"""n-gram counting in bounded memory: partition events by context hash, spill them to disk, count each part.

The in-memory counter (:func:`~kd_lightning.estimation.ngram_counts.count_order`) holds about 90 bytes per
corpus token at its peak: 9 GiB at 10^8 tokens. With a memory budget, counting becomes a distribution sort:

1. **Spill.** The corpus is read in chunks of whole sequences. Each event's ``(context hash, token)`` goes to
   the part named by the hash's top ``bits`` bits, appended to that part's file.
2. **Count.** Each part is read back and counted in memory with ``count_order``, in parallel processes if
   asked, and its counts are saved beside it.

A part is a contiguous range of the in-memory sort order, because its bits are the top bits of the sort key,
and a context's events never span two parts. So each part's counts are exactly the in-memory counts of its
contexts, and the prior built from them is the in-memory prior to the bit (``tests/test_ngram_external.py``).
Queries are routed by the same bits and answered one loaded part at a time.

Memory: the spill pass holds one chunk (about :data:`SPILL_BYTES_PER_TOKEN` per token), a count holds one
part (about :data:`COUNT_BYTES_PER_EVENT` per event). Both are sized from the budget. A part also holds all
events of each context it owns, so one context with more events than the budget allows (a unigram, or a
bigram context like "the" in a huge corpus) cannot be split; order 1 is counted from a histogram instead.
"""

from __future__ import annotations

import logging
import math
import mmap
import multiprocessing
import re
import tempfile
from collections.abc import Iterator
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kd_lightning.estimation.ngram_counts import (
    OrderCounts,
    context_hashes,
    count_order,
    counts_from_histogram,
    positions_in_sequence,
)

log = logging.getLogger(__name__)

SPILL_BYTES_PER_TOKEN = 128
"""Peak bytes per corpus token of a spill chunk (tokens, positions, hashes, part ids, the sort, records)."""
COUNT_BYTES_PER_EVENT = 100
"""Peak bytes per event of counting one part (the records, the sort, the keys and the counts)."""
MIN_CHUNK_TOKENS = 4096
MAX_PART_BITS = 12

_UNITS = {"": 1, "b": 1, "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}


def parse_bytes(value: int | float | str) -> int:
    """``2147483648``, ``"2GiB"``, ``"512 MiB"``, ``"1.5G"`` → bytes (binary units; ``kB``/``GB`` too)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        number, unit = float(value), ""
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([kKmMgGtT]?)(?:i?[bB])?\s*", str(value))
        if not match:
            raise ValueError(
                f"memory budget {value!r} is not a size; write bytes (2147483648) or a size like '2GiB' or '512MiB'"
            )
        number, unit = float(match.group(1)), match.group(2).lower()
    size = int(number * _UNITS[unit])
    if size <= 0:
        raise ValueError(f"memory budget must be positive, got {value!r}")
    return size


@dataclass
class SpilledOrder:
    """Counts of one order saved as ``2**bits`` parts (``part-<p>.npz``), loaded one at a time."""

    folder: Path
    bits: int
    num_pairs: int
    num_events: int

    def parts_of(self, hashes: np.ndarray) -> np.ndarray:
        """(P,) part index of each context hash (its top ``bits`` bits)."""
        if self.bits == 0:
            return np.zeros(len(hashes), dtype=np.int64)
        return (hashes >> np.uint64(64 - self.bits)).astype(np.int64)

    def split(self, hashes: np.ndarray) -> Iterator[tuple[OrderCounts | None, np.ndarray]]:
        """``(counts of a part, indices of hashes in it)`` for each part that some hash falls in.

        A part with no counted event yields ``None`` (its contexts are all unseen).
        """
        parts = self.parts_of(hashes)
        order = np.argsort(parts, kind="stable")
        bounds = np.searchsorted(parts[order], np.arange((1 << self.bits) + 1))
        for part in np.flatnonzero(np.diff(bounds)):
            yield self.load(int(part)), order[bounds[part] : bounds[part + 1]]

    def load(self, part: int) -> OrderCounts | None:
        path = self.folder / f"part-{part}.npz"
        if not path.exists():
            return None
        with np.load(path) as saved:
            return OrderCounts(int(saved["wbits"]), *(saved[name] for name in _SAVED))


_SAVED = ("pair_keys", "pair_counts", "ctx_keys", "ctx_counts", "ctx_start", "moved_hashes", "moved_keys")


def _count_part(spill: Path, wbits: int, word_dtype: str) -> int:
    """Count one spilled part in memory, save its counts beside it, remove the spill; returns its pairs."""
    records = np.fromfile(spill, dtype=[("hash", "<u8"), ("word", word_dtype)])
    hashes, words = records["hash"].copy(), records["word"].copy()
    del records
    counts = count_order(hashes, words, wbits)
    del hashes, words
    target = spill.with_suffix(".npz")
    with open(target, "wb") as out:  # a temp folder of this counter only; no reader until counting ends
        np.savez(out, wbits=np.int64(wbits), **{name: getattr(counts, name) for name in _SAVED})
    spill.unlink()
    return len(counts.pair_keys)


class ExternalCounter:
    """Counts orders of a corpus within ``memory_budget`` bytes of working memory, spilling to ``spill_dir``.

    Args:
        tokens: (total,) token ids; a ``np.memmap`` (``np.load(..., mmap_mode="r")``) is read chunk by chunk
            through short-lived maps, so the corpus never becomes resident as a whole.
        offsets: (num_seqs + 1,) sequence boundaries.
        count_mask: (total,) bool, which tokens are events (``None``: all).
        vocab_size, start_symbol, wbits: as in :class:`~kd_lightning.estimation.ngram_model.NGramModel`.
        memory_budget: bytes the counter's arrays may take (on top of what the process holds).
        workers: processes that count parts in parallel; each gets ``memory_budget / workers``.
        spill_dir: where the temporary parts go (default: the system's temp folder); removed on close.
    """

    def __init__(
        self,
        tokens: np.ndarray,
        offsets: np.ndarray,
        count_mask: np.ndarray | None,
        vocab_size: int,
        start_symbol: int,
        wbits: int,
        memory_budget: int,
        workers: int = 1,
        spill_dir: str | Path | None = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"count_workers must be >= 1, got {workers}")
        self.tokens, self.count_mask = tokens, count_mask
        self.offsets = np.asarray(offsets, dtype=np.int64)
        if (
            len(self.offsets) < 2
            or self.offsets[0] != 0
            or self.offsets[-1] != len(tokens)
            or np.any(np.diff(self.offsets) < 0)
        ):
            positions_in_sequence(self.offsets, len(tokens))  # raises its clear error
        self.vocab_size, self.start_symbol, self.wbits = vocab_size, start_symbol, wbits
        self.memory_budget, self.workers = memory_budget, workers
        self.word_dtype = "<u2" if vocab_size <= 1 << 16 else "<u4"
        if spill_dir is not None:
            Path(spill_dir).mkdir(parents=True, exist_ok=True)
        self._scratch = tempfile.TemporaryDirectory(
            prefix="kdl-ngram-", dir=spill_dir
        )  # removed when collected
        self.folder = Path(self._scratch.name)
        self.chunk_tokens = max(MIN_CHUNK_TOKENS, memory_budget // SPILL_BYTES_PER_TOKEN)
        if count_mask is None:
            self.num_events = len(tokens)
        else:
            self.num_events = sum(int(self._mask(a, b).sum()) for a, b in self.chunks())
        if not self.num_events:
            raise ValueError("no tokens to count (count_mask is all False)")

    def close(self) -> None:
        """Remove the spilled parts (also done when the counter is garbage-collected)."""
        self._scratch.cleanup()

    def chunks(self) -> Iterator[tuple[int, int]]:
        """Token ranges of whole sequences, about ``chunk_tokens`` each (a longer sequence is one chunk)."""
        total = int(self.offsets[-1])
        start = 0
        while start < total:
            end = int(
                self.offsets[np.searchsorted(self.offsets, start + self.chunk_tokens, side="right") - 1]
            )
            if end <= start:  # one sequence longer than a chunk: it is the chunk
                end = int(self.offsets[np.searchsorted(self.offsets, start, side="right")])
            yield start, end
            start = end

    def _read(self, array: np.ndarray, a: int, b: int) -> np.ndarray:
        """A copy of ``array[a:b]``; for a file map, through a map of just that range, dropped at once."""
        if isinstance(array, np.memmap) and isinstance(array.base, mmap.mmap) and array.ndim == 1:
            offset = array.offset + a * array.itemsize  # only the original map knows its file offset
            view = np.memmap(array.filename, dtype=array.dtype, mode="r", offset=offset, shape=(b - a,))
            out = np.array(view)
            del view
            return out
        return np.array(array[a:b])

    def _mask(self, a: int, b: int) -> np.ndarray:
        return self._read(self.count_mask, a, b).astype(bool, copy=False)

    def part_bits(self) -> int:
        per_part = max(1, self.memory_budget // self.workers // COUNT_BYTES_PER_EVENT)
        return min(MAX_PART_BITS, max(0, math.ceil(math.log2(max(1.0, self.num_events / per_part)))))

    def count(self, order: int) -> OrderCounts | SpilledOrder:
        """Counts of ``order``: order 1 in memory (from a histogram), higher orders spilled in parts."""
        context_len = order - 1
        if context_len == 0:
            histogram = np.zeros(self.vocab_size, dtype=np.int64)
            for _a, _b, words, _seq_pos, _events, _tokens in self._events():
                histogram += np.bincount(words, minlength=self.vocab_size)
            return counts_from_histogram(histogram, self.wbits)
        folder = self.folder / f"order-{order}"
        folder.mkdir()
        bits = self.part_bits()
        for _a, _b, words, seq_pos, events, tokens in self._events():
            hashes = context_hashes(tokens, seq_pos, events, context_len, self.start_symbol)
            parts = SpilledOrder(folder, bits, 0, 0).parts_of(hashes)
            order_in_chunk = np.argsort(parts, kind="stable")
            records = np.empty(len(hashes), dtype=[("hash", "<u8"), ("word", self.word_dtype)])
            records["hash"] = hashes[order_in_chunk]
            records["word"] = words[order_in_chunk]
            del hashes
            bounds = np.searchsorted(parts[order_in_chunk], np.arange((1 << bits) + 1))
            for part in np.flatnonzero(np.diff(bounds)):
                with open(folder / f"part-{part}.bin", "ab") as out:
                    out.write(records[bounds[part] : bounds[part + 1]].tobytes())
        spills = sorted(folder.glob("part-*.bin"))
        log.info(
            "order %d: %d events in %d parts (%s); counting", order, self.num_events, len(spills), folder
        )
        args = [(spill, self.wbits, self.word_dtype) for spill in spills]
        if self.workers > 1 and len(spills) > 1:
            context = multiprocessing.get_context(
                "fork"
            )  # parts are numpy-only; fork avoids re-importing torch
            with ProcessPoolExecutor(min(self.workers, len(spills)), mp_context=context) as pool:
                pairs = sum(pool.map(_count_part, *zip(*args)))
        else:
            pairs = sum(_count_part(*a) for a in args)
        return SpilledOrder(folder, bits, pairs, self.num_events)

    def _events(self) -> Iterator[tuple[int, int, np.ndarray, np.ndarray, np.ndarray, np.ndarray]]:
        """Per chunk: its range, the event tokens, in-sequence positions, event indices and the tokens."""
        for a, b in self.chunks():
            tokens = self._read(self.tokens, a, b)
            if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
                raise ValueError(
                    f"token ids must lie in [0, {self.vocab_size}); got [{tokens.min()}, {tokens.max()}] "
                    f"in tokens {a}..{b}"
                )
            lo, hi = np.searchsorted(self.offsets, [a, b])
            seq_pos = positions_in_sequence(self.offsets[lo : hi + 1] - a, b - a)
            events = np.flatnonzero(self._mask(a, b)) if self.count_mask is not None else np.arange(b - a)
            yield a, b, tokens[events], seq_pos, events, tokens
