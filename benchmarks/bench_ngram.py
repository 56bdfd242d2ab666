"""n-gram prior counting: tokens/s on Zipf-distributed tokens vs a ``collections.Counter`` baseline.

Both count the same statistics for order n: #(context, token) and #(context) over every position, with
sequences left-padded by a start symbol. The baseline runs on a slice (it is slow) and is reported as
tokens/s, so the ratio is throughput against throughput. Peak memory at 10^8 tokens is measured in a
child process (ru_maxrss). Ends with one JSON line.

    python benchmarks/bench_ngram.py [--tokens 10000000] [--order 5] [--big-tokens 100000000]
"""

from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from collections import Counter

import numpy as np

from kd_lightning.data.soft_labels import SparseRows  # noqa: F401  (import cost outside the timings)
from kd_lightning.estimation.ngram import NGramModel

VOCAB = 49152


def zipf_corpus(n_tokens: int, seq_len: int = 256, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    ranks = rng.zipf(1.1, size=n_tokens)
    tokens = ((ranks - 1) % VOCAB).astype(np.int32)
    offsets = np.arange(0, n_tokens + seq_len, seq_len, dtype=np.int64)
    offsets[-1] = n_tokens
    return tokens, np.unique(offsets)


def ours(tokens: np.ndarray, offsets: np.ndarray, order: int) -> tuple[float, int]:
    start = time.perf_counter()
    model = NGramModel(order, VOCAB).fit(tokens, offsets)
    seconds = time.perf_counter() - start
    return seconds, len(model.counts(order).pair_keys)


def counter_baseline(tokens: np.ndarray, offsets: np.ndarray, order: int) -> tuple[float, int]:
    start = time.perf_counter()
    pairs: Counter = Counter()
    contexts: Counter = Counter()
    pad = [VOCAB] * (order - 1)
    for i in range(len(offsets) - 1):
        seq = pad + tokens[offsets[i] : offsets[i + 1]].tolist()
        grams = list(zip(*(seq[j:] for j in range(order))))
        pairs.update(grams)
        contexts.update(g[:-1] for g in grams)
    return time.perf_counter() - start, len(pairs)


def peak_memory_child(n_tokens: int, order: int) -> dict:
    code = (
        "import sys, time, resource, json; sys.path.insert(0, '.');"
        "from benchmarks.bench_ngram import zipf_corpus, ours;"
        f"t, o = zipf_corpus({n_tokens});"
        f"s, u = ours(t, o, {order});"
        "print(json.dumps({'seconds': s, 'distinct_pairs': u, "
        "'peak_rss_gib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=10_000_000)
    parser.add_argument("--baseline-tokens", type=int, default=1_000_000)
    parser.add_argument("--order", type=int, default=5)
    parser.add_argument("--big-tokens", type=int, default=100_000_000, help="0 skips the memory run")
    args = parser.parse_args()

    tokens, offsets = zipf_corpus(args.tokens)
    warm = offsets[offsets <= 100_000]
    ours(tokens[: warm[-1]], warm, args.order)  # warm-up
    runs = [ours(tokens, offsets, args.order) for _ in range(3)]
    seconds = min(r[0] for r in runs)
    ours_tps = args.tokens / seconds
    print(
        f"ours: {args.tokens:,} tokens, order {args.order}: {seconds:.3f} s -> {ours_tps / 1e6:.2f} M tokens/s "
        f"({runs[0][1]:,} distinct n-grams)",
        flush=True,
    )

    n_base = min(args.baseline_tokens, args.tokens)
    base_offsets = offsets[offsets <= n_base]
    base_seconds, base_pairs = counter_baseline(tokens[:n_base], base_offsets, args.order)
    base_tps = int(base_offsets[-1]) / base_seconds
    _check_seconds, check_pairs = ours(tokens[: int(base_offsets[-1])], base_offsets, args.order)
    assert check_pairs == base_pairs, (check_pairs, base_pairs)  # same statistics, exactly
    print(
        f"Counter baseline: {int(base_offsets[-1]):,} tokens: {base_seconds:.2f} s -> {base_tps / 1e6:.3f} M tokens/s "
        f"(distinct n-grams agree: {base_pairs:,})",
        flush=True,
    )

    big = peak_memory_child(args.big_tokens, args.order) if args.big_tokens else None
    if big:
        print(
            f"10^8 run: {args.big_tokens:,} tokens in {big['seconds']:.1f} s, peak RSS {big['peak_rss_gib']:.2f} GiB",
            flush=True,
        )
    figures = {
        "bench": "ngram_counting",
        "order": args.order,
        "tokens": args.tokens,
        "ours_tokens_per_s": round(ours_tps),
        "counter_tokens_per_s": round(base_tps),
        "speedup_vs_counter": round(ours_tps / base_tps, 1),
        "target_tokens_per_s": 5_000_000,
        "target_speedup": 20,
        "big_tokens": args.big_tokens or None,
        "big_seconds": round(big["seconds"], 1) if big else None,
        "big_peak_rss_gib": round(big["peak_rss_gib"], 2) if big else None,
        "big_fits_24gib": (big["peak_rss_gib"] < 24) if big else None,
        "rss_this_process_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
