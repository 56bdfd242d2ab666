"""``kdl plan``: what a run will cost, before anything heavy runs.

From the tokenised corpus (the only artifact it builds, and a cheap one) and the models' parameter counts
(read from safetensors headers, or from ``config.json`` alone on the meta device; no weights loaded), it
estimates:

* corpus tokens: records, tokens, target positions (each store has one row per target position);
* each store's bytes at its top-k: ``N·K·(id bytes + 2) + N·4 + (S+1)·8`` plus the ``.npy`` headers, for
  N target positions, K stored entries, S sequences (ids uint16 up to 65,535 ids else int32; float16
  probabilities; float32 tail; int64 offsets);
* forward FLOPs of the proxy passes: ``6·P·T·epochs`` to align (forward and backward) and ``2·P·T`` for the
  posterior (one forward per sequence, shared by all R draws), for P parameters and T tokens; the same
  ``2·P·T`` for an open teacher's offline store; with Proxy-KD's preference step, upper bounds for
  sampling the SFT proxy's answers and for DPO (answers counted at their ``max_new_tokens``);
* the KD loss's peak memory per step: ``3·n·V·4`` bytes (fp32 logits, their softmax and the gradient) for
  the n target positions of a batch, or ``3·c·V·4`` with ``loss_chunk_size`` c.

Every figure comes with the formula that produced it. Two what-ifs plan a run bigger than what is on this
machine: ``plan.records`` scales the tokenised corpus to that many training records at its measured mean
lengths, ``plan.proxy_parameters`` / ``plan.teacher_parameters`` stand for models not downloaded yet, and
``plan.vocab_size`` for another tokenizer's vocabulary (token counts stay this tokenizer's).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kd_lightning.data.soft_labels import id_dtype_for
from kd_lightning.data.store_format import StoreFormat
from kd_lightning.data.store_size import store_bytes
from kd_lightning.models.size import parameter_count
from kd_lightning.stages.context import StageContext
from kd_lightning.stages.registry import soft_label_entry, store_files


@dataclass(frozen=True)
class PlanRow:
    item: str
    value: float
    unit: str
    formula: str

    def cells(self) -> str:
        return f"| {self.item} | {human(self.value, self.unit)} | {self.formula} |"


def human(value: float, unit: str) -> str:
    """1536 B → '1.5 KiB'; 3.2e12 FLOP → '3.20 TFLOP'; counts with thousands separators."""
    if unit == "B":
        for prefix, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
            if value >= scale:
                return f"{value / scale:.2f} {prefix}"
        return f"{value:.0f} B"
    if unit == "FLOP":
        for prefix, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
            if value >= scale:
                return f"{value / scale:.2f} {prefix}"
        return f"{value:.0f} FLOP"
    return f"{value:,.0f}{' ' + unit if unit else ''}"


def run_plan(
    ctx: StageContext,
    batch_size: int,
    loss_chunk_size: int | None,
    stores: list[str],
    records: int | None = None,
    proxy_parameters: float | None = None,
    teacher_parameters: float | None = None,
    vocab_size: int | None = None,
    title: str = "",
) -> dict[str, Any]:
    """The plan of a run (see the module docstring); ``stores`` are the stores its students read.
    ``title`` names what is planned in the printed heading (a pipeline variant with its own stores).

    ``records`` scales the training split to that many records (a what-if; ``data.train_limit`` is then
    not applied); ``*_parameters`` and ``vocab_size`` stand for models and a tokenizer not on this machine.
    """
    corpus = ctx.corpus()
    train, full, heldout = corpus.train, corpus.full_train, corpus.heldout
    vocab = int(vocab_size) if vocab_size else corpus.vocab_size
    if records is not None and int(records) < 1:
        raise ValueError(f"plan.records must be >= 1 or null, got {records}")
    scale = 1.0 if records is None else int(records) / len(train)
    scaled = "" if records is None else f" × {scale:.2f} (plan.records={int(records)})"
    n_rows = round(int(train.target_offsets()[-1]) * scale)
    n_seqs = round(len(train) * scale)
    n_tokens = round(len(train.tokens) * scale)
    counted = corpus.counts
    counted_targets = int(counted.target_offsets()[-1])
    rows: list[PlanRow] = [
        PlanRow(
            "teacher text counted by the prior",
            counted_targets,
            "tokens",
            "response tokens of the whole training split"
            + (
                f", up to data.count_max_seq_len={ctx.corpus_spec.count_max_seq_len}"
                if counted is not full
                else ""
            ),
        ),
        PlanRow("training records", n_seqs, "", "after data.train_limit" + scaled),
        PlanRow("training tokens (T)", n_tokens, "", "prompt + response tokens" + scaled),
        PlanRow("target positions (N)", n_rows, "", "response tokens: one store row each" + scaled),
        PlanRow("held-out records", len(heldout), "", ""),
        PlanRow(
            "vocabulary (V)", vocab, "", "plan.vocab_size" if vocab_size else "the student tokenizer's ids"
        ),
    ]
    store_rows, sizes = size_rows(ctx, stores, n_rows, n_seqs, vocab)
    rows += store_rows
    flops: dict[str, float] = {}
    if "posterior" in stores or "proxy_agreement" in stores:
        proxy = float(proxy_parameters) if proxy_parameters else parameter_count(ctx.proxy_path)
        full_records = float(len(full) if records is None else int(records))
        limit = ctx.alignment.max_records
        aligned_records = full_records if limit is None else min(limit, full_records)
        if records is None:  # exact: alignment reads the first records
            aligned_tokens = float(full.offsets[int(aligned_records)])
        else:  # what-if: the corpus's mean record length
            aligned_tokens = aligned_records * len(full.tokens) / len(full)
        flops["align"] = 6.0 * proxy * aligned_tokens * ctx.alignment.max_epochs
        source = "plan.proxy_parameters" if proxy_parameters else "safetensors headers or config.json"
        rows.append(PlanRow("proxy parameters (P)", proxy, "", source))
        rows.append(PlanRow("proxy alignment", flops["align"], "FLOP", "6·P·T_aligned·epochs"))
        step = ctx.alignment.preference
        if step is not None:  # Proxy-KD: sample the SFT proxy, then DPO against it (upper bounds)
            if records is None:
                prompt_tokens = float(full.prompt_lens[: int(aligned_records)].sum())
            else:
                prompt_tokens = aligned_records * float(full.prompt_lens.mean())
            sampled = step.samples * (prompt_tokens + aligned_records * step.max_new_tokens)
            flops["preference_sampling"] = 2.0 * proxy * sampled
            rows.append(
                PlanRow(
                    "preference sampling (at most)", flops["preference_sampling"], "FLOP",
                    f"2·P·s·(T_prompts + n·L), s = {step.samples} samples, L = {step.max_new_tokens} new tokens",
                )
            )  # fmt: skip
            pair_tokens = step.samples * (
                aligned_tokens + prompt_tokens + aligned_records * step.max_new_tokens
            )
            flops["preference_dpo"] = 8.0 * proxy * pair_tokens * step.max_epochs
            rows.append(
                PlanRow(
                    "preference DPO (at most)", flops["preference_dpo"], "FLOP",
                    "8·P·T_pairs·epochs (policy forward + backward, reference forward; T_pairs = s·(T_aligned "
                    "+ T_prompts + n·L))",
                )
            )  # fmt: skip
        if "posterior" in stores:
            flops["posterior"] = 2.0 * proxy * n_tokens
            rows.append(
                PlanRow("posterior proxy pass", flops["posterior"], "FLOP", "2·P·T (R draws share it)")
            )
        if "proxy_agreement" in stores:
            flops["proxy_agreement"] = 2.0 * proxy * n_tokens
            rows.append(PlanRow("proxy-agreement pass", flops["proxy_agreement"], "FLOP", "2·P·T"))
    if "offline_teacher" in stores and (ctx.teacher_path or teacher_parameters):
        teacher = float(teacher_parameters) if teacher_parameters else parameter_count(ctx.teacher_path)
        flops["offline_teacher"] = 2.0 * teacher * n_tokens
        rows.append(PlanRow("teacher-logits pass", flops["offline_teacher"], "FLOP", "2·P_teacher·T"))
    per_sequence = np.diff(train.target_offsets())
    peak_positions = int(np.sort(per_sequence)[::-1][:batch_size].sum())
    mean_positions = float(per_sequence.mean() * batch_size)
    if loss_chunk_size:
        peak = 3.0 * min(loss_chunk_size, peak_positions) * vocab * 4
        memory_formula = f"3·c·V·4, c = loss_chunk_size = {loss_chunk_size}"
    else:
        peak = 3.0 * peak_positions * vocab * 4
        memory_formula = f"3·n·V·4, n = {peak_positions} (the {batch_size} longest responses)"
    rows.append(PlanRow("KD loss memory per step (peak)", peak, "B", memory_formula))
    rows.append(PlanRow("target positions per batch (mean)", mean_positions, "", f"batch size {batch_size}"))
    table = "\n".join(["| item | estimate | formula |", "|---|---:|---|", *(r.cells() for r in rows)])
    print(f"\nPlan{' of ' + title if title else ''} ({n_seqs} training records):\n{table}\n", flush=True)
    return {
        "table": table,
        "rows": [r.__dict__ for r in rows],
        "corpus": {
            "records": n_seqs,
            "tokens": n_tokens,
            "target_positions": n_rows,
            "prior_counted_tokens": counted_targets,
        },
        "store_bytes": sizes,
        "flops": flops,
        "loss_peak_bytes": peak,
        "workspace": str(Path(ctx.workspace.root)),
    }


def size_rows(
    ctx: StageContext, stores: list[str], n_rows: int, n_seqs: int, vocab: int
) -> tuple[list[PlanRow], dict[str, float]]:
    """A size row for every store file set the soft-label names ``stores`` read (their registry entries say
    which: a mixture's parts, each once), and the bytes by store."""
    rows: list[PlanRow] = []
    sizes: dict[str, float] = {}
    id_bytes = id_dtype_for(vocab).itemsize
    for name, files in store_files(ctx, stores):
        for part in files:
            if part.name in sizes:
                continue
            fmt = part.fixed_format or ctx.store_format
            sizes[part.name] = store_bytes(
                n_rows, n_seqs, part.top_k, vocab, fmt, counts=part.draws, channels=part.channels
            )
            k = f"K ≤ {part.top_k}" if part.at_most else f"K={part.top_k}"
            as_set = "" if part.fixed_format is not None or fmt.is_legacy else ", store_format"
            formula = store_formula(fmt, id_bytes, part.channels)
            formula += ", at most" if part.at_most else ""
            formula += f" ({part.note})" if part.note else ""
            rows.append(PlanRow(f"{part.name} store ({k}{as_set})", sizes[part.name], "B", formula))
        if soft_label_entry(name).mixed:
            rows.append(PlanRow(f"{name} (mixed on reading)", 0, "B", "no store of its own"))
    return rows, sizes


def store_formula(fmt: StoreFormat, id_bytes: int, channels: int) -> str:
    """The bytes formula of a store in ``fmt`` (N rows, K entries, S sequences)."""
    value_bytes = 2 if fmt.probabilities == "fp16" else 1
    formula = f"N·K·({id_bytes}+{value_bytes}) + N·4 + (S+1)·8 + headers"
    if fmt.ragged:
        formula = (
            f"at most N·K·({id_bytes}+1) + N·(1+4) + 2·(S+1)·8 + headers (ragged: K entries a row at most)"
        )
    if channels:
        formula += f" + {channels}·N·4 (context counts, orders)"
    return formula
