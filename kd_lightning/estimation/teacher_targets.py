"""Offline white-box teacher: its logits at every target position, stored sparse (``kdl teacher-logits``).

Running a large teacher inside every training step costs a forward per step per epoch; storing its
distributions once costs one pass. Dense (N, V) logits are far too big to store (V = 49,152 fp16 is 96 KB
per token), so they are kept as either

* **top-k**: the k most likely ids and the remaining mass as a tail bucket (deterministic; biased, since
  the tail is one lump), or
* **sampled**: k draws from the teacher with repeats merged, empty tail ("Sparse Logit Sampling",
  arXiv 2503.16870; unbiased for the forward-KL gradient in expectation over draws).

Both land in the soft-label store format, so a student trains on them with any divergence:
``kdl distill kd_target=offline_teacher loss=[hard_ce,forward_kl]``.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from kd_lightning.data.soft_labels import SoftLabelStore, SparseRows, id_dtype_for
from kd_lightning.data.tokenized import TokenizedCorpus
from kd_lightning.estimation.sharded import estimate_by_shard, packing_settings
from kd_lightning.losses.sparsify import sampled_rows, topk_rows

KINDS = ("topk", "sampled")


class TeacherTargetBuilder:
    """Build the offline-teacher store: sparse targets from a frozen teacher's logits, resumable by shard.

    Args:
        kind: ``topk`` or ``sampled``.
        k: ids kept (top-k) or draws per position (sampled).
        batch_size: sequences per teacher forward.
        shard_size: sequences per resumable shard.
        seed: sampling seed (shard ``j`` draws with ``seed + j``, so a resumed run draws the same).
        packing, pack_length: pack each batch's sequences into rows (``datamodule.packing``).
    """

    def __init__(
        self,
        kind: str = "topk",
        k: int = 64,
        batch_size: int = 8,
        shard_size: int = 64,
        seed: int = 0,
        packing: bool = False,
        pack_length: int | None = None,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"teacher_targets.kind must be one of {KINDS}, got {kind!r}")
        for name, value in (("k", k), ("batch_size", batch_size), ("shard_size", shard_size)):
            if value < 1:
                raise ValueError(f"estimator.teacher_targets.{name} must be >= 1, got {value}")
        self.kind, self.k, self.batch_size, self.shard_size, self.seed = kind, k, batch_size, shard_size, seed
        self.packing, self.pack_length = packing, pack_length

    def settings(self) -> dict:
        """Everything that decides the stored rows: batching (padding, hence float rounding and ties) and
        sharding (which draws a sequence gets) included."""
        return {
            "kind": self.kind,
            "k": self.k,
            "batch_size": self.batch_size,
            "shard_size": self.shard_size,
            **({"seed": self.seed} if self.kind == "sampled" else {}),
            **packing_settings(self.packing, self.pack_length),
        }

    def rows(self, logits: torch.Tensor, generator: torch.Generator) -> SparseRows:
        vocab = logits.shape[-1]
        if self.kind == "topk":
            ids, probs, tail = topk_rows(logits, min(self.k, vocab))
        else:
            ids, probs, tail = sampled_rows(logits.cpu(), self.k, generator=generator)
        return SparseRows(
            ids.cpu().numpy().astype(id_dtype_for(vocab)),
            probs.cpu().numpy().astype(np.float16),
            tail.cpu().numpy().astype(np.float32),
        )

    def estimate(
        self, teacher: nn.Module, corpus: TokenizedCorpus, pad_id: int, out: str, provenance: dict
    ) -> SoftLabelStore:
        """Run the teacher over ``corpus`` and write its sparse targets at ``out`` (resumes a killed run)."""
        return estimate_by_shard(
            teacher,
            corpus,
            pad_id,
            out,
            provenance,
            self.shard_size,
            self.batch_size,
            self.seed,
            f"teacher {self.kind}-{self.k}",
            lambda logits, seqs, generator: self.rows(logits, generator),
            self.packing,
            self.pack_length,
        )
