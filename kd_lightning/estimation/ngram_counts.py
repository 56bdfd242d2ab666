"""Counting primitives of the n-gram prior: 64-bit context keys and one-sort counting of an order.

Every context gets a 64-bit key (exact for n ≤ 5 with a vocabulary under 65,536 ids, see
:func:`context_hashes`); its top bits and the token id are packed into one uint64, and a single sort groups
these by context and token, so ``#(c, w)`` and ``#(c)`` fall out of run lengths. Contexts whose keys share
those top bits are detected and moved to unused keys, so no two contexts are ever merged silently.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

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
class OrderCounts:
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


def count_order(hashes: np.ndarray, words: np.ndarray, wbits: int) -> OrderCounts:
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
    del ordered, prefixes
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
    return OrderCounts(
        wbits, pair_keys, pair_counts, pair_ctx[ctx_first], ctx_counts, ctx_start, moved_hashes, moved_keys
    )


def counts_from_histogram(word_counts: np.ndarray, wbits: int) -> OrderCounts:
    """Order-1 counts (one shared context) from a per-token histogram, equal to :func:`count_order`'s.

    Counting the unigram this way needs no sort and no per-event arrays, whatever the corpus size.
    """
    ctx_key = _mix(np.zeros(1, dtype=np.uint64)) >> np.uint64(wbits)
    words = np.flatnonzero(word_counts).astype(np.uint64)
    if not len(words):
        raise ValueError("no tokens to count (count_mask is all False)")
    pair_keys = (ctx_key << np.uint64(wbits)) | words
    pair_counts = np.asarray(word_counts, dtype=np.int64)[words.astype(np.int64)]
    empty = np.empty(0, dtype=np.uint64)
    return OrderCounts(
        wbits,
        pair_keys,
        pair_counts,
        ctx_key,
        pair_counts.sum(keepdims=True),
        np.array([0, len(words)]),
        empty,
        empty,
    )


def positions_in_sequence(offsets: np.ndarray, total: int) -> np.ndarray:
    """(total,) int32 position of each token inside its sequence, from (num_seqs + 1,) boundaries."""
    offsets = np.asarray(offsets, dtype=np.int64)
    if len(offsets) < 2 or offsets[0] != 0 or offsets[-1] != total or np.any(np.diff(offsets) < 0):
        raise ValueError(
            f"offsets must rise from 0 to len(tokens)={total} (got {len(offsets)} offsets ending at "
            f"{int(offsets[-1]) if len(offsets) else None}); pass sequence boundaries of these tokens"
        )
    starts = np.repeat(offsets[:-1], np.diff(offsets))
    return (np.arange(total, dtype=np.int64) - starts).astype(np.int32)
