"""KD loss peak memory and time: naive full-vocabulary vs chunked (over logits) vs hidden + head in chunks,
checkpointed per term (``fuse=False``) and fused with closed-form gradients (the default).

Setting: V = 49,152 (SmolLM2), H = 576, N = 4 × 2048 target positions, terms hard CE + forward KL against
sparse top-32 targets (the soft-label store's format). Each variant runs forward + backward in its own
process; the figure is the peak RSS added by the loss step over the inputs already in memory
(ru_maxrss after minus before; on a GPU, the allocator's peak over what was allocated before), and the best
of 2 timings. Ends with one JSON line.

    python benchmarks/bench_kd_loss.py [--rows 8192] [--chunk 512] [--device cuda]
"""

from __future__ import annotations

import argparse
import json

from _isolated import measure, parse_args, run_variants

VOCAB, HIDDEN, TOPK = 49152, 576, 32
JSON_KEYS = (
    "bench", "device", "vocab", "rows", "chunk", "naive_seconds", "naive_peak_added_mib", "chunked_seconds",
    "chunked_peak_added_mib", "checkpointed_seconds", "checkpointed_peak_added_mib", "fused_seconds",
    "fused_peak_added_mib", "chunked_memory_vs_naive", "chunked_time_vs_naive", "checkpointed_memory_vs_naive",
    "checkpointed_time_vs_naive", "fused_memory_vs_naive", "fused_time_vs_naive", "target_memory_vs_naive",
    "target_time_vs_naive",
)  # fmt: skip


def run_variant(variant: str, rows: int, chunk: int, device: str) -> dict:
    import torch
    from torch import nn

    from kd_lightning.data.batch import PositionBatch, SoftLabels
    from kd_lightning.losses import ForwardKL, HardCrossEntropy
    from kd_lightning.losses.chunked import chunked_terms

    torch.manual_seed(0)
    head = nn.Linear(HIDDEN, VOCAB, bias=False, device=device)
    hidden = torch.randn(rows, HIDDEN, device=device, requires_grad=True)
    probs = torch.rand(1, rows, TOPK, device=device)
    probs = probs / probs.sum(-1, keepdim=True) * 0.9
    ids = torch.randint(0, VOCAB, (1, rows, TOPK), device=device)
    prior = SoftLabels(ids, probs, torch.full((1, rows), 0.1, device=device))
    batch = PositionBatch(torch.randint(0, VOCAB, (1, rows), device=device), {"prior": prior})
    terms = {"hard_ce": HardCrossEntropy(), "prior_kl": ForwardKL("prior")}

    def step() -> float:
        head.zero_grad(set_to_none=True)
        hidden.grad = None
        if variant == "naive":
            logits = head(hidden).unsqueeze(0)
            loss = sum(term(logits, batch) for term in terms.values())
        elif variant == "chunked":  # logits given, the terms computed chunk by chunk
            logits = head(hidden)
            loss = sum(chunked_terms(logits, nn.Identity(), terms, batch, chunk).values())
        elif variant == "checkpointed":  # hidden + head in chunks under activation checkpointing, per term
            loss = sum(chunked_terms(hidden, head, terms, batch, chunk, fuse=False).values())
        else:  # fused (the default): gradients in closed form in the same pass, logits never all at once
            loss = sum(chunked_terms(hidden, head, terms, batch, chunk, fuse=True).values())
        loss.backward()
        return float(loss.detach())

    return {"variant": variant, **measure(step, device=device)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", type=int, default=4 * 2048)
    parser.add_argument("--chunk", type=int, default=512)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda: peak memory from the allocator")
    parser.add_argument("--variant", default=None, help=argparse.SUPPRESS)
    args = parse_args(parser, {"rows": 512, "chunk": 128})
    if args.device.startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise SystemExit(
                "--device cuda: torch sees no GPU here (torch.cuda.is_available() is False); use --device cpu"
            )
    if args.variant:
        print(json.dumps(run_variant(args.variant, args.rows, args.chunk, args.device)))
        return
    results = run_variants(
        __file__,
        ("naive", "chunked", "checkpointed", "fused"),
        ["--rows", str(args.rows), "--chunk", str(args.chunk), "--device", args.device],
    )
    naive = results["naive"]
    for variant in ("chunked", "checkpointed", "fused"):
        assert abs(results[variant]["loss"] - naive["loss"]) < 1e-3 * abs(naive["loss"]), "paths disagree"
    figures = {
        "bench": "kd_loss_memory",
        "device": args.device,
        "vocab": VOCAB,
        "rows": args.rows,
        "chunk": args.chunk,
    }
    for variant in ("naive", "chunked", "checkpointed", "fused"):
        figures[f"{variant}_seconds"] = round(results[variant]["seconds"], 2)
        figures[f"{variant}_peak_added_mib"] = round(results[variant]["peak_added_mib"])
    for variant in ("chunked", "checkpointed", "fused"):
        figures[f"{variant}_memory_vs_naive"] = round(
            results[variant]["peak_added_mib"] / naive["peak_added_mib"], 3
        )
        figures[f"{variant}_time_vs_naive"] = round(results[variant]["seconds"] / naive["seconds"], 2)
    figures.update({"target_memory_vs_naive": 0.125, "target_time_vs_naive": 1.2})
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
