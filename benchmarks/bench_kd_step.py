"""A KD training step with precomputed sparse soft labels vs a plain SFT step: same student, same batch.

Student: the 4-layer SmolLM2 student of the demo (``student=smollm2_layers``; a random model of the same
shape when the shipped assets are absent). Batch: 8 sequences of 256 tokens, 64 of prompt. The KD step adds
KL terms against top-32 stores (one: prior; two: prior + posterior, the closed-source recipe). Every step is
forward + backward + AdamW step through ``DistillModule.training_step``; variants are interleaved and the
median of the timed repeats is reported. Ends with one JSON line.

    python benchmarks/bench_kd_step.py [--repeats 9] [--chunk 0]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch

from kd_lightning.losses import HardCrossEntropy, SoftLabelKL
from kd_lightning.losses.functional import IGNORE_INDEX
from kd_lightning.modules.distill import DistillModule

BATCH, SEQ, PROMPT, TOPK = 8, 256, 64, 32


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


def make_batch(vocab: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, vocab, (BATCH, SEQ), generator=g)
    target = torch.full((BATCH, SEQ), IGNORE_INDEX)
    target[:, PROMPT - 1 : -1] = ids[:, PROMPT:]
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "target_ids": target}
    for name in ("prior", "posterior"):
        probs = torch.rand(BATCH, SEQ, TOPK, generator=g)
        batch[f"{name}_probs"] = probs / probs.sum(-1, keepdim=True) * 0.9
        batch[f"{name}_ids"] = torch.randint(0, vocab, (BATCH, SEQ, TOPK), generator=g)
        batch[f"{name}_tail"] = torch.full((BATCH, SEQ), 0.1)
    return batch


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--chunk", type=int, default=0, help="loss_chunk_size (0: plain path)")
    args = parser.parse_args()
    warnings.filterwarnings("ignore", message=".*self.trainer.*")
    warnings.filterwarnings("ignore", message=".*self.log.*")
    torch.manual_seed(0)
    student, student_name = student_model()
    batch = make_batch(int(student.config.vocab_size))
    variants = {
        "sft": {"hard_ce": HardCrossEntropy()},
        "kd_prior": {"hard_ce": HardCrossEntropy(), "prior_kl": SoftLabelKL("prior")},
        "kd_prior_posterior": {
            "hard_ce": HardCrossEntropy(),
            "prior_kl": SoftLabelKL("prior"),
            "posterior_kl": SoftLabelKL("posterior"),
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
        optimizer.step()
        return time.perf_counter() - start

    for name in variants:  # warm-up (allocator, head-shortcut check)
        step(name)
    times = {name: [] for name in variants}
    for _ in range(args.repeats):
        for name in variants:
            times[name].append(step(name))
    median = {name: statistics.median(t) for name, t in times.items()}
    tokens = int((batch["target_ids"] != IGNORE_INDEX).sum())
    for name, seconds in median.items():
        print(f"{name:20s} {seconds:.2f} s/step  {tokens / seconds:.0f} target tok/s", flush=True)
    print(
        json.dumps(
            {
                "bench": "kd_step_vs_sft_step",
                "student": student_name,
                "batch": [BATCH, SEQ],
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
