"""The n-gram model behind the prior: counts of orders ``1..n`` over a corpus's response tokens, queried per
position with backoff (see :mod:`kd_lightning.estimation.ngram` for the rules)."""

from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

import numpy as np

from kd_lightning.data.soft_labels import SparseRows, id_dtype_for
from kd_lightning.estimation.ngram_counts import (
    OrderCounts,
    context_hashes,
    count_order,
    positions_in_sequence,
)
from kd_lightning.estimation.ngram_external import ExternalCounter, SpilledOrder, parse_bytes


class NGramRows(NamedTuple):
    """What :meth:`NGramModel.distributions` gives per position."""

    rows: SparseRows
    orders: np.ndarray
    """(P,) int16: the order each row used (after backing off)."""
    context_counts: np.ndarray
    """(P,) int64: how often that context was counted."""


class NGramModel:
    """Counts of orders ``1..order`` over the counted tokens of a corpus, queried per position.

    Args:
        order, vocab_size, min_context_count: the model (see the module docstring for backoff).
        memory_budget: ``None`` counts in memory (fastest; ~90 bytes per token at its peak). Bytes or a
            size like ``"2GiB"``: count within that much working memory, spilling parts to ``spill_dir``.
        count_workers: processes counting spilled parts in parallel (the budget is shared between them).
        spill_dir: folder for spilled parts (default: the system temp folder); they are removed by
            :meth:`close` or when the model is garbage-collected.
    """

    def __init__(
        self,
        order: int,
        vocab_size: int,
        min_context_count: int = 1,
        memory_budget: int | str | None = None,
        count_workers: int = 1,
        spill_dir: str | Path | None = None,
    ) -> None:
        if order < 1:
            raise ValueError(f"ngram order must be >= 1, got {order}")
        if min_context_count < 1:
            raise ValueError(f"min_context_count must be >= 1, got {min_context_count}")
        self.order = order
        self.vocab_size = vocab_size
        self.min_context_count = min_context_count
        self.start_symbol = vocab_size  # outside the vocabulary
        self.wbits = int(vocab_size).bit_length()
        self.memory_budget = None if memory_budget is None else parse_bytes(memory_budget)
        self.count_workers = count_workers
        self.spill_dir = spill_dir
        self._external: ExternalCounter | None = None
        self._counts: dict[int, OrderCounts | SpilledOrder] = {}

    def fit(
        self, tokens: np.ndarray, offsets: np.ndarray, count_mask: np.ndarray | None = None
    ) -> NGramModel:
        """Remember the corpus and count the top order (lower orders are counted on demand).

        Args:
            tokens: (total,) token ids of all sequences concatenated.
            offsets: (num_seqs + 1,) sequence boundaries in ``tokens``.
            count_mask: (total,) bool, which tokens are events (default: all).
        """
        self.close()
        self._counts = {}
        if self.memory_budget is not None:
            self._external = ExternalCounter(
                tokens,
                offsets,
                count_mask,
                self.vocab_size,
                self.start_symbol,
                self.wbits,
                self.memory_budget,
                self.count_workers,
                self.spill_dir,
            )
            self.counts(self.order)
            return self
        tokens = np.asarray(tokens)
        if tokens.size and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(
                f"token ids must lie in [0, {self.vocab_size}); got [{tokens.min()}, {tokens.max()}]"
            )
        self._tokens = tokens
        self._seq_pos = self.positions_in_sequence(offsets, len(tokens))
        mask = np.ones(len(tokens), dtype=bool) if count_mask is None else np.asarray(count_mask, dtype=bool)
        self._events = np.flatnonzero(mask)
        if not len(self._events):
            raise ValueError("no tokens to count (count_mask is all False)")
        self.counts(self.order)
        return self

    def close(self) -> None:
        """Remove spilled parts, if any (the model cannot be queried for them afterwards)."""
        if self._external is not None:
            self._external.close()
            self._external = None
            self._counts = {}

    positions_in_sequence = staticmethod(positions_in_sequence)

    def counts(self, order: int) -> OrderCounts | SpilledOrder:
        """Counts of ``order`` (counted on first use): in memory, or spilled parts under a budget."""
        if order not in self._counts:
            if self._external is not None:
                self._counts[order] = self._external.count(order)
            else:
                hashes = context_hashes(
                    self._tokens, self._seq_pos, self._events, order - 1, self.start_symbol
                )
                self._counts[order] = count_order(hashes, self._tokens[self._events], self.wbits)
        return self._counts[order]

    def distributions(
        self, tokens: np.ndarray, offsets: np.ndarray, positions: np.ndarray, top_k: int
    ) -> NGramRows:
        """The n-gram distribution ``p(· | context)`` at each event position, as sparse top-k rows.

        The observed token ``tokens[p]`` is always among the ``top_k`` ids (it replaces the smallest
        entry if needed), so mixing in the one-hot term stays exact in sparse form.

        Args:
            tokens, offsets: the corpus to label (may differ from the counted one).
            positions: (P,) flat indices of the tokens being predicted.
            top_k: entries kept per row.

        Returns:
            rows with (P, top_k) ids/probs and (P,) tail mass, (P,) the order each row used, and (P,) the
            count of the context it used (at that order; the number of counted tokens at order 1).
        """
        tokens = np.asarray(tokens)
        seq_pos = self.positions_in_sequence(offsets, len(tokens))
        observed = tokens[positions].astype(np.int64)
        n = len(positions)
        ids = np.zeros((n, top_k), dtype=np.int64)
        probs = np.zeros((n, top_k), dtype=np.float64)
        used_order = np.zeros(n, dtype=np.int16)
        context_counts = np.zeros(n, dtype=np.int64)
        todo = np.arange(n)
        for order in range(self.order, 0, -1):
            if not len(todo):
                break
            counts = self.counts(order)
            hashes = context_hashes(tokens, seq_pos, positions[todo], order - 1, self.start_symbol)
            parts = (
                counts.split(hashes) if isinstance(counts, SpilledOrder) else [(counts, np.arange(len(todo)))]
            )
            ok = np.zeros(len(todo), dtype=bool)
            for part, at in parts:  # one part's counts in memory at a time
                if part is None:
                    continue
                keys, known = part.context_keys(hashes[at])
                idx = np.minimum(np.searchsorted(part.ctx_keys, keys), len(part.ctx_keys) - 1)
                hit = known & (part.ctx_keys[idx] == keys) & (part.ctx_counts[idx] >= self.min_context_count)
                if order == 1:
                    hit[:] = True
                rows = todo[at[hit]]
                self._fill_rows(part, idx[hit], observed[rows], ids, probs, rows, top_k)
                context_counts[rows] = part.ctx_counts[idx[hit]]
                ok[at[hit]] = True
            used_order[todo[ok]] = order
            todo = todo[~ok]
        tail = np.clip(1.0 - probs.sum(1), 0.0, 1.0)
        rows = SparseRows(ids.astype(id_dtype_for(self.vocab_size)), probs, tail)
        return NGramRows(rows, used_order, context_counts)

    def _fill_rows(
        self,
        counts: OrderCounts,
        ctx: np.ndarray,
        observed: np.ndarray,
        ids: np.ndarray,
        probs: np.ndarray,
        rows: np.ndarray,
        top_k: int,
    ) -> None:
        """Top-k continuations of each row's context (vectorised over the distinct contexts)."""
        if not len(rows):
            return
        uniq, inverse = np.unique(ctx, return_inverse=True)
        lengths = counts.ctx_start[uniq + 1] - counts.ctx_start[uniq]
        # gather every pair of the distinct contexts, rank by count within context
        group = np.repeat(np.arange(len(uniq)), lengths)
        pair_idx = np.repeat(counts.ctx_start[uniq], lengths) + (
            np.arange(lengths.sum()) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        )
        pc = counts.pair_counts[pair_idx]
        order = np.lexsort((-pc, group))
        group, pair_idx, pc = group[order], pair_idx[order], pc[order]
        rank = np.arange(len(group)) - np.repeat(np.cumsum(lengths) - lengths, lengths)
        keep = rank < top_k
        word_mask = np.uint64((1 << counts.wbits) - 1)
        top_ids = np.zeros((len(uniq), top_k), dtype=np.int64)
        top_p = np.zeros((len(uniq), top_k), dtype=np.float64)
        top_ids[group[keep], rank[keep]] = (counts.pair_keys[pair_idx[keep]] & word_mask).astype(np.int64)
        top_p[group[keep], rank[keep]] = pc[keep] / counts.ctx_counts[uniq][group[keep]]
        row_ids, row_p = top_ids[inverse], top_p[inverse]
        # make sure the observed token is present: put it in the last slot with its own probability
        missing = ~(row_ids == observed[:, None]).any(1)
        if missing.any():
            ctx_key = counts.ctx_keys[ctx[missing]]
            key = (ctx_key << np.uint64(counts.wbits)) | observed[missing].astype(np.uint64)
            at = np.minimum(np.searchsorted(counts.pair_keys, key), len(counts.pair_keys) - 1)
            found = counts.pair_keys[at] == key
            obs_p = np.where(found, counts.pair_counts[at], 0) / counts.ctx_counts[ctx[missing]]
            row_ids[missing, -1] = observed[missing]
            row_p[missing, -1] = obs_p
        ids[rows] = row_ids
        probs[rows] = row_p
