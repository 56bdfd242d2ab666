"""Packed vs padded batches on the demo corpus: padding fraction and tokens/s, in one run.

Corpus: the demo's training text (gpt-3.5 responses, SmolLM2 tokenizer, 256-token cap, the first 256 training
records). Two passes are timed, each padded and packed batch of the same records back to back:

* **distillation step**: the demo's 4-layer student, forward + backward of ``DistillModule`` (hard CE) on
  the training batches of one epoch order (``datamodule.batch_size`` 4, the demo's, and 16);
* **estimation forward**: the full SmolLM2-135M proxy over the posterior's by-length batches of 8.

Padding fraction = 1 − real tokens / (rows × row length). Tokens/s counts real tokens. The losses of both
layouts are compared (they must agree to float tolerance). Ends with one JSON line.

    python benchmarks/bench_packing.py [--records 256] [--batches 24]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
from _isolated import parse_args

from kd_lightning.data.datamodule import SoftLabelDataset, TeacherTextDataModule, collate
from kd_lightning.data.records import load_records, split_records
from kd_lightning.data.tokenized import tokenize_records
from kd_lightning.losses import HardCrossEntropy
from kd_lightning.models.builders import layer_selected_student
from kd_lightning.models.forward import target_position_logits
from kd_lightning.models.loading import freeze, load_causal_lm, load_tokenizer
from kd_lightning.modules.distill import DistillModule

JSON_KEYS = (
    "bench",
    "records",
    "batches",
    "distill_batch4",
    "distill_batch16",
    "estimation_by_length_batch8",
)


def padding_fraction(batch) -> float:
    return 1.0 - float(batch.attention_mask.sum()) / batch.input_ids.numel()


def distill_pass(module: DistillModule, batches: list) -> dict:
    """Time forward + backward of each batch padded and packed, alternating; compare the losses."""
    for batch in batches[0]:  # warm-up: the one-time head-shortcut and packing checks
        logits, positions = module.student_logits(batch)
        module.compute_terms(logits, positions)["hard_ce"][1].backward()
    seconds = {False: 0.0, True: 0.0}
    tokens = {False: 0, True: 0}
    padding = {False: [], True: []}
    worst = 0.0
    for padded, packed in batches:
        losses = {}
        for is_packed, batch in ((False, padded), (True, packed)):
            module.student.zero_grad(set_to_none=True)
            start = time.perf_counter()
            logits, positions = module.student_logits(batch)
            loss = module.compute_terms(logits, positions)["hard_ce"][1]
            loss.backward()
            seconds[is_packed] += time.perf_counter() - start
            tokens[is_packed] += int(batch.attention_mask.sum())
            padding[is_packed].append(padding_fraction(batch))
            losses[is_packed] = float(loss.detach())
        worst = max(worst, abs(losses[True] - losses[False]))
    return summary(seconds, tokens, padding) | {"max_loss_difference": worst}


@torch.inference_mode()
def estimation_pass(proxy, batches: list) -> dict:
    for batch in batches[0]:  # warm-up, as above
        target_position_logits(
            proxy, batch.input_ids, batch.attention_mask, batch.target_mask, batch.position_ids
        )
    seconds = {False: 0.0, True: 0.0}
    tokens = {False: 0, True: 0}
    padding = {False: [], True: []}
    for padded, packed in batches:
        for is_packed, batch in ((False, padded), (True, packed)):
            start = time.perf_counter()
            target_position_logits(
                proxy, batch.input_ids, batch.attention_mask, batch.target_mask, batch.position_ids
            )
            seconds[is_packed] += time.perf_counter() - start
            tokens[is_packed] += int(batch.attention_mask.sum())
            padding[is_packed].append(padding_fraction(batch))
    return summary(seconds, tokens, padding)


def summary(seconds: dict, tokens: dict, padding: dict) -> dict:
    out = {}
    for is_packed, name in ((False, "padded"), (True, "packed")):
        out[f"{name}_padding_fraction"] = round(sum(padding[is_packed]) / len(padding[is_packed]), 3)
        out[f"{name}_tokens_per_s"] = round(tokens[is_packed] / seconds[is_packed])
    out["speedup"] = round(out["packed_tokens_per_s"] / out["padded_tokens_per_s"], 2)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--records", type=int, default=256, help="training records (the demo's train_limit)")
    parser.add_argument("--batches", type=int, default=24, help="batches timed per pass")
    args = parse_args(parser, {"records": 40, "batches": 2})
    torch.manual_seed(0)
    tokenizer = load_tokenizer("smollm2")
    train, _ = split_records(load_records("alpaca_gpt35"), 100)
    corpus = tokenize_records(train[: args.records], tokenizer, 256)
    pad = tokenizer.pad_token_id
    student = layer_selected_student("smollm2", [0, 10, 20, 29])
    module = DistillModule(student, {"hard_ce": HardCrossEntropy()}, optimizer=torch.optim.AdamW)
    figures: dict = {"bench": "packing", "records": len(corpus), "batches": args.batches}
    for batch_size in (4, 16):
        dm = TeacherTextDataModule(batch_size=batch_size).connect(pad, corpus)
        loader = dm.train_dataloader()
        dataset = SoftLabelDataset(corpus)
        batches = []
        for indices in list(loader.batch_sampler)[: args.batches]:
            items = [dataset[i] for i in indices]
            batches.append((collate(items, pad), collate(items, pad, packing=True)))
        result = distill_pass(module, batches)
        figures[f"distill_batch{batch_size}"] = result
        print(f"distill step, batch {batch_size}: {result}", flush=True)
    del module, student
    proxy = freeze(load_causal_lm("smollm2"))
    dataset = SoftLabelDataset(corpus)
    order = sorted(range(len(corpus)), key=lambda i: len(corpus.sequence(i)))
    batches = []
    for start in range(0, min(len(order), 8 * args.batches), 8):
        items = [dataset[i] for i in order[start : start + 8]]
        batches.append((collate(items, pad), collate(items, pad, packing=True)))
    result = estimation_pass(proxy, batches)
    figures["estimation_by_length_batch8"] = result
    print(f"estimation forward (by-length batches of 8): {result}", flush=True)
    print(json.dumps(figures))


if __name__ == "__main__":
    main()
