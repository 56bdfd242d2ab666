"""Soft-label store size: bytes per token on disk vs dense fp16 over the 49,152-token vocabulary.

Builds the real n-gram prior of the gpt-3.5 training responses (SmolLM2 tokenizer, top-32) and measures
the files written. Also times a full pass of memory-mapped reads, the checksum of every file that opening a
store verifies (sha256), and an open with every check. Ends with one JSON line.

    python benchmarks/bench_store.py [--top-k 32]
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from _isolated import parse_args

from kd_lightning.data.records import load_records, split_records
from kd_lightning.data.soft_labels import SoftLabelStore, write_store
from kd_lightning.data.store_checks import _VERIFIED, verify_checksums
from kd_lightning.data.tokenized import tokenize_records
from kd_lightning.estimation.ngram import NGramPriorEstimator
from kd_lightning.models.loading import load_tokenizer

VOCAB = 49152
JSON_KEYS = (
    "bench", "positions", "top_k", "bytes_per_token", "dense_fp16_bytes_per_token", "fraction_of_dense",
    "dense_over_store", "target_fraction", "read_all_sequences_s", "store_mib", "checksum_s",
    "checksum_mib_per_s", "open_with_checks_s",
)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--top-k", type=int, default=32)
    parser.add_argument("--records", type=int, default=None, help="training records counted (default: all)")
    args = parse_args(parser, {"records": 40})
    tokenizer = load_tokenizer("smollm2")
    train, _ = split_records(load_records("alpaca_gpt35"), 100)
    train = train[: args.records]
    corpus = tokenize_records(train, tokenizer, 512)
    rows, _ = NGramPriorEstimator(ngram_order=5, gamma=2.0, min_context_count=2, top_k=args.top_k).estimate(
        corpus, VOCAB
    )
    with tempfile.TemporaryDirectory() as tmp:
        store = write_store(Path(tmp) / "prior", rows, corpus.target_offsets(), {"bench": True})
        files = sum(p.stat().st_size for p in store.folder.iterdir())
        n = len(store.tail)
        start = time.perf_counter()
        reopened = SoftLabelStore(store.folder)
        for i in range(len(reopened)):
            reopened.rows(i)
        read_s = time.perf_counter() - start
        meta = json.loads((store.folder / "meta.json").read_text())
        timings = {}
        for repeat in range(3):  # the checksum of every file, as opening verifies it (memo cleared each time)
            _VERIFIED.clear()
            start = time.perf_counter()
            verify_checksums(store.folder, meta, "")
            timings[repeat] = time.perf_counter() - start
            _VERIFIED.clear()
            start = time.perf_counter()
            SoftLabelStore(store.folder, validate=True)
            open_s = time.perf_counter() - start
        checksum_s = min(timings.values())
    per_token = files / n
    dense = VOCAB * 2
    print(
        f"{n:,} positions, {files / 2**20:.2f} MiB on disk: {per_token:.1f} B/token vs dense fp16 {dense:,} B/token"
    )
    print(
        json.dumps(
            {
                "bench": "soft_label_store",
                "positions": n,
                "top_k": args.top_k,
                "bytes_per_token": round(per_token, 1),
                "dense_fp16_bytes_per_token": dense,
                "fraction_of_dense": round(per_token / dense, 5),
                "dense_over_store": round(dense / per_token, 1),
                "target_fraction": round(1 / 300, 5),
                "read_all_sequences_s": round(read_s, 3),
                "store_mib": round(files / 2**20, 2),
                "checksum_s": round(checksum_s, 4),
                "checksum_mib_per_s": round(files / 2**20 / max(checksum_s, 1e-9), 1),
                "open_with_checks_s": round(open_s, 4),
            }
        )
    )


if __name__ == "__main__":
    main()
