"""LightningDataModule of teacher text with its soft labels aligned per position.

A batch is a :class:`~kd_lightning.data.batch.TextBatch` (B batch, T padded length, K stored entries)::

    input_ids              (B, T) long     padded with the tokenizer's pad id
    attention_mask         (B, T) long
    target_ids             (B, T) long     input_ids[t + 1] at target positions, -100 elsewhere
    soft_labels[<name>]    SoftLabels: ids (B, T, K), probs (B, T, K), tail (B, T) for each connected
                           store (prior, posterior, ...), zeros off target

so logits at position t, the soft labels at t and ``target_ids[t]`` all describe token t+1.

With ``packing=True`` the training batches hold the same records, packed first-fit-decreasing into as
few rows as fit (:func:`~kd_lightning.data.collate.pack_rows`), with ``position_ids`` that restart per record (see
:class:`~kd_lightning.data.batch.TextBatch`). Each step sees the same records and target positions, so
losses equal the padded ones to float tolerance, with less compute spent on padding.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from functools import partial

import numpy as np
import torch
from lightning import LightningDataModule
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from kd_lightning.data.batch import IGNORE_INDEX
from kd_lightning.data.collate import collate
from kd_lightning.data.cross_tokenizer import TeacherView
from kd_lightning.data.soft_labels import SoftLabelStore
from kd_lightning.data.tokenized import TokenizedCorpus


class SoftLabelDataset(Dataset):
    """Sequences of a tokenised corpus with the rows of each connected soft-label store."""

    def __init__(
        self,
        corpus: TokenizedCorpus,
        stores: Mapping[str, SoftLabelStore] | None = None,
        teacher: TeacherView | None = None,
    ) -> None:
        self.corpus = corpus
        self.stores = dict(stores or {})
        self.teacher = teacher
        expected = corpus.target_offsets()
        self.target_offsets = expected
        if teacher is not None and (
            len(teacher.corpus) != len(corpus) or len(teacher.teacher_positions) != int(expected[-1])
        ):
            raise ValueError("the teacher's view was built for another corpus: rebuild it")
        for name, store in self.stores.items():
            if len(store) != len(corpus) or not np.array_equal(store.offsets, expected):
                raise ValueError(
                    f"soft-label store {name!r} ({store.key}) has {len(store)} sequences / "
                    f"{int(store.offsets[-1])} rows but the corpus has {len(corpus)} / {int(expected[-1])}; "
                    "it was built for another corpus: rebuild it"
                )

    def __len__(self) -> int:
        return len(self.corpus)

    def __getitem__(self, i: int) -> dict[str, np.ndarray]:
        seq = self.corpus.sequence(i)
        start = int(self.corpus.prompt_lens[i]) - 1
        targets = np.full(len(seq), IGNORE_INDEX, dtype=np.int64)
        targets[start : len(seq) - 1] = seq[start + 1 :]
        item = {"input_ids": seq.astype(np.int64), "target_ids": targets, "target_start": start}
        for name, store in self.stores.items():
            rows = store.rows(i)
            item[f"{name}_ids"] = rows.ids.astype(np.int64)
            item[f"{name}_probs"] = rows.probs.astype(np.float32)
            item[f"{name}_tail"] = rows.tail.astype(np.float32)
            for channel in store.channels:
                item[f"{name}_{channel}"] = store.channel(channel, i).astype(np.float32)
        if self.teacher is not None:
            at = slice(int(self.target_offsets[i]), int(self.target_offsets[i + 1]))
            positions = np.full(len(seq), -1, dtype=np.int64)
            positions[start : len(seq) - 1] = self.teacher.teacher_positions[at]
            item["teacher_input_ids"] = self.teacher.corpus.sequence(i).astype(np.int64)
            item["teacher_positions"] = positions
        return item


class EpochOrder(Sampler[int]):
    """A permutation of ``range(size)`` seeded by (seed, epoch).

    Lightning calls ``set_epoch`` at every epoch start on ``dataloader.sampler`` and
    ``dataloader.batch_sampler.sampler``, never on a batch sampler itself; so the epoch lives here, the
    inner sampler of :class:`EpochBatchSampler`, where Lightning finds it.
    """

    def __init__(self, size: int, seed: int) -> None:
        self.size, self.seed, self.epoch = size, seed, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return self.size

    def __iter__(self):
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        return iter(torch.randperm(self.size, generator=generator).tolist())


class EpochBatchSampler(Sampler[list[int]]):
    """Shuffled batches in a new order every epoch, that can skip the batches a resumed run already did.

    Under data parallelism every rank draws the same order and takes its own slice of each global batch
    (``batch_size`` per rank), so W ranks together see exactly the batches one process would see with
    ``W · batch_size``. A final global batch too small to give every rank a sequence is dropped (every rank
    must run the same number of steps).
    """

    def __init__(self, size: int, batch_size: int, seed: int, num_replicas: int = 1, rank: int = 0) -> None:
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.sampler = EpochOrder(size, seed)
        self.size, self.batch_size, self.seed = size, batch_size, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.resume_at: tuple[int, int] | None = None
        """(epoch, batches of it already trained), set on a resumed run: skipped once, and only when that
        epoch is the one iterated. A checkpoint saved at an epoch's last batch resumes into the *next*
        epoch, all of whose batches must run."""

    @property
    def epoch(self) -> int:
        return self.sampler.epoch

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.num_replicas

    def __len__(self) -> int:
        full, rest = divmod(self.size, self.global_batch_size)
        return full + (1 if rest >= self.num_replicas else 0)

    def __iter__(self):
        order = list(self.sampler)
        skip = 0
        if self.resume_at is not None:
            (epoch, done), self.resume_at = self.resume_at, None
            skip = done if epoch == self.epoch else 0
        size = self.global_batch_size
        for index in range(skip, len(self)):
            items = order[index * size : (index + 1) * size]
            base, extra = divmod(len(items), self.num_replicas)  # a short last batch is split evenly
            start = self.rank * base + min(self.rank, extra)
            yield items[start : start + base + (1 if self.rank < extra else 0)]


class ResumableDataLoader(DataLoader):
    """A DataLoader Lightning treats as resumable (``state_dict``/``load_state_dict``).

    The batch order is a function of (seed, epoch), so the only state is how many batches of the current
    epoch are done; the DataModule derives that from the restored trainer step when it builds the loader.
    """

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.batch_sampler.epoch}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.batch_sampler.set_epoch(state.get("epoch", self.batch_sampler.epoch))


@dataclass
class TeacherTextDataModule(LightningDataModule):
    """Teacher text (train / held-out) with precomputed soft labels, for distillation and SFT."""

    batch_size: int = 8
    """Sequences per training batch."""
    eval_batch_size: int = 16
    """Sequences per validation batch."""
    num_workers: int = 0
    """DataLoader workers (0 is fastest for these small in-memory corpora on CPU)."""
    shuffle_seed: int = 0
    """Seed of the training order."""
    packing: bool = False
    """Pack each training batch's records into as few rows as fit (same records, less padding)."""
    pack_length: int | None = None
    """Tokens per packed row (default: the batch's longest record); larger packs more records per row."""
    pad_id: int = field(default=0, init=False)
    """Set by :meth:`connect` from the tokenizer."""

    def __post_init__(self) -> None:
        super().__init__()
        for name in ("batch_size", "eval_batch_size"):
            if int(getattr(self, name)) < 1:
                raise ValueError(f"datamodule.{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"datamodule.num_workers must be >= 0, got {self.num_workers}")
        if self.pack_length is not None and int(self.pack_length) < 1:
            raise ValueError(f"datamodule.pack_length must be >= 1 or null, got {self.pack_length}")
        self.train_set: SoftLabelDataset | None = None
        self.val_set: SoftLabelDataset | None = None

    def connect(
        self,
        pad_id: int,
        train: TokenizedCorpus,
        val: TokenizedCorpus | None = None,
        stores: Mapping[str, SoftLabelStore] | None = None,
        teacher: TeacherView | None = None,
    ) -> TeacherTextDataModule:
        """Attach what is known only at run time: the pad id, the corpora, the train soft-label stores and,
        for a teacher of another tokenizer, its view of the training corpus."""
        if teacher is not None and self.packing:
            raise ValueError(
                "datamodule.packing=true cannot pack the teacher's own tokenization alongside the student's; "
                "set datamodule.packing=false with a teacher of another tokenizer"
            )
        self.pad_id = pad_id
        self.store_names = tuple(sorted(stores or {}))
        self.train_set = SoftLabelDataset(train, stores, teacher)
        self.val_set = SoftLabelDataset(val) if val is not None else None
        return self

    def train_dataloader(self) -> DataLoader:
        if self.train_set is None:
            raise RuntimeError("call TeacherTextDataModule.connect(...) before training")
        world, rank = self._replicas()
        sampler = EpochBatchSampler(len(self.train_set), self.batch_size, self.shuffle_seed, world, rank)
        done = self._batches_done_in_epoch(len(sampler))
        sampler.resume_at = (self.trainer.current_epoch, done) if done else None
        return ResumableDataLoader(
            self.train_set,
            batch_sampler=sampler,
            num_workers=self.num_workers,
            collate_fn=partial(
                collate,
                pad_id=self.pad_id,
                store_names=self.store_names,
                packing=self.packing,
                pack_length=self.pack_length,
            ),
        )

    def _replicas(self) -> tuple[int, int]:
        """(world size, rank) of the attached trainer; this DataModule shards batches itself."""
        trainer = self.trainer
        world = int(getattr(trainer, "world_size", 1) or 1) if trainer is not None else 1
        if world == 1:
            return 1, 0
        connector = getattr(trainer, "_accelerator_connector", None)
        if getattr(connector, "use_distributed_sampler", False):
            raise ValueError(
                "TeacherTextDataModule shards batches across ranks itself; set trainer.use_distributed_sampler=false "
                "(conf/trainer/ddp.yaml does)"
            )
        return world, int(trainer.global_rank)

    def _batches_done_in_epoch(self, batches_per_epoch: int) -> int:
        """After a resume, the batches of the current epoch already trained (0 on a fresh run)."""
        trainer = self.trainer
        if trainer is None or trainer.global_step == 0:
            return 0
        module = trainer.lightning_module
        if module is not None and not module.automatic_optimization:
            # a module that steps its own optimizers (MiniLLM's PPO updates, GAD's two models) takes several
            # optimizer steps per batch: count the batches Lightning processed (a checkpoint saved at a batch's
            # end counts that batch as processed, not yet as completed)
            batches = int(trainer.fit_loop.epoch_loop.batch_progress.total.processed)
            return max(0, min(batches_per_epoch, batches - trainer.current_epoch * batches_per_epoch))
        accumulate = trainer.accumulate_grad_batches
        steps_per_epoch = -(-batches_per_epoch // accumulate)
        steps_done = trainer.global_step - trainer.current_epoch * steps_per_epoch
        return max(0, min(batches_per_epoch, steps_done * accumulate))

    def val_dataloader(self) -> DataLoader | list:
        if self.val_set is None:
            return []
        world, rank = self._replicas()
        if len(self.val_set) < world:
            raise ValueError(
                f"the held-out text has {len(self.val_set)} records, fewer than the {world} training processes "
                "(each validates its share); hold out more records (data.heldout_size) or set "
                "trainer.limit_val_batches=0"
            )
        val_set = self.val_set if world == 1 else Subset(self.val_set, range(rank, len(self.val_set), world))
        return DataLoader(
            val_set,
            batch_size=self.eval_batch_size,
            shuffle=False,
            num_workers=self.num_workers,
            collate_fn=partial(collate, pad_id=self.pad_id),
        )
