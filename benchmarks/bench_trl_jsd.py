"""Our generalized JSD against TRL's ``GKDTrainer.generalized_jsd_loss`` on the same inputs.

Setting: V = 49,152 (SmolLM2), H = 576, N = 2 × 1024 positions (a quarter masked, as prompts would be),
β = 0.5, a dense teacher. Every variant runs hidden → head → loss → backward in its own process:

* ``trl``: TRL's static loss on full (B, T, V) logits;
* ``ours``: :func:`kd_lightning.losses.generalized_jsd` on the same logits;
* ``ours_fused``: the fused path (hidden states + head in chunks of 512 target positions).

Values must agree; the figures are the best of 2 timings and the peak RSS each adds over its inputs.
Skips with a message when ``trl`` is not installed (``pip install trl``). Ends with one JSON line.

    python benchmarks/bench_trl_jsd.py [--batch 2] [--seq 1024]
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os

from _isolated import measure, parse_args, run_variants

VOCAB, HIDDEN, BETA, CHUNK = 49152, 576, 0.5, 512
JSON_KEYS = (
    "bench", "vocab", "rows", "beta", "ours_abs_diff_vs_trl", "ours_fused_abs_diff_vs_trl", "trl_seconds",
    "trl_peak_added_mib", "ours_seconds", "ours_peak_added_mib", "ours_fused_seconds",
    "ours_fused_peak_added_mib", "ours_time_vs_trl", "ours_memory_vs_trl", "ours_fused_time_vs_trl",
    "ours_fused_memory_vs_trl",
)  # fmt: skip


def run_variant(variant: str, batch: int, seq: int) -> dict:
    import torch
    from torch import nn

    torch.manual_seed(0)
    head = nn.Linear(HIDDEN, VOCAB, bias=False)
    hidden = torch.randn(batch, seq, HIDDEN, requires_grad=True)
    teacher = torch.randn(batch, seq, VOCAB) * 3
    labels = torch.randint(0, VOCAB, (batch, seq))
    labels[:, : seq // 4] = -100
    mask = labels != -100
    if variant == "trl":
        os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
        from trl.experimental.gkd import GKDTrainer

        def loss_fn():
            return GKDTrainer.generalized_jsd_loss(head(hidden), teacher, labels=labels, beta=BETA)
    elif variant == "ours":
        from kd_lightning.losses import generalized_jsd

        def loss_fn():
            return generalized_jsd(head(hidden), teacher, mask, beta=BETA)
    else:
        from kd_lightning.data.batch import PositionBatch
        from kd_lightning.losses import GeneralizedJSD
        from kd_lightning.losses.chunked import chunked_terms

        packed = PositionBatch(
            labels[mask].unsqueeze(0), dense_logits={"teacher": teacher[mask].unsqueeze(0)}
        )
        term = {"jsd": GeneralizedJSD("teacher", beta=BETA)}

        def loss_fn():
            return chunked_terms(hidden[mask], head, term, packed, CHUNK)["jsd"]

    def step() -> float:
        head.zero_grad(set_to_none=True)
        hidden.grad = None
        loss = loss_fn()
        loss.backward()
        return float(loss.detach())

    return {"variant": variant, **measure(step)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = parse_args(parser, {"batch": 1, "seq": 128})
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.batch, args.seq)))
        return
    if importlib.util.find_spec("trl") is None:
        raise SystemExit('bench_trl_jsd: trl is not installed; pip install "kd_lightning[bench]" (or trl)')
    results = run_variants(
        __file__, ("trl", "ours", "ours_fused"), ["--batch", str(args.batch), "--seq", str(args.seq)]
    )
    trl = results["trl"]
    figures = {"bench": "trl_generalized_jsd", "vocab": VOCAB, "rows": args.batch * args.seq, "beta": BETA}
    for variant in ("ours", "ours_fused"):
        diff = abs(results[variant]["loss"] - trl["loss"])
        assert diff < 1e-4 * max(1.0, abs(trl["loss"])), f"{variant} disagrees with TRL by {diff}"
        figures[f"{variant}_abs_diff_vs_trl"] = diff
    for variant in ("trl", "ours", "ours_fused"):
        figures[f"{variant}_seconds"] = round(results[variant]["seconds"], 2)
        figures[f"{variant}_peak_added_mib"] = round(results[variant]["peak_added_mib"])
    for variant in ("ours", "ours_fused"):
        figures[f"{variant}_time_vs_trl"] = round(results[variant]["seconds"] / trl["seconds"], 2)
        figures[f"{variant}_memory_vs_trl"] = round(
            results[variant]["peak_added_mib"] / trl["peak_added_mib"], 3
        )
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
