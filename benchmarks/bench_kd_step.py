"""A KD training step with precomputed sparse soft labels vs a plain SFT step: same student, same batch.

Student: the 4-layer SmolLM2 student of the demo (``student=smollm2_layers``; a random model of the same
shape when the shipped assets are absent). Batch: 8 sequences of 256 tokens, 64 of prompt. The KD step adds
KL terms against top-32 stores (one: prior; two: prior + posterior, the closed-source recipe). Every step is
forward + backward + AdamW step through ``DistillModule.training_step``; variants are interleaved and the
median of the timed repeats is reported. Ends with one JSON line.

    python benchmarks/bench_kd_step.py [--repeats 9] [--chunk 0] [--batch 8] [--seq 256]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch
from _isolated import parse_args

from kd_lightning.data.batch import SoftLabels, TextBatch
from kd_lightning.losses import ForwardKL, HardCrossEntropy
from kd_lightning.losses.functional import IGNORE_INDEX
from kd_lightning.modules.distill import DistillModule

TOPK = 32
JSON_KEYS = (
    "bench", "student", "batch", "target_tokens", "loss_chunk_size", "sft_seconds", "kd_prior_seconds",
    "kd_prior_posterior_seconds", "kd_prior_vs_sft", "kd_prior_posterior_vs_sft", "target_vs_sft",
)  # fmt: skip


def student_model():
    from kd_lightning.models.builders import layer_selected_student
    from kd_lightning.models.shipped import AssetError

    try:
        return layer_selected_student("smollm2", [0, 10, 20, 29]), "smollm2_layers"
    except AssetError:
        pass
    from kd_lightning.models.builders import tiny_llama

    model = tiny_llama(49152, hidden_size=576, num_layers=4, num_heads=9, intermediate_size=1536)
    return model, "random (SmolLM2 shape)"


def make_batch(vocab: int, rows: int, seq: int) -> TextBatch:
    """``rows`` sequences of ``seq`` tokens, the first quarter prompt, with top-32 prior and posterior rows."""
    g = torch.Generator().manual_seed(0)
    prompt = seq // 4
    ids = torch.randint(0, vocab, (rows, seq), generator=g)
    target = torch.full((rows, seq), IGNORE_INDEX)
    target[:, prompt - 1 : -1] = ids[:, prompt:]
    stores = {}
    for name in ("prior", "posterior"):
        probs = torch.rand(rows, seq, TOPK, generator=g)
        stores[name] = SoftLabels(
            torch.randint(0, vocab, (rows, seq, TOPK), generator=g),
            probs / probs.sum(-1, keepdim=True) * 0.9,
            torch.full((rows, seq), 0.1),
        )
    return TextBatch(
        input_ids=ids, attention_mask=torch.ones_like(ids), target_ids=target, soft_labels=stores
    )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--chunk", type=int, default=0, help="loss_chunk_size (0: plain path)")
    parser.add_argument("--batch", type=int, default=8, help="sequences per batch")
    parser.add_argument("--seq", type=int, default=256, help="tokens per sequence (a quarter of them prompt)")
    args = parse_args(parser, {"repeats": 1, "batch": 2, "seq": 64})
    warnings.filterwarnings("ignore", message=".*self.trainer.*")
    warnings.filterwarnings("ignore", message=".*self.log.*")
    torch.manual_seed(0)
    student, student_name = student_model()
    batch = make_batch(int(student.config.vocab_size), args.batch, args.seq)
    variants = {
        "sft": {"hard_ce": HardCrossEntropy()},
        "kd_prior": {"hard_ce": HardCrossEntropy(), "prior_kl": ForwardKL("prior")},
        "kd_prior_posterior": {
            "hard_ce": HardCrossEntropy(),
            "prior_kl": ForwardKL("prior"),
            "posterior_kl": ForwardKL("posterior"),
        },
    }
    modules, optimizers = {}, {}
    for name, terms in variants.items():
        module = DistillModule(
            student,
            terms,
            optimizer=lambda params: torch.optim.AdamW(params, lr=1e-5),
            loss_chunk_size=args.chunk or None,
        )
        module.on_fit_start()
        modules[name], optimizers[name] = module, module.configure_optimizers()

    def step(name: str) -> float:
        optimizer = optimizers[name]
        optimizer.zero_grad(set_to_none=True)
        start = time.perf_counter()
        loss = modules[name].training_step(batch, 0)
        loss.backward()
        modules[name].on_before_optimizer_step(optimizer)  # as Lightning calls it
        optimizer.step()
        return time.perf_counter() - start

    for name in variants:  # warm-up (allocator, head-shortcut check)
        step(name)
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name in variants:
            times[name].append(step(name))
    median = {name: statistics.median(t) for name, t in times.items()}
    tokens = int(batch.target_mask.sum())
    for name, seconds in median.items():
        print(f"{name:20s} {seconds:.2f} s/step  {tokens / seconds:.0f} target tok/s", flush=True)
    print(
        json.dumps(
            {
                "bench": "kd_step_vs_sft_step",
                "student": student_name,
                "batch": [args.batch, args.seq],
                "target_tokens": tokens,
                "loss_chunk_size": args.chunk or None,
                "sft_seconds": round(median["sft"], 3),
                "kd_prior_seconds": round(median["kd_prior"], 3),
                "kd_prior_posterior_seconds": round(median["kd_prior_posterior"], 3),
                "kd_prior_vs_sft": round(median["kd_prior"] / median["sft"], 3),
                "kd_prior_posterior_vs_sft": round(median["kd_prior_posterior"] / median["sft"], 3),
                "target_vs_sft": 1.15,
            }
        )
    )


if __name__ == "__main__":
    main()
