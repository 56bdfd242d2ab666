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

A teacher of another tokenizer (``own_tokenizer``) reads the records through its own tokenizer; its rows
keep *its* ids and sit at the student's aligned target positions. A position with no aligned teacher
position holds no entry and its whole mass in the tail; only cross-vocabulary terms (``uld``,
``gold_hybrid`` with ``kd_target=offline_teacher``) read such a store, and they skip those rows.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
from torch import nn

from kd_lightning.data.cross_tokenizer import TeacherView
from kd_lightning.data.soft_labels import SoftLabelStore, SparseRows, id_dtype_for
from kd_lightning.data.store_format import StoreWrite
from kd_lightning.data.tokenized import TokenizedCorpus
from kd_lightning.estimation.sharded import estimate_by_shard, packing_settings
from kd_lightning.losses.sparsify import sampled_rows, topk_rows
from kd_lightning.teachers.served import ServedTeacher, rows_of_sequence
from kd_lightning.teachers.wire import text_of

log = logging.getLogger(__name__)

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
        own_tokenizer: bool = False,
    ) -> None:
        if kind not in KINDS:
            raise ValueError(f"teacher_targets.kind must be one of {KINDS}, got {kind!r}")
        for name, value in (("k", k), ("batch_size", batch_size), ("shard_size", shard_size)):
            if value < 1:
                raise ValueError(f"estimator.teacher_targets.{name} must be >= 1, got {value}")
        self.kind, self.k, self.batch_size, self.shard_size, self.seed = kind, k, batch_size, shard_size, seed
        self.packing, self.pack_length = packing, pack_length
        self.own_tokenizer = bool(own_tokenizer)

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
            **({"own_tokenizer": True} if self.own_tokenizer else {}),
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
        self,
        teacher: nn.Module,
        corpus: TokenizedCorpus,
        pad_id: int,
        out: str,
        provenance: dict,
        view: TeacherView | None = None,
        write: StoreWrite | None = None,
    ) -> SoftLabelStore:
        """Run the teacher over ``corpus`` and write its sparse targets at ``out`` (resumes a killed run).

        With ``view`` (a teacher of another tokenizer) it reads its own tokenization and each student
        target row gets the aligned teacher row, or no entry and a tail of 1. ``write``: the store's format
        (format 1 when absent).
        """
        if view is not None:
            return self._estimate_aligned(teacher, corpus, out, provenance, view, write)
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
            write=write,
        )

    def _estimate_aligned(
        self,
        teacher: nn.Module,
        corpus: TokenizedCorpus,
        out: str,
        provenance: dict,
        view: TeacherView,
        write: StoreWrite | None = None,
    ) -> SoftLabelStore:
        s_offsets = corpus.target_offsets()

        def rows_for(logits: torch.Tensor, seqs: list[int], generator: torch.Generator) -> SparseRows:
            rows = self.rows(logits, generator)
            at, _ = view.aligned_rows(s_offsets, seqs)
            aligned = at >= 0
            ids = np.zeros((len(at), rows.ids.shape[1]), dtype=rows.ids.dtype)
            probs = np.zeros((len(at), rows.ids.shape[1]), dtype=rows.probs.dtype)
            tail = np.ones(len(at), dtype=rows.tail.dtype)  # unaligned: no entry, all mass in the tail
            ids[aligned], probs[aligned], tail[aligned] = (
                rows.ids[at[aligned]],
                rows.probs[at[aligned]],
                rows.tail[at[aligned]],
            )
            return SparseRows(ids, probs, tail)

        return estimate_by_shard(
            teacher,
            corpus,
            0,
            out,
            provenance,
            self.shard_size,
            self.batch_size,
            self.seed,
            f"teacher {self.kind}-{self.k} (own tokenizer)",
            rows_for,
            self.packing,
            self.pack_length,
            model_corpus=view.corpus,
            write=write,
        )


def served_teacher_store(
    served: ServedTeacher,
    corpus: TokenizedCorpus,
    tokenizer: Any,
    targets: TeacherTargetBuilder,
    out: str,
    provenance: dict,
    write: StoreWrite | None = None,
) -> SoftLabelStore:
    """The top-k store of a teacher behind a server (``teacher=served``): the same rows as an in-process
    teacher's, read from its prompt log-probs, shard by shard (a killed run resumes)."""
    if targets.kind != "topk" or targets.own_tokenizer:
        raise ValueError(
            "a served teacher gives top-k log-probs in the student's vocabulary: use "
            "estimator/teacher_targets=topk (sampled rows need the whole distribution)"
        )
    texts = text_of(tokenizer)
    to_id = served.wire.id_map(tokenizer)
    served.check_tokenizer(corpus.sequence(0).tolist(), texts, tokenizer)
    vocab = int(max(len(tokenizer), tokenizer.vocab_size))

    group = max(targets.batch_size, served.concurrency)  # requests in flight; each sequence is scored alone

    def batches(sequences: range):
        for start in range(0, len(sequences), group):
            seqs = list(sequences[start : start + group])
            token_lists = [corpus.sequence(i).tolist() for i in seqs]
            scored = served.score(token_lists, [texts(ids) for ids in token_lists], targets.k)
            parts = [
                rows_of_sequence(s, int(corpus.prompt_lens[i]), targets.k, to_id)
                for i, s in zip(seqs, scored)
            ]
            rows = SparseRows(
                np.concatenate([p[0] for p in parts]).astype(id_dtype_for(vocab)),
                np.concatenate([p[1] for p in parts]).astype(np.float16),
                np.concatenate([p[2] for p in parts]).astype(np.float32),
            )
            yield rows, seqs

    store = estimate_by_shard(
        None, corpus, 0, out, provenance, targets.shard_size, targets.batch_size, targets.seed,
        f"served teacher top-{targets.k}", lambda rows, seqs, generator: rows, batches=batches, write=write,
    )  # fmt: skip
    log.info("served teacher: %s", served.report())
    return store
