"""Posterior estimation time: R=64 vs R=1 (one proxy forward either way) and vs a naive per-round sampler.

The naive sampler runs one proxy forward per round and draws one token per position each time (the
obvious way to "sample R rounds"), then applies the same update. Proxy: the shipped SmolLM2-135M-Instruct
(falls back to a tiny random Llama if the assets are not set up). Ends with one JSON line.

    python benchmarks/bench_posterior.py [--sequences 8] [--rounds 64]
"""

from __future__ import annotations

import argparse
import json
import time

import numpy as np
import torch
from _isolated import parse_args

from kd_lightning.data.records import load_records, split_records
from kd_lightning.data.soft_labels import SparseRows, id_dtype_for
from kd_lightning.data.tokenized import tokenize_records
from kd_lightning.estimation.ngram import NGramPriorEstimator
from kd_lightning.estimation.posterior import DirichletUpdate, ProxyPosteriorEstimator
from kd_lightning.models.loading import freeze, load_causal_lm, load_tokenizer

JSON_KEYS = (
    "bench", "proxy", "positions", "tokens", "rounds", "seconds_r1", "seconds_r", "ratio_r_vs_r1",
    "target_ratio_r_vs_r1", "seconds_naive", "speedup_vs_naive", "target_speedup_vs_naive",
)  # fmt: skip


def timed(fn, repeats: int) -> float:
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sequences", type=int, default=4)
    parser.add_argument("--max-seq-len", type=int, default=160)
    parser.add_argument("--rounds", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=5)
    args = parse_args(parser, {"sequences": 2, "max_seq_len": 64, "rounds": 4, "repeats": 1})
    torch.set_num_threads(2)

    tokenizer = load_tokenizer("smollm2")
    _, heldout = split_records(load_records("alpaca_gpt35"), 100)
    corpus = tokenize_records(heldout[: args.sequences], tokenizer, args.max_seq_len)
    vocab = 49152
    prior_rows, _ = NGramPriorEstimator(ngram_order=5, top_k=32).estimate(corpus, vocab)
    proxy = freeze(load_causal_lm("smollm2"))
    pad = tokenizer.pad_token_id
    seqs = range(len(corpus))
    n_rows = int(corpus.target_offsets()[-1])
    n_tokens = int(corpus.offsets[-1])

    def ours(rounds: int) -> SparseRows:
        est = ProxyPosteriorEstimator(
            update=DirichletUpdate(8.0), sampling_rounds=rounds, top_k=32, batch_size=args.sequences
        )
        gen = torch.Generator().manual_seed(0)
        ((probs, _),) = est.proxy_distributions(proxy, corpus, seqs, pad)
        return est.posterior_rows(prior_rows, probs, gen)

    def naive(rounds: int) -> SparseRows:
        """One forward per round, one draw per position per round, then the same update."""
        est = ProxyPosteriorEstimator(
            update=DirichletUpdate(8.0), sampling_rounds=rounds, top_k=32, batch_size=args.sequences
        )
        gen = torch.Generator().manual_seed(0)
        counts = None
        for _ in range(rounds):
            ((probs, _),) = est.proxy_distributions(proxy, corpus, seqs, pad)
            draw = torch.multinomial(probs, 1, generator=gen)
            one = torch.zeros_like(probs).scatter_add_(1, draw, torch.ones_like(draw, dtype=probs.dtype))
            counts = one if counts is None else counts + one
        prior = prior_rows.to_dense(vocab)
        post = (8.0 * prior + counts) / (8.0 + rounds)
        return SparseRows.from_dense(post, 32, id_dtype_for(vocab))

    ours(1)  # warm-up
    t1, tr = float("inf"), float("inf")
    for _ in range(args.repeats):  # interleaved, best of each: drift hits both alike
        t1 = min(t1, timed(lambda: ours(1), 1))
        tr = min(tr, timed(lambda: ours(args.rounds), 1))
    print(
        f"ours: {n_rows} positions ({n_tokens} tokens): R=1 {t1:.2f} s, R={args.rounds} {tr:.2f} s",
        flush=True,
    )
    tn = timed(lambda: naive(args.rounds), 1)
    print(f"naive per-round sampler, R={args.rounds}: {tn:.2f} s", flush=True)
    check = ours(args.rounds)
    total = check.probs.astype(np.float64).sum(1) + check.tail
    assert np.allclose(total, 1.0, atol=5e-3)
    print(
        json.dumps(
            {
                "bench": "posterior",
                "proxy": "SmolLM2-135M-Instruct",
                "positions": n_rows,
                "tokens": n_tokens,
                "rounds": args.rounds,
                "seconds_r1": round(t1, 3),
                "seconds_r": round(tr, 3),
                "ratio_r_vs_r1": round(tr / t1, 3),
                "target_ratio_r_vs_r1": 1.1,
                "seconds_naive": round(tn, 2),
                "speedup_vs_naive": round(tn / tr, 1),
                "target_speedup_vs_naive": args.rounds,
            }
        )
    )


if __name__ == "__main__":
    main()
