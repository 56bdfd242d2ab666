"""Training throughput of the full SmolLM2-135M-Instruct student (all 30 layers): fp32 vs bf16 autocast, eager
vs compiled (``trainer.compile=true``), fused AdamW, and the eager attention kernel
(``student_attn_implementation=eager``; torch's sdpa has a slow backward on a CPU).

What ``trainer.precision=bf16-mixed`` and ``trainer.compile=true`` buy on this CPU (experiment=paper_small
uses both). One step is forward + backward + AdamW over a batch of ``--batch`` × ``--seq`` tokens (a quarter
prompt) through ``DistillModule.training_step`` with hard CE only (and its ``on_before_optimizer_step``, as
Lightning calls it). The variants are interleaved and the best of the timed repeats reported (the machines
are shared: a busy moment only lengthens a repeat); each variant's first step starts from the same weights, so its loss is
compared, and the compiled fp32 step's gradients are compared with the eager fp32 step's (max relative
difference per tensor, cosine over all). A compiled variant's first step compiles: its extra time is the
compile cost. On a CPU without bf16 units (AVX512-BF16 or AMX) the library trains in fp32 instead (one log
line); this script runs bf16 anyway, to show why. With ``--device cuda`` the same steps run on a GPU; where
the shipped SmolLM2 is not installed the student is SmolLM2-135M's architecture with random weights, which
times the same. Ends with one JSON line.

    python benchmarks/bench_precision.py [--repeats 5] [--batch 4] [--seq 256] [--device cuda]
"""

from __future__ import annotations

import argparse
import json
import time
import warnings

import torch
from _isolated import parse_args

from kd_lightning.cli.trainer import cpu_has_bf16_units
from kd_lightning.data.batch import TextBatch
from kd_lightning.losses import HardCrossEntropy
from kd_lightning.losses.functional import IGNORE_INDEX
from kd_lightning.models.forward import TRAINING_DECODER, compile_for_training
from kd_lightning.models.loading import set_attention
from kd_lightning.modules.compiled import compile_loss_terms
from kd_lightning.modules.distill import DistillModule

JSON_KEYS = (
    "bench", "device", "student", "batch", "tokens_per_step", "cpu_has_bf16_units", "threads", "fp32_seconds",
    "bf16_seconds", "compiled_fp32_seconds", "compiled_bf16_seconds", "bf16_fused_adamw_seconds",
    "compiled_bf16_fused_adamw_seconds", "bf16_eager_attention_seconds",
    "compiled_bf16_fused_adamw_eager_attention_seconds", "compiled_bf16_fused_adamw_eager_attention_loss_seconds",
    "fp32_tokens_per_s", "bf16_tokens_per_s",
    "compiled_bf16_tokens_per_s", "bf16_speedup", "compiled_fp32_speedup_vs_fp32", "compiled_bf16_speedup_vs_bf16",
    "compiled_bf16_speedup_vs_fp32", "fused_adamw_speedup", "compiled_fused_speedup_vs_bf16",
    "compiled_fused_speedup_vs_bf16_fused", "compiled_fused_speedup_vs_fp32", "eager_attention_speedup_vs_bf16",
    "compiled_fused_eager_attention_speedup_vs_bf16", "compiled_fused_eager_attention_loss_speedup_vs_bf16",
    "compiled_fused_eager_attention_loss_speedup_vs_fp32", "compile_seconds_fp32", "compile_seconds_bf16",
    "first_loss_fp32", "first_loss_bf16", "first_loss_compiled_fp32", "first_loss_compiled_bf16",
    "first_loss_compiled_bf16_eager_attention", "first_loss_compiled_bf16_eager_attention_loss",
    "compiled_fp32_grad_max_rel_diff", "compiled_fp32_grad_cosine",
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
    optimizers = {
        False: module.configure_optimizers(),
        True: torch.optim.AdamW([p for p in module.parameters() if p.requires_grad], lr=1e-5, fused=True),
    }
    compiled = compile_for_training(student)  # the library's trainer.compile=true, switched per variant below
    (term,) = module.loss_terms.values()
    compile_loss_terms(module)  # trainer.compile=true compiles hard CE too (its code declares it can)
    compiled_term = term._compiled_call_impl

    def switch_to_eager() -> (
        None
    ):  # not release_compiled: its dynamo reset would recompile (from disk) every step
        student.__dict__.pop(TRAINING_DECODER, None)

    switch_to_eager()
    device_type = torch.device(args.device).type
    tokens_per_step = int((batch.target_ids != IGNORE_INDEX).sum())

    own_attention = student.config._attn_implementation

    def step(
        dtype: torch.dtype | None,
        compile_: bool,
        fused: bool,
        attention: str | None,
        compile_loss: bool = False,
        keep: bool = False,
    ) -> tuple[float, float, dict]:
        set_attention(student, attention or own_attention)  # student_attn_implementation
        term._compiled_call_impl = compiled_term if compile_loss else None
        if compile_:
            object.__setattr__(student, TRAINING_DECODER, compiled)
        start = time.perf_counter()
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=dtype is not None):
            loss = module.training_step(batch, 0)
        loss.backward()
        module.on_before_optimizer_step(optimizers[fused])  # as Lightning calls it: the step's token mean
        value = float(loss.detach()) / tokens_per_step  # the loss is the step's token sum
        seconds = time.perf_counter() - start
        grads = (
            {n: p.grad.detach().clone() for n, p in student.named_parameters() if p.grad is not None}
            if keep
            else {}
        )
        start = time.perf_counter()
        optimizers[fused].step()
        optimizers[fused].zero_grad(set_to_none=True)
        seconds += time.perf_counter() - start
        switch_to_eager()
        return seconds, value, grads

    variants = {  # name: (autocast dtype, compiled decoder, fused AdamW, attention kernel (None: the model's
        # own), compiled loss term: what trainer.compile=true compiles since the loss joined it)
        "fp32": (None, False, False, None),
        "bf16": (torch.bfloat16, False, False, None),
        "compiled_fp32": (None, True, False, None),
        "compiled_bf16": (torch.bfloat16, True, False, None),
        "bf16_fused_adamw": (torch.bfloat16, False, True, None),
        "compiled_bf16_fused_adamw": (torch.bfloat16, True, True, None),
        "bf16_eager_attention": (torch.bfloat16, False, False, "eager"),
        "compiled_bf16_fused_adamw_eager_attention": (torch.bfloat16, True, True, "eager"),
        "compiled_bf16_fused_adamw_eager_attention_loss": (torch.bfloat16, True, True, "eager", True),
    }
    first: dict[str, tuple[float, float, dict]] = {}
    for label, settings in variants.items():  # the same start for every first step
        student.load_state_dict(start_state)
        first[label] = step(*settings, keep=label in ("fp32", "compiled_fp32"))  # compiles once
    times: dict[str, list[float]] = {label: [] for label in variants}
    for _ in range(args.repeats):
        for label, settings in variants.items():
            times[label].append(step(*settings)[0])
    median = {label: min(t) for label, t in times.items()}  # best of the repeats: robust to a busy machine
    eager, compiled_grads = first["fp32"][2], first["compiled_fp32"][2]
    flat_e = torch.cat([g.flatten().double() for g in eager.values()])
    flat_c = torch.cat([compiled_grads[n].flatten().double() for n in eager])
    rel_diff = max(
        float((compiled_grads[n] - g).abs().max() / g.abs().max().clamp_min(1e-30)) for n, g in eager.items()
    )
    cosine = float(torch.nn.functional.cosine_similarity(flat_e, flat_c, dim=0))
    tokens = args.batch * args.seq
    print(
        f"{name} on {args.device}, {torch.get_num_threads()} threads: {tokens} tokens/step; "
        + ", ".join(f"{label} {seconds:.2f} s" for label, seconds in median.items())
        + f"; bf16 {median['fp32'] / median['bf16']:.2f}x fp32, compiled bf16 {median['bf16'] / median['compiled_bf16']:.2f}x"
        f" bf16, compiled fp32 {median['fp32'] / median['compiled_fp32']:.2f}x fp32; compiling took "
        f"{first['compiled_fp32'][0] - median['compiled_fp32']:.0f} s (fp32), "
        f"{first['compiled_bf16'][0] - median['compiled_bf16']:.0f} s (bf16); compiled bf16 + fused AdamW + eager "
        f"attention {median['bf16'] / median['compiled_bf16_fused_adamw_eager_attention']:.2f}x bf16, and with the "
        f"loss compiled {median['bf16'] / median['compiled_bf16_fused_adamw_eager_attention_loss']:.2f}x bf16, "
        f"{median['fp32'] / median['compiled_bf16_fused_adamw_eager_attention_loss']:.2f}x fp32; "
        f"bf16 units: {cpu_has_bf16_units()}"
    )
    print(
        json.dumps(
            {
                "bench": "precision",
                "device": torch.cuda.get_device_name(args.device) if device_type == "cuda" else "cpu",
                "student": name,
                "batch": [args.batch, args.seq],
                "tokens_per_step": tokens,
                "cpu_has_bf16_units": cpu_has_bf16_units(),
                "threads": torch.get_num_threads(),
                **{f"{label}_seconds": round(seconds, 3) for label, seconds in median.items()},
                "fp32_tokens_per_s": round(tokens / median["fp32"], 1),
                "bf16_tokens_per_s": round(tokens / median["bf16"], 1),
                "compiled_bf16_tokens_per_s": round(tokens / median["compiled_bf16"], 1),
                "bf16_speedup": round(median["fp32"] / median["bf16"], 3),
                "compiled_fp32_speedup_vs_fp32": round(median["fp32"] / median["compiled_fp32"], 3),
                "compiled_bf16_speedup_vs_bf16": round(median["bf16"] / median["compiled_bf16"], 3),
                "compiled_bf16_speedup_vs_fp32": round(median["fp32"] / median["compiled_bf16"], 3),
                "fused_adamw_speedup": round(median["bf16"] / median["bf16_fused_adamw"], 3),
                "compiled_fused_speedup_vs_bf16": round(
                    median["bf16"] / median["compiled_bf16_fused_adamw"], 3
                ),
                "compiled_fused_speedup_vs_bf16_fused": round(
                    median["bf16_fused_adamw"] / median["compiled_bf16_fused_adamw"], 3
                ),
                "compiled_fused_speedup_vs_fp32": round(
                    median["fp32"] / median["compiled_bf16_fused_adamw"], 3
                ),
                "eager_attention_speedup_vs_bf16": round(median["bf16"] / median["bf16_eager_attention"], 3),
                "compiled_fused_eager_attention_speedup_vs_bf16": round(
                    median["bf16"] / median["compiled_bf16_fused_adamw_eager_attention"], 3
                ),
                "compiled_fused_eager_attention_loss_speedup_vs_bf16": round(
                    median["bf16"] / median["compiled_bf16_fused_adamw_eager_attention_loss"], 3
                ),
                "compiled_fused_eager_attention_loss_speedup_vs_fp32": round(
                    median["fp32"] / median["compiled_bf16_fused_adamw_eager_attention_loss"], 3
                ),
                "compile_seconds_fp32": round(first["compiled_fp32"][0] - median["compiled_fp32"], 1),
                "compile_seconds_bf16": round(first["compiled_bf16"][0] - median["compiled_bf16"], 1),
                "first_loss_fp32": round(first["fp32"][1], 6),
                "first_loss_bf16": round(first["bf16"][1], 6),
                "first_loss_compiled_fp32": round(first["compiled_fp32"][1], 6),
                "first_loss_compiled_bf16": round(first["compiled_bf16"][1], 6),
                "first_loss_compiled_bf16_eager_attention": round(
                    first["compiled_bf16_fused_adamw_eager_attention"][1], 6
                ),
                "first_loss_compiled_bf16_eager_attention_loss": round(
                    first["compiled_bf16_fused_adamw_eager_attention_loss"][1], 6
                ),
                "compiled_fp32_grad_max_rel_diff": float(f"{rel_diff:.3g}"),
                "compiled_fp32_grad_cosine": round(cosine, 9),
            }
        )
    )


if __name__ == "__main__":
    main()
