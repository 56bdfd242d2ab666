"""``kdl plan``: what a run will cost, before anything heavy runs.

From the tokenised corpus (the only artifact it builds, and a cheap one) and the models' parameter counts
(read from safetensors headers, no weights loaded), it estimates:

* corpus tokens: records, tokens, target positions (each store has one row per target position);
* each store's bytes at its top-k: ``N·K·(id bytes + 2) + N·4 + (S+1)·8`` plus the ``.npy`` headers, for
  N target positions, K stored entries, S sequences (ids uint16 up to 65,535 ids else int32; float16
  probabilities; float32 tail; int64 offsets);
* forward FLOPs of the proxy passes: ``6·P·T·epochs`` to align (forward and backward) and ``2·P·T`` for the
  posterior (one forward per sequence, shared by all R draws), for P parameters and T tokens; the same
  ``2·P·T`` for an open teacher's offline store;
* the KD loss's peak memory per step: ``3·n·V·4`` bytes (fp32 logits, their softmax and the gradient) for
  the n target positions of a batch, or ``3·c·V·4`` with ``loss_chunk_size`` c.

Every figure comes with the formula that produced it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from kd_lightning.data.soft_labels import id_dtype_for
from kd_lightning.models.loading import resolve_model_path
from kd_lightning.stages.context import StageContext

NPY_HEADER_BYTES = 128
"""Header of a version-1 ``.npy`` file with a short dtype/shape description."""
META_BYTES = 1024
"""A store's ``meta.json`` (provenance), about a kilobyte."""


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


def parameter_count(path: str) -> int:
    """Parameters of a model folder, from its safetensors headers (no weights are read)."""
    folder = resolve_model_path(path)
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise ValueError(f"{folder} has no .safetensors files; kdl plan reads parameter counts from them")
    total = 0
    for file in files:
        with file.open("rb") as handle:
            size = int.from_bytes(handle.read(8), "little")
            header = json.loads(handle.read(size))
        for name, entry in header.items():
            if name != "__metadata__":
                total += int(np.prod(entry["shape"], dtype=np.int64))
    return total


def store_bytes(rows: int, sequences: int, top_k: int, vocab_size: int) -> float:
    id_bytes = id_dtype_for(vocab_size).itemsize
    arrays = rows * top_k * (id_bytes + 2) + rows * 4 + (sequences + 1) * 8
    return float(arrays + 4 * NPY_HEADER_BYTES + META_BYTES)


def run_plan(
    ctx: StageContext, batch_size: int, loss_chunk_size: int | None, stores: list[str]
) -> dict[str, Any]:
    """The plan of a run (see the module docstring); ``stores`` are the stores its students read."""
    corpus = ctx.corpus()
    train, full, heldout = corpus.train, corpus.full_train, corpus.heldout
    vocab = corpus.vocab_size
    n_rows = int(train.target_offsets()[-1])
    rows: list[PlanRow] = [
        PlanRow("training records", len(train), "", "after data.train_limit"),
        PlanRow("training tokens (T)", len(train.tokens), "", "prompt + response tokens"),
        PlanRow("target positions (N)", n_rows, "", "response tokens: one store row each"),
        PlanRow("held-out records", len(heldout), "", ""),
        PlanRow("vocabulary (V)", vocab, "", "the student tokenizer's ids"),
    ]
    id_bytes = id_dtype_for(vocab).itemsize
    formula = f"N·K·({id_bytes}+2) + N·4 + (S+1)·8 + headers"
    top_k = {
        "prior": ctx.prior_estimator.top_k,
        "posterior": ctx.posterior_estimator.top_k,
        "offline_teacher": ctx.teacher_targets.k,
    }
    sizes = {}
    for name in stores:
        if name in top_k:
            sizes[name] = store_bytes(n_rows, len(train), top_k[name], vocab)
            rows.append(PlanRow(f"{name} store (K={top_k[name]})", sizes[name], "B", formula))
    flops: dict[str, float] = {}
    if "posterior" in stores:
        proxy = parameter_count(ctx.proxy_path)
        aligned = (
            full.tokens
            if ctx.alignment.max_records is None
            else full.tokens[: full.offsets[min(ctx.alignment.max_records, len(full))]]
        )
        flops["align"] = 6.0 * proxy * len(aligned) * ctx.alignment.max_epochs
        flops["posterior"] = 2.0 * proxy * len(train.tokens)
        rows.append(PlanRow("proxy parameters (P)", proxy, "", "safetensors headers"))
        rows.append(PlanRow("proxy alignment", flops["align"], "FLOP", "6·P·T_aligned·epochs"))
        rows.append(PlanRow("posterior proxy pass", flops["posterior"], "FLOP", "2·P·T (R draws share it)"))
    if "offline_teacher" in stores and ctx.teacher_path:
        teacher = parameter_count(ctx.teacher_path)
        flops["offline_teacher"] = 2.0 * teacher * len(train.tokens)
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
    print(f"\nPlan ({len(train)} training records):\n{table}\n", flush=True)
    return {
        "table": table,
        "rows": [r.__dict__ for r in rows],
        "corpus": {"records": len(train), "tokens": len(train.tokens), "target_positions": n_rows},
        "store_bytes": sizes,
        "flops": flops,
        "loss_peak_bytes": peak,
        "workspace": str(Path(ctx.workspace.root)),
    }
