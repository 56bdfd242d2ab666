"""Building the ShareGPT corpus: each message tokenised once (pieces) vs each record rendered whole (reference).

What ``kdl plan data=sharegpt`` (or any first run on ShareGPT) spends before it prints anything: the train
split cut at 512 tokens, the held-out split, and the prior's longer cut (2048 tokens), as
``data/corpus.py`` builds them. Both paths run on the same records in this process; the token ids of all
three cuts are compared, and the cost of the sample check that every pieces build makes is timed on its own.
The reference path takes about 16 minutes on a 2-core machine; ``--records N`` uses the first N training
records. Ends with one JSON line.

    python benchmarks/bench_corpus.py [--records N] [--max-seq-len 512] [--count-max-seq-len 2048]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
from _isolated import parse_args

from kd_lightning.data.chat_encoding import CHECK_RECORDS, PieceEncoder, ReferenceEncoder
from kd_lightning.data.records import load_records, split_records
from kd_lightning.data.tokenized import TokenizedCorpus, tokenize_records, without_unfitting_history
from kd_lightning.models.loading import load_tokenizer

JSON_KEYS = (
    "bench", "source", "records", "tokens", "pieces_seconds", "reference_seconds", "pieces_records_per_s",
    "reference_records_per_s", "pieces_tokens_per_s", "reference_tokens_per_s", "speedup", "ids_identical",
    "check_records", "check_seconds", "encoding",
)  # fmt: skip


def build(encoder, records, heldout, tokenizer, cuts: tuple[int, int]) -> tuple[list[TokenizedCorpus], float]:
    start = time.perf_counter()
    check = None if isinstance(encoder, PieceEncoder) else 0  # the pieces path checks as every build does
    kwargs = {"encoder": encoder} if check is None else {"encoder": encoder, "check_records": 0}
    corpora = [
        tokenize_records(records, tokenizer, cuts[0], **kwargs),
        tokenize_records(heldout, tokenizer, cuts[0], **kwargs),
        tokenize_records(records, tokenizer, cuts[1], **kwargs),
    ]
    return corpora, time.perf_counter() - start


def same(a: TokenizedCorpus, b: TokenizedCorpus) -> bool:
    arrays = ("tokens", "offsets", "prompt_lens")
    return (
        all(np.array_equal(getattr(a, n), getattr(b, n)) for n in arrays) and a.record_keys == b.record_keys
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", default="sharegpt", help="sharegpt (multi-turn) or alpaca_gpt35 (single)")
    parser.add_argument("--records", type=int, default=None, help="the first N training records (all: none)")
    parser.add_argument("--max-seq-len", type=int, default=512)
    parser.add_argument("--count-max-seq-len", type=int, default=2048)
    args = parse_args(parser, {"records": 300})
    tokenizer = load_tokenizer("smollm2")
    train, heldout = split_records(
        load_records(args.source, None, {}), 200 if args.source == "sharegpt" else 100
    )
    train = train[: args.records] if args.records else train
    cuts = (args.max_seq_len, args.count_max_seq_len)
    pieces, pieces_s = build(PieceEncoder(tokenizer), train, heldout, tokenizer, cuts)
    reference, reference_s = build(ReferenceEncoder(tokenizer), train, heldout, tokenizer, cuts)
    sample = [without_unfitting_history(r, cuts[0]) for r in train[:: max(1, len(train) // CHECK_RECORDS)]]
    start = time.perf_counter()
    ReferenceEncoder(tokenizer).encode(sample[:CHECK_RECORDS])
    check_s = time.perf_counter() - start
    records = len(train) * 2 + len(heldout)  # the train split is cut twice
    tokens = sum(len(c.tokens) for c in pieces)
    identical = all(same(a, b) for a, b in zip(pieces, reference))
    print(
        f"{args.source}: {len(train):,} train + {len(heldout):,} held-out records, cuts {cuts}: "
        f"{tokens:,} tokens; pieces {pieces_s:.1f} s, reference {reference_s:.1f} s: "
        f"{reference_s / pieces_s:.1f}x; ids identical: {identical}; "
        f"the {len(sample[:CHECK_RECORDS])}-record check costs {check_s:.2f} s per cut"
    )
    print(
        json.dumps(
            {
                "bench": "corpus",
                "source": args.source,
                "records": records,
                "tokens": tokens,
                "pieces_seconds": round(pieces_s, 2),
                "reference_seconds": round(reference_s, 2),
                "pieces_records_per_s": round(records / pieces_s, 1),
                "reference_records_per_s": round(records / reference_s, 1),
                "pieces_tokens_per_s": round(tokens / pieces_s, 1),
                "reference_tokens_per_s": round(tokens / reference_s, 1),
                "speedup": round(reference_s / pieces_s, 2),
                "ids_identical": identical,
                "check_records": len(sample[:CHECK_RECORDS]),
                "check_seconds": round(check_s, 3),
                "encoding": pieces[0].report.encoding,
            }
        )
    )


if __name__ == "__main__":
    main()
