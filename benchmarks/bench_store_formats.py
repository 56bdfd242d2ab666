"""Store formats: bytes per target position against fidelity, for an open teacher's rows and the n-gram prior.

The teacher is the shipped SmolLM2-135M-Instruct read on the gpt-3.5 training responses: its full
distribution is the truth each stored row is scored against, ``KL(true ‖ row)`` (rows read as the library
reads them: the tail spread over the ids not stored, floored at 1e-8) and total variation. Formats:

* ``top32_fp16``: today's format 1 (K slots, float16);  ``top32_log8``: the same slots, one byte each;
* ``top32_floor``: log8, entries under 1e-3 join the tail, ragged rows; ``top16_floor``: the same from 16;
* ``sampled12_compact`` / ``sampled32_compact``: 12 / 32 draws kept as distinct ids with exact counts.

The prior (5-gram, top-32) has no truth; its rows are scored against its own format-1 rows (what
quantisation costs). Bytes are every file of the written store over its rows. Ends with one JSON line.

    python benchmarks/bench_store_formats.py [--records 16]   (N·V float32 truths in memory: keep it small)
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

import torch
from _isolated import parse_args

from kd_lightning.data.records import load_records, split_records
from kd_lightning.data.soft_labels import SoftLabelStore, SparseRows, write_store
from kd_lightning.data.store_format import StoreFormat, StoreWrite
from kd_lightning.data.tokenized import tokenize_records
from kd_lightning.estimation.ngram import NGramPriorEstimator
from kd_lightning.evaluation.fidelity import estimate_fidelity, sparse_estimate, summarize_fidelity
from kd_lightning.losses.sparsify import sampled_rows, topk_rows
from kd_lightning.models.forward import target_position_logits
from kd_lightning.models.loading import freeze, load_causal_lm, load_tokenizer

FORMATS = {
    "top32_fp16": None,
    "top32_log8": {"probabilities": "log8", "floor": 0.0, "ragged": False},
    "top32_floor": {"probabilities": "log8", "floor": 1e-3, "ragged": True},
    "top16_floor": {"probabilities": "log8", "floor": 1e-3, "ragged": True},
    "sampled12_compact": {"probabilities": "counts", "floor": 1e-3, "ragged": True},
    "sampled32_compact": {"probabilities": "counts", "floor": 1e-3, "ragged": True},
}
JSON_KEYS = ("bench", "positions", "vocab_size", "dense_fp16_bytes_per_token", "teacher", "prior")


def teacher_logits(model, corpus) -> torch.Tensor:
    """(N, V) the teacher's logits at every target position, in store-row order (one sequence at a time)."""
    out = []
    for i in range(len(corpus)):
        seq = torch.as_tensor(corpus.sequence(i), dtype=torch.long)[None]
        positions = torch.zeros_like(seq, dtype=torch.bool)
        positions[0, int(corpus.prompt_lens[i]) - 1 : seq.shape[1] - 1] = True
        out.append(target_position_logits(model, seq, torch.ones_like(seq), positions).float())
    return torch.cat(out)


def written(folder: Path, rows: SparseRows, offsets, fmt: dict | None, draws: int | None) -> SoftLabelStore:
    write = StoreWrite(StoreFormat(**(fmt or {})), draws)
    return write_store(folder, rows, offsets, {"bench": True} | write.key(), write=write)


def measure(
    tmp: Path, name: str, rows: SparseRows, offsets, fmt, draws, truth: torch.Tensor, vocab: int
) -> dict:
    store = written(tmp / name, rows, offsets, fmt, draws)
    got = store.all_rows()
    fidelity = summarize_fidelity(estimate_fidelity(truth, sparse_estimate(got, vocab)))
    return {
        "bytes_per_token": round(store.nbytes() / store.num_rows, 1),
        "kl": round(fidelity["kl"], 4),
        "tv": round(fidelity["tv"], 4),
        "encoding": (store.encoding or {}).get("probabilities", "fp16"),
    }


def to_rows(ids: torch.Tensor, probs: torch.Tensor, tail: torch.Tensor) -> SparseRows:
    return SparseRows(ids.numpy().astype("uint16"), probs.numpy().astype("float16"), tail.numpy())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=16, help="training responses scored")
    parser.add_argument(
        "--model", default="smollm2", help="the open teacher (shipped name, folder or hub id)"
    )
    args = parse_args(parser, {"records": 3})
    tokenizer = load_tokenizer("smollm2")
    train, _ = split_records(load_records("alpaca_gpt35"), 100)
    corpus = tokenize_records(train[: args.records], tokenizer, 256)
    offsets = corpus.target_offsets()
    model = freeze(load_causal_lm(args.model))
    with torch.no_grad():
        logits = teacher_logits(model, corpus)
    vocab = logits.shape[-1]
    truth = torch.softmax(logits, -1)
    generator = torch.Generator().manual_seed(0)
    teacher_rows = {
        "top32": to_rows(*topk_rows(logits, 32)),
        "top16": to_rows(*topk_rows(logits, 16)),
        "sampled12": to_rows(*sampled_rows(logits, 12, generator=generator)),
        "sampled32": to_rows(*sampled_rows(logits, 32, generator=generator)),
    }
    teacher, prior = {}, {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, fmt in FORMATS.items():
            source, draws = name.split("_")[0], None
            if source.startswith("sampled"):
                draws = int(source.removeprefix("sampled"))
            teacher[name] = measure(
                Path(tmp), f"t-{name}", teacher_rows[source], offsets, fmt, draws, truth, vocab
            )
        prior_rows, _ = NGramPriorEstimator(ngram_order=5, gamma=2.0, min_context_count=2, top_k=32).estimate(
            corpus, vocab
        )
        reference = sparse_estimate(prior_rows, vocab)(slice(0, len(prior_rows.ids)))
        for name in ("top32_fp16", "top32_log8", "top32_floor"):
            prior[name] = measure(
                Path(tmp), f"p-{name}", prior_rows, offsets, FORMATS[name], None, reference, vocab
            )
    dense = vocab * 2
    print(f"{int(offsets[-1]):,} target positions; dense fp16 {dense:,} B/token")
    print(
        f"{'format':20s} {'B/token':>8s} {'x dense':>8s} {'KL(teacher)':>12s} {'TV':>7s} {'prior KL vs fp16':>17s}"
    )
    for name, r in teacher.items():
        p = prior.get(name)
        print(
            f"{name:20s} {r['bytes_per_token']:8.1f} {dense / r['bytes_per_token']:8.0f} {r['kl']:12.4f} "
            f"{r['tv']:7.4f} {'' if p is None else format(p['kl'], '17.5f')}"
        )
    print(
        json.dumps(
            {
                "bench": "store_formats",
                "positions": int(offsets[-1]),
                "vocab_size": vocab,
                "dense_fp16_bytes_per_token": dense,
                "teacher": teacher,
                "prior": prior,
            }
        )
    )


if __name__ == "__main__":
    main()
