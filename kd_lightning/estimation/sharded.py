"""Running a model over a corpus shard by shard to build a soft-label store (posterior, offline teacher).

Both estimators follow one loop: batches of teacher sequences (by length, less padding), the model's
logits at their target positions, rows for those sequences, and a shard written atomically once all its
sequences are done. A killed run keeps its finished shards, and shard ``j`` draws with ``seed + j``, so a
resumed run produces the same store. Under ``torchrun`` (:mod:`kd_lightning.distributed`) rank ``r`` of
``W`` builds shards ``r, r + W, ...`` and rank 0 assembles the store: the same bytes as one process.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from kd_lightning.data.batch import IGNORE_INDEX
from kd_lightning.data.datamodule import SoftLabelDataset, collate
from kd_lightning.data.soft_labels import SoftLabelStore, SparseRows
from kd_lightning.data.store_format import StoreWrite
from kd_lightning.data.store_shards import ShardedStoreWriter
from kd_lightning.data.tokenized import TokenizedCorpus
from kd_lightning.distributed import process_group
from kd_lightning.models.forward import target_position_logits

log = logging.getLogger(__name__)


def packing_settings(packing: bool, pack_length: int | None) -> dict:
    """An estimator's packing, for its settings (empty when not packed, so padded stores keep their keys)."""
    return {"packing": True, "pack_length": pack_length} if packing else {}


@torch.inference_mode()
def target_position_batches(
    model: nn.Module,
    corpus: TokenizedCorpus,
    sequences: range,
    pad_id: int,
    batch_size: int,
    packing: bool = False,
    pack_length: int | None = None,
) -> Iterator[tuple[torch.Tensor, list[int]]]:
    """Yield a model's logits (rows, V) at the target positions of batches of ``sequences``.

    Sequences are batched by length (less padding); each yield names its sequences, and rows come in that
    order (sequence, then position), which is the soft-label store's row order within those sequences.
    With ``packing`` the same batches are packed (see :func:`~kd_lightning.data.datamodule.collate`) and
    the rows are put back in that order, so what follows (draws included) sees the same rows.
    """
    dataset = SoftLabelDataset(corpus)
    device = next(model.parameters()).device
    by_length = sorted(sequences, key=lambda i: corpus.offsets[i + 1] - corpus.offsets[i])
    for start in range(0, len(by_length), batch_size):
        batch_seqs = by_length[start : start + batch_size]
        items = [dataset[i] for i in batch_seqs]
        batch = collate(items, pad_id, packing=packing, pack_length=pack_length).to(device)
        logits = target_position_logits(
            model, batch.input_ids, batch.attention_mask, batch.target_mask, batch.position_ids
        )
        if batch.record_order is not None:
            logits = logits[_unpacked_row_order(items, batch.record_order, logits.device)]
        yield logits, batch_seqs


def _unpacked_row_order(
    items: list[dict], record_order: tuple[int, ...], device: torch.device
) -> torch.Tensor:
    """Index that puts target rows laid out in ``record_order`` back in item order."""
    counts = [int((item["target_ids"] != IGNORE_INDEX).sum()) for item in items]
    first_row = {}
    at = 0
    for i in record_order:
        first_row[i] = at
        at += counts[i]
    return torch.cat([torch.arange(first_row[i], first_row[i] + counts[i]) for i in range(len(items))]).to(
        device
    )


def estimate_by_shard(
    model: nn.Module | None,
    corpus: TokenizedCorpus,
    pad_id: int,
    out: str,
    provenance: dict,
    shard_size: int,
    batch_size: int,
    seed: int,
    desc: str,
    rows_for: Callable[[torch.Tensor, list[int], torch.Generator], SparseRows],
    packing: bool = False,
    pack_length: int | None = None,
    model_corpus: TokenizedCorpus | None = None,
    batches: Callable[[range], Iterator[tuple[Any, list[int]]]] | None = None,
    write: StoreWrite | None = None,
) -> SoftLabelStore:
    """Write the store at ``out`` from ``rows_for(logits, sequences, generator)``, resuming finished shards.

    ``rows_for`` gets the model's logits (rows, V) at the target positions of ``sequences`` and returns
    their rows in the same order. Every rank of a ``torchrun`` group calls this together. A model of
    another tokenizer reads ``model_corpus`` (the same sequences in its own tokenization); ``rows_for``
    then returns rows in ``corpus``'s layout. ``batches(sequences)`` replaces the model's pass (a teacher
    behind a server): it yields ``(what rows_for reads, the sequences it covers)``. ``write``: the store's
    format (:class:`~kd_lightning.data.store_format.StoreWrite`; format 1 when absent).
    """
    if model is not None:
        model.eval()
    group = process_group()
    if group.is_main:  # rank 0 checks (or discards) the finished shards before anyone adds to them
        writer = ShardedStoreWriter(out, corpus.target_offsets(), provenance, shard_size, write=write)
        if writer.done_count():
            log.info(
                "%s: resuming, %d/%d shards already written", desc, writer.done_count(), writer.num_shards
            )
    group.barrier()
    if not group.is_main:
        writer = ShardedStoreWriter(
            out, corpus.target_offsets(), provenance, shard_size, clean=False, write=write
        )
    pending = [shard for shard in writer.pending() if group.owns(shard)]
    if group.active:
        log.info("%s: rank %d of %d builds %d shards", desc, group.rank, group.world_size, len(pending))
        desc = f"{desc} [rank {group.rank}]"
    offsets = writer.offsets

    def rows_in(seqs: range) -> int:
        return int(offsets[seqs.stop] - offsets[seqs.start])

    with tqdm(total=sum(rows_in(writer.shard_sequences(s)) for s in pending), desc=desc, unit="tok") as bar:
        for shard in pending:
            generator = torch.Generator(device="cpu").manual_seed(seed + shard)
            parts: dict[int, SparseRows] = {}
            source = (
                batches(writer.shard_sequences(shard))
                if batches is not None
                else target_position_batches(
                    model,
                    corpus if model_corpus is None else model_corpus,
                    writer.shard_sequences(shard),
                    pad_id,
                    batch_size,
                    packing,
                    pack_length,
                )
            )
            for logits, seqs in source:
                rows = rows_for(logits, seqs, generator)
                bounds = np.cumsum([0, *(int(offsets[i + 1] - offsets[i]) for i in seqs)])
                for i, lo, hi in zip(seqs, bounds[:-1], bounds[1:]):
                    parts[i] = rows.slice(lo, hi)
                bar.update(len(rows.ids))
            writer.write(shard, SparseRows.concat([parts[i] for i in writer.shard_sequences(shard)]))
    group.barrier()  # every shard is written
    store = writer.finish() if group.is_main else None
    group.barrier()  # the store is in place
    return store if store is not None else SoftLabelStore(out, expect=provenance)
