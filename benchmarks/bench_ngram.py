"""n-gram prior counting: tokens/s on Zipf-distributed tokens vs a ``collections.Counter`` baseline.

Both count the same statistics for order n: #(context, token) and #(context) over every position, with
sequences left-padded by a start symbol. The baseline runs on a slice (it is slow) and is reported as
tokens/s, so the ratio is throughput against throughput. Peak memory at 10^8 tokens is measured in a
child process (ru_maxrss). Ends with one JSON line.

With a memory budget (``--budget 2GiB``), the same counting runs from a memory-mapped token file for each
of ``--budget-tokens`` (10^8 and 3·10^8 by default), each in a fresh child: its seconds, tokens/s, peak RSS
of the whole process (interpreter and torch included; the counter gets the budget minus what the process
already holds), and tokens/s as a ratio to the in-memory path on the same 10^8-token file. 3·10^8 tokens
are not counted in memory (~26 GiB); that row's ratio is against the 10^8 in-memory rate.

    python benchmarks/bench_ngram.py [--tokens 10000000] [--order 5] [--big-tokens 100000000]
        [--budget 2GiB] [--budget-tokens 100000000,300000000] [--workers 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import numpy as np
from _isolated import parse_args

from kd_lightning.data.soft_labels import SparseRows  # noqa: F401  (import cost outside the timings)
from kd_lightning.estimation.ngram import NGramModel
from kd_lightning.estimation.ngram_external import parse_bytes

VOCAB = 49152
JSON_KEYS = (
    "bench", "order", "tokens", "ours_tokens_per_s", "counter_tokens_per_s", "speedup_vs_counter",
    "target_tokens_per_s", "target_speedup", "big_tokens", "big_seconds", "big_peak_rss_gib", "big_fits_24gib",
    "budget_gib", "budgeted", "rss_this_process_gib",
)  # fmt: skip


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
        f"import sys, time, resource, json; sys.path.insert(0, {str(Path(__file__).resolve().parent)!r});"
        "from bench_ngram import zipf_corpus, ours;"
        f"t, o = zipf_corpus({n_tokens});"
        f"s, u = ours(t, o, {order});"
        "print(json.dumps({'seconds': s, 'distinct_pairs': u, "
        "'peak_rss_gib': resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}))"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def write_zipf_file(folder: Path, n_tokens: int, seq_len: int = 256, chunk: int = 10_000_000) -> Path:
    """A token file (uint16 .npy) and its offsets, written chunk by chunk so the writer stays small."""
    path = folder / f"zipf-{n_tokens}.npy"
    tokens = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint16, shape=(n_tokens,))
    rng = np.random.default_rng(0)
    for start in range(0, n_tokens, chunk):
        end = min(n_tokens, start + chunk)
        tokens[start:end] = (rng.zipf(1.1, size=end - start) - 1) % VOCAB
    tokens.flush()
    del tokens
    offsets = np.unique(np.append(np.arange(0, n_tokens, seq_len, dtype=np.int64), n_tokens))
    np.save(folder / f"zipf-{n_tokens}.offsets.npy", offsets)
    return path


def rss_now() -> int:
    """Resident bytes of this process right now (Linux /proc; 0 elsewhere)."""
    try:
        return int(Path("/proc/self/statm").read_text().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def count_file_child(path: str, order: int, budget: int, workers: int) -> None:
    """Child mode: count the token file (budget 0 = in memory), print one JSON line of figures."""
    offsets = np.load(path.replace(".npy", ".offsets.npy"))
    tokens = np.load(path, mmap_mode="r") if budget else np.load(path)
    held = rss_now()
    counter_budget = budget - held if budget else None
    if counter_budget is not None and counter_budget <= 0:
        raise SystemExit(f"the process already holds {held / 2**30:.2f} GiB, more than the budget")
    start = time.perf_counter()
    model = NGramModel(order, VOCAB, memory_budget=counter_budget, count_workers=workers).fit(tokens, offsets)
    seconds = time.perf_counter() - start
    counts = model.counts(order)
    pairs = getattr(counts, "num_pairs", None) or len(counts.pair_keys)
    parts = 1 << counts.bits if hasattr(counts, "bits") else 1
    model.close()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    children = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024
    result = {"tokens": len(tokens), "seconds": seconds, "distinct_pairs": pairs, "parts": parts}
    result |= {
        "held_before_gib": held / 2**30,
        "peak_rss_gib": peak / 2**30,
        "worker_peak_rss_gib": children / 2**30,
    }
    print(json.dumps(result))


def run_file_child(path: Path, order: int, budget: int, workers: int) -> dict:
    cmd = [sys.executable, __file__, "--child-file", str(path), "--order", str(order)]
    cmd += ["--child-budget", str(budget), "--workers", str(workers)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    if done.returncode:
        raise SystemExit(f"child failed: {' '.join(cmd)}\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def budget_runs(sizes: list[int], order: int, budget: int, workers: int, folder: Path) -> list[dict]:
    """In-memory vs budgeted counting of the same token files, each run in a fresh process."""
    rows = []
    memory_rate = None
    for n in sizes:
        path = write_zipf_file(folder, n)
        row = {"tokens": n}
        if n <= 100_000_000:
            memory = run_file_child(path, order, 0, 1)
            memory_rate = n / memory["seconds"]
            row["in_memory"] = memory
            print(
                f"in memory: {n:,} tokens in {memory['seconds']:.1f} s ({memory_rate / 1e6:.2f} M tokens/s), "
                f"peak RSS {memory['peak_rss_gib']:.2f} GiB",
                flush=True,
            )
        spilled = run_file_child(path, order, budget, workers)
        rate = n / spilled["seconds"]
        row["budgeted"] = spilled
        row["budgeted_tokens_per_s"] = round(rate)
        row["ratio_to_in_memory"] = round(rate / memory_rate, 3) if memory_rate else None
        row["peak_within_budget"] = spilled["peak_rss_gib"] * 2**30 <= budget
        print(
            f"budget {budget / 2**30:.2f} GiB: {n:,} tokens in {spilled['seconds']:.1f} s "
            f"({rate / 1e6:.2f} M tokens/s, {row['ratio_to_in_memory']} x in-memory), {spilled['parts']} parts, "
            f"peak RSS {spilled['peak_rss_gib']:.2f} GiB (held {spilled['held_before_gib']:.2f} GiB before "
            f"counting; workers {spilled['worker_peak_rss_gib']:.2f} GiB)",
            flush=True,
        )
        path.unlink()
        rows.append(row)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=int, default=10_000_000)
    parser.add_argument("--baseline-tokens", type=int, default=1_000_000)
    parser.add_argument("--order", type=int, default=5)
    parser.add_argument("--big-tokens", type=int, default=100_000_000, help="0 skips the memory run")
    parser.add_argument("--budget", default="2GiB", help="memory budget of the spilled runs; 0 skips them")
    parser.add_argument("--budget-tokens", default="100000000,300000000")
    parser.add_argument("--workers", type=int, default=1, help="processes counting spilled parts")
    parser.add_argument("--spill-dir", default=None, help="where the token files and parts go")
    parser.add_argument("--child-file", help=argparse.SUPPRESS)
    parser.add_argument("--child-budget", type=int, default=0, help=argparse.SUPPRESS)
    smoke = {
        "tokens": 200_000,
        "baseline_tokens": 20_000,
        "big_tokens": 300_000,
        "budget_tokens": "200000,400000",
    }
    args = parse_args(parser, smoke)
    if args.child_file:
        count_file_child(args.child_file, args.order, args.child_budget, args.workers)
        return

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
    budget = parse_bytes(args.budget) if args.budget not in ("0", "") else 0
    budgeted = []
    if budget:
        sizes = [int(n) for n in args.budget_tokens.split(",") if n]
        with tempfile.TemporaryDirectory(prefix="kdl-bench-ngram-", dir=args.spill_dir) as folder:
            budgeted = budget_runs(sizes, args.order, budget, args.workers, Path(folder))
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
        "budget_gib": round(budget / 2**30, 2) if budget else None,
        "budgeted": [
            {
                "tokens": r["tokens"],
                "seconds": round(r["budgeted"]["seconds"], 1),
                "tokens_per_s": r["budgeted_tokens_per_s"],
                "ratio_to_in_memory": r["ratio_to_in_memory"],
                "peak_rss_gib": round(r["budgeted"]["peak_rss_gib"], 2),
                "peak_within_budget": r["peak_within_budget"],
                "parts": r["budgeted"]["parts"],
                "in_memory_seconds": round(r["in_memory"]["seconds"], 1) if "in_memory" in r else None,
                "in_memory_peak_rss_gib": round(r["in_memory"]["peak_rss_gib"], 2)
                if "in_memory" in r
                else None,
            }
            for r in budgeted
        ],
        "rss_this_process_gib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
    }
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
