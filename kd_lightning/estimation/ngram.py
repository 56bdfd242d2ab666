"""n-gram prior over a teacher corpus (Bayesian closed-source KD, arXiv 2401.07013).

For a response token ``w*`` with context ``c`` (the previous ``order - 1`` tokens)::

    p_prior(w) = (1/γ) · #(c, w) / #(c)  +  (1 - 1/γ) · [w = w*]

Counting is vectorised numpy: every context gets a 64-bit key (exact for n ≤ 5 with a vocabulary under
65,536 ids, see :func:`context_hashes`), its top bits and the token id are packed into one uint64, and a
single sort groups these by context and token, so ``#(c, w)`` and ``#(c)`` fall out of run lengths.
Contexts whose keys share those top bits are detected and moved to unused keys, so no two contexts are
ever merged silently.

Context and backoff rules:

* A sequence is left-padded with a start symbol (an id outside the vocabulary), so every position has a
  full context of ``order - 1`` symbols and the first response tokens are conditioned on their prompt.
* Only response tokens are counted as events (``count_mask``); contexts may include prompt tokens.
* Backoff: if ``#(c) < min_context_count`` at order ``n`` (always so for a context never seen in the
  counted corpus, e.g. when applying counts to held-out text), use the longest shorter context
  ``c[-(k-1):]``, ``k = n-1, ..., 1`` that passes; order 1 (unigram over all counted tokens) always passes.
  Shorter orders are counted lazily, only when some position needs them.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from kd_lightning.data.soft_labels import SparseRows, id_dtype_for

_MIX1 = np.uint64(0xBF58476D1CE4E5B9)
_MIX2 = np.uint64(0x94D049BB133111EB)


def _mix(h: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser, in place on uint64 (wrap-around arithmetic is intended)."""
    h ^= h >> np.uint64(30)
    h *= _MIX1
    h ^= h >> np.uint64(27)
    h *= _MIX2
    h ^= h >> np.uint64(31)
    return h


def context_hashes(
    tokens: np.ndarray, seq_pos: np.ndarray, positions: np.ndarray, context_len: int, start_symbol: int
) -> np.ndarray:
    """64-bit keys of the ``context_len`` tokens before each of ``positions`` (flat indices).

    Token ids are packed ``bits`` at a time into a uint64 and passed through the splitmix64 finaliser,
    a bijection: while ``context_len * bits <= 64`` (n ≤ 5 for vocabularies under 65,536 ids) two
    different contexts never share a key. Longer contexts are folded through the finaliser every 64 bits
    (a hash; the prefix check in :func:`count_order` still guards the packed keys).

    Args:
        tokens: (total,) token ids of all sequences, concatenated.
        seq_pos: (total,) position of each token inside its sequence.
        positions: (P,) flat indices whose contexts are wanted.
        context_len: number of previous tokens (``order - 1``); 0 gives one shared context.
        start_symbol: id used before a sequence's first token.
    """
    bits = int(start_symbol).bit_length()
    n = len(positions)
    h = np.zeros(n, dtype=np.uint64)
    if context_len == 0:
        return _mix(h)
    every_token = n == len(tokens) and (n == 0 or (positions[0] == 0 and positions[-1] == n - 1))
    pos_in_seq = seq_pos if every_token else seq_pos[positions]
    # buffers reused across j: fresh 80 MB temporaries cost more in page faults than the arithmetic
    prev = np.empty(n, dtype=np.uint64)
    idx = None if every_token else np.empty(n, dtype=np.int64)
    near_start = np.empty(n, dtype=bool)
    start = np.uint64(start_symbol)
    shift = np.uint64(bits)
    used = 0
    for j in range(1, context_len + 1):
        if used + bits > 64:
            _mix(h)
            used = 0
        if every_token:
            prev[:j] = start
            np.copyto(prev[j:], tokens[: n - j], casting="unsafe")
        else:
            np.subtract(positions, j, out=idx)  # index -1 wraps for p < j: replaced just below
            np.copyto(prev, tokens[idx], casting="unsafe")
        np.less(pos_in_seq, j, out=near_start)
        np.putmask(prev, near_start, start)
        h <<= shift
        h |= prev
        used += bits
    return _mix(h)


@dataclass
class _OrderCounts:
    """Counts of one order: unique (context, token) keys sorted, grouped by context."""

    wbits: int
    pair_keys: np.ndarray  # (U,) uint64 sorted: context_key << wbits | token
    pair_counts: np.ndarray  # (U,) int64
    ctx_keys: np.ndarray  # (C,) uint64 sorted unique context keys
    ctx_counts: np.ndarray  # (C,) int64
    ctx_start: np.ndarray  # (C + 1,) index of each context's first pair
    moved_hashes: np.ndarray  # (M,) sorted full hashes whose prefix collided with another context's
    moved_keys: np.ndarray  # (M,) the fresh context keys they were given

    def context_keys(self, hashes: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Map full context hashes to this order's context keys; returns (keys, known-mask)."""
        keys = hashes >> np.uint64(self.wbits)
        _apply_moves(hashes, keys, self.moved_hashes, self.moved_keys)
        return keys, np.ones(len(hashes), dtype=bool)


def _apply_moves(
    hashes: np.ndarray, keys: np.ndarray, moved_hashes: np.ndarray, moved_keys: np.ndarray
) -> None:
    if len(moved_hashes):
        at = np.minimum(np.searchsorted(moved_hashes, hashes), len(moved_hashes) - 1)
        hit = moved_hashes[at] == hashes
        keys[hit] = moved_keys[at[hit]]


def _run_starts(sorted_values: np.ndarray) -> np.ndarray:
    """Indices where a new run of equal values begins in a sorted array."""
    starts = np.empty(len(sorted_values), dtype=bool)
    starts[0] = True
    np.not_equal(sorted_values[1:], sorted_values[:-1], out=starts[1:])
    return np.flatnonzero(starts)


def count_order(hashes: np.ndarray, words: np.ndarray, wbits: int) -> _OrderCounts:
    """Count (context, token) pairs and contexts for one order from event hashes and tokens.

    The context key is the hash's top ``64 - wbits`` bits. Contexts whose distinct full hashes share
    that prefix (rare: ~C²/2^49 pairs for C contexts) are moved to unused keys, so none are merged.
    """
    prefix_bits = np.uint64(wbits)  # the context key keeps the top 64 - wbits bits
    ordered = np.sort(hashes)
    prefixes = ordered >> prefix_bits
    same_prefix = prefixes[1:] == prefixes[:-1]
    same_prefix &= ordered[1:] != ordered[:-1]
    clash = np.flatnonzero(same_prefix)  # i: ordered[i + 1] is a different context with ordered[i]'s prefix
    del same_prefix
    moved_hashes = np.empty(0, dtype=np.uint64)
    moved_keys = np.empty(0, dtype=np.uint64)
    if len(clash):  # move every context of a clashing group but the first to an unused key
        moved_hashes = np.unique(ordered[clash + 1])
        used = set(prefixes[clash].tolist())
        rng = np.random.default_rng(len(moved_hashes))
        fresh: list[int] = []
        limit = (1 << (64 - wbits)) - 1
        while len(fresh) < len(moved_hashes):
            for candidate in rng.integers(0, limit, size=2 * len(moved_hashes), dtype=np.uint64).tolist():
                at = int(np.searchsorted(prefixes, candidate))
                if (at == len(prefixes) or prefixes[at] != candidate) and candidate not in used:
                    used.add(candidate)
                    fresh.append(candidate)
        moved_keys = np.asarray(fresh[: len(moved_hashes)], dtype=np.uint64)
    del ordered
    keys = hashes >> prefix_bits
    _apply_moves(hashes, keys, moved_hashes, moved_keys)
    keys <<= np.uint64(wbits)
    keys |= words.astype(np.uint64)
    keys.sort()
    starts = _run_starts(keys)
    pair_keys = keys[starts]
    pair_counts = np.empty(len(starts), dtype=np.int64)
    np.subtract(starts[1:], starts[:-1], out=pair_counts[:-1])
    pair_counts[-1] = len(keys) - starts[-1]
    del keys, starts
    pair_ctx = pair_keys >> np.uint64(wbits)
    ctx_first = _run_starts(pair_ctx)
    ctx_start = np.append(ctx_first, len(pair_keys))
    ctx_counts = np.add.reduceat(pair_counts, ctx_first)
    return _OrderCounts(
        wbits, pair_keys, pair_counts, pair_ctx[ctx_first], ctx_counts, ctx_start, moved_hashes, moved_keys
    )


class NGramModel:
    """Counts of orders ``1..order`` over the counted tokens of a corpus, queried per position."""

    def __init__(self, order: int, vocab_size: int, min_context_count: int = 1) -> None:
        if order < 1:
            raise ValueError(f"ngram order must be >= 1, got {order}")
        if min_context_count < 1:
            raise ValueError(f"min_context_count must be >= 1, got {min_context_count}")
        self.order = order
        self.vocab_size = vocab_size
        self.min_context_count = min_context_count
        self.start_symbol = vocab_size  # outside the vocabulary
        self.wbits = int(vocab_size).bit_length()
        self._counts: dict[int, _OrderCounts] = {}

    def fit(
        self, tokens: np.ndarray, offsets: np.ndarray, count_mask: np.ndarray | None = None
    ) -> NGramModel:
        """Remember the corpus and count the top order (lower orders are counted on demand).

        Args:
            tokens: (total,) token ids of all sequences concatenated.
            offsets: (num_seqs + 1,) sequence boundaries in ``tokens``.
            count_mask: (total,) bool, which tokens are events (default: all).
        """
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
        self._counts = {}
        self.counts(self.order)
        return self

    @staticmethod
    def positions_in_sequence(offsets: np.ndarray, total: int) -> np.ndarray:
        offsets = np.asarray(offsets, dtype=np.int64)
        if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != total or np.any(np.diff(offsets) < 0):
            raise ValueError(
                f"offsets must rise from 0 to len(tokens)={total} (got {len(offsets)} offsets ending at "
                f"{int(offsets[-1]) if len(offsets) else None}); pass sequence boundaries of these tokens"
            )
        starts = np.repeat(offsets[:-1], np.diff(offsets))
        return (np.arange(total, dtype=np.int64) - starts).astype(np.int32)

    def counts(self, order: int) -> _OrderCounts:
        if order not in self._counts:
            hashes = context_hashes(self._tokens, self._seq_pos, self._events, order - 1, self.start_symbol)
            self._counts[order] = count_order(hashes, self._tokens[self._events], self.wbits)
        return self._counts[order]

    def distributions(
        self, tokens: np.ndarray, offsets: np.ndarray, positions: np.ndarray, top_k: int
    ) -> tuple[SparseRows, np.ndarray]:
        """The n-gram distribution ``p(· | context)`` at each event position, as sparse top-k rows.

        The observed token ``tokens[p]`` is always among the ``top_k`` ids (it replaces the smallest
        entry if needed), so mixing in the one-hot term stays exact in sparse form.

        Args:
            tokens, offsets: the corpus to label (may differ from the counted one).
            positions: (P,) flat indices of the tokens being predicted.
            top_k: entries kept per row.

        Returns:
            rows with (P, top_k) ids/probs and (P,) tail mass, and (P,) the order each row used.
        """
        tokens = np.asarray(tokens)
        seq_pos = self.positions_in_sequence(offsets, len(tokens))
        observed = tokens[positions].astype(np.int64)
        n = len(positions)
        ids = np.zeros((n, top_k), dtype=np.int64)
        probs = np.zeros((n, top_k), dtype=np.float64)
        used_order = np.zeros(n, dtype=np.int16)
        todo = np.arange(n)
        for order in range(self.order, 0, -1):
            if not len(todo):
                break
            counts = self.counts(order)
            hashes = context_hashes(tokens, seq_pos, positions[todo], order - 1, self.start_symbol)
            keys, known = counts.context_keys(hashes)
            idx = np.minimum(np.searchsorted(counts.ctx_keys, keys), len(counts.ctx_keys) - 1)
            ok = known & (counts.ctx_keys[idx] == keys) & (counts.ctx_counts[idx] >= self.min_context_count)
            if order == 1:
                ok[:] = True
            rows, ctx = todo[ok], idx[ok]
            self._fill_rows(counts, ctx, observed[rows], ids, probs, rows, top_k)
            used_order[rows] = order
            todo = todo[~ok]
        tail = np.clip(1.0 - probs.sum(1), 0.0, 1.0)
        return SparseRows(ids.astype(id_dtype_for(self.vocab_size)), probs, tail), used_order

    def _fill_rows(
        self,
        counts: _OrderCounts,
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


def mix_prior(ngram: SparseRows, observed: np.ndarray, gamma: float) -> SparseRows:
    """``(1/γ)·p_ngram + (1 - 1/γ)·onehot(observed)`` on sparse rows that contain the observed id.

    Rows are re-sorted by probability (descending) and stored as float16 / float32 tail.
    """
    if gamma < 1:
        raise ValueError(f"gamma must be >= 1 (gamma=1 is the pure n-gram distribution), got {gamma}")
    probs = np.asarray(ngram.probs, dtype=np.float64) / gamma
    hit = np.asarray(ngram.ids).astype(np.int64) == np.asarray(observed, dtype=np.int64)[:, None]
    first_hit = hit & (np.cumsum(hit, axis=1) == 1)
    if not first_hit.any(1).all():
        raise ValueError("every row must contain its observed token (NGramModel.distributions guarantees it)")
    probs = probs + first_hit * (1.0 - 1.0 / gamma)
    order = np.argsort(-probs, axis=1, kind="stable")
    ids = np.take_along_axis(np.asarray(ngram.ids), order, axis=1)
    probs = np.take_along_axis(probs, order, axis=1)
    tail = np.asarray(ngram.tail, dtype=np.float64) / gamma
    return SparseRows(ids, probs.astype(np.float16), tail.astype(np.float32))


class NGramPriorEstimator:
    """Builds the prior soft labels for every target position of a tokenised corpus.

    Args:
        ngram_order: n of the n-gram (the paper found 5 good and very large n worse).
        gamma: smoothing γ ≥ 1; 1 = pure n-gram, ∞ = one-hot of the observed token.
        min_context_count: back off to shorter contexts seen fewer times than this.
        top_k: entries stored per position (the observed token is always among them).
    """

    def __init__(
        self, ngram_order: int = 5, gamma: float = 2.0, min_context_count: int = 1, top_k: int = 32
    ) -> None:
        if gamma < 1:
            raise ValueError(f"gamma must be >= 1, got {gamma}")
        if top_k < 1:
            raise ValueError(f"top_k must be >= 1, got {top_k}")
        self.ngram_order = ngram_order
        self.gamma = gamma
        self.min_context_count = min_context_count
        self.top_k = top_k

    def settings(self) -> dict:
        return {
            "kind": "ngram_prior",
            "ngram_order": self.ngram_order,
            "gamma": self.gamma,
            "min_context_count": self.min_context_count,
            "top_k": self.top_k,
        }

    def estimate(self, corpus, vocab_size: int, count_corpus=None) -> tuple[SparseRows, dict]:
        """Prior rows for the target positions of ``corpus`` (counts from ``count_corpus``, default itself).

        Returns the rows and statistics (orders used, mean mass on the observed token).
        """
        counted = count_corpus if count_corpus is not None else corpus
        response = np.roll(counted.target_mask(), 1)  # token p is a response token iff p - 1 is a target
        model = NGramModel(self.ngram_order, vocab_size, self.min_context_count).fit(
            counted.tokens, counted.offsets, response
        )
        events = np.flatnonzero(corpus.target_mask()) + 1
        ngram, orders = model.distributions(corpus.tokens, corpus.offsets, events, self.top_k)
        observed = corpus.tokens[events]
        prior = mix_prior(ngram, observed, self.gamma)
        ngram_observed = (
            np.where(np.asarray(ngram.ids).astype(np.int64) == observed[:, None], ngram.probs, 0)
        ).sum(1)
        stats = {
            "positions": len(events),
            "order_histogram": {int(k): int(v) for k, v in zip(*np.unique(orders, return_counts=True))},
            "mean_ngram_prob_of_observed": float(ngram_observed.mean()),
            "fraction_one_hot_ngram": float((ngram_observed > 0.999).mean()),
        }
        return prior, stats
