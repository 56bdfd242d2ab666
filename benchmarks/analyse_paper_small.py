"""Where the prior helps or hurts: paper_small's students' per-token NLL on held-out ChatGPT turns, by how
confident the n-gram prior is there.

Reads a finished ``experiment=paper_small`` (its corpus artifact and trained students), fits the 5-gram that
the prior is built from (the counted training split), and at every held-out response token records the
prior's top-1 probability (its confidence), whether its top-1 is the observed token, and each student's
NLL. Prints the mean NLL per confidence bucket for each student and each KD student minus SFT, and ends with
one JSON line. Not run by the suite (it needs the experiment's artifacts, hours to build).

    python benchmarks/analyse_paper_small.py --corpus artifacts/corpus/<key> \\
        --student sft=artifacts/distill/<key>/student --student prior=artifacts/distill/<key>/student ...
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import numpy as np
import torch

from kd_lightning.data.tokenized import TokenizedCorpus
from kd_lightning.estimation.ngram import NGramModel
from kd_lightning.models.forward import target_position_logits
from kd_lightning.models.loading import freeze, load_causal_lm

BUCKETS = (0.0, 0.2, 0.4, 0.6, 0.8, 1.01)


def token_nll(model, corpus: TokenizedCorpus) -> np.ndarray:
    """(N,) the model's NLL of every response token of ``corpus``, in target order."""
    out = []
    with torch.no_grad():
        for i in range(len(corpus)):
            seq = torch.as_tensor(corpus.sequence(i), dtype=torch.long)[None]
            positions = torch.zeros_like(seq, dtype=torch.bool)
            positions[0, int(corpus.prompt_lens[i]) - 1 : seq.shape[1] - 1] = True
            logits = target_position_logits(model, seq, torch.ones_like(seq), positions).float()
            observed = seq[0, int(corpus.prompt_lens[i]) :]
            out.append((torch.logsumexp(logits, -1) - logits.gather(-1, observed[:, None])[:, 0]).numpy())
    return np.concatenate(out)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--corpus", type=Path, required=True, help="the experiment's corpus artifact folder")
    parser.add_argument("--student", action="append", required=True, help="name=folder (sft first)")
    parser.add_argument("--order", type=int, default=5)
    parser.add_argument("--vocab", type=int, default=49152)
    args = parser.parse_args()
    torch.set_num_threads(2)
    counted = TokenizedCorpus.load(args.corpus / "counts")
    heldout = TokenizedCorpus.load(args.corpus / "heldout")
    model = NGramModel(args.order, args.vocab, 2, "2GiB")
    try:
        model.fit(counted.tokens, counted.offsets, np.roll(counted.target_mask(), 1))
        events = np.flatnonzero(heldout.target_mask()) + 1
        rows, _orders, _counts = model.distributions(heldout.tokens, heldout.offsets, events, 32)
    finally:
        model.close()
    observed = heldout.tokens[events].astype(np.int64)
    ids, probs = np.asarray(rows.ids).astype(np.int64), np.asarray(rows.probs, dtype=np.float64)
    confidence = probs.max(1)
    right = ids[np.arange(len(ids)), probs.argmax(1)] == observed
    students = dict(s.split("=", 1) for s in args.student)
    nll = {name: token_nll(freeze(load_causal_lm(folder)), heldout) for name, folder in students.items()}
    base = next(iter(nll))
    table = []
    for lo, hi in itertools.pairwise(BUCKETS):
        for is_right in (True, False):
            at = (confidence >= lo) & (confidence < hi) & (right == is_right)
            if not at.any():
                continue
            row = {"confidence": f"[{lo:.1f}, {min(hi, 1.0):.1f}]", "prior_top1_is_observed": bool(is_right)}
            row |= {"tokens": int(at.sum()), **{name: float(v[at].mean()) for name, v in nll.items()}}
            table.append(row)
    print(
        f"{len(events):,} held-out tokens; mean NLL: "
        + ", ".join(f"{n} {v.mean():.4f}" for n, v in nll.items())
    )
    header = f"{'prior confidence':18s} {'top1 right':>10s} {'tokens':>7s} " + " ".join(
        f"{n:>10s}" for n in nll
    )
    print(header + "  " + " ".join(f"{n + '-' + base:>14s}" for n in nll if n != base))
    for row in table:
        cells = " ".join(f"{row[n]:10.4f}" for n in nll)
        diffs = " ".join(f"{row[n] - row[base]:+14.4f}" for n in nll if n != base)
        print(
            f"{row['confidence']:18s} {row['prior_top1_is_observed']!s:>10s} {row['tokens']:7d} {cells}  {diffs}"
        )
    print(json.dumps({"bench": "paper_small_by_prior_confidence", "tokens": len(events), "rows": table}))


if __name__ == "__main__":
    main()
