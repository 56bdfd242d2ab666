"""LightningDataModule of teacher text with its soft labels aligned per position.

A batch is a :class:`~kd_lightning.data.batch.TextBatch` (B batch, T padded length, K stored entries)::

    input_ids              (B, T) long     padded with the tokenizer's pad id
    attention_mask         (B, T) long
    target_ids             (B, T) long     input_ids[t + 1] at target positions, -100 elsewhere
    soft_labels[<name>]    SoftLabels: ids (B, T, K), probs (B, T, K), tail (B, T) for each connected
                           store (prior, posterior, ...), zeros off target

so logits at position t, the soft labels at t and ``target_ids[t]`` all describe token t+1.

With ``packing=True`` the training batches hold the same records, packed first-fit-decreasing into as
few rows as fit (:func:`pack_rows`), with ``position_ids`` that restart per record (see
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

from kd_lightning.data.batch import IGNORE_INDEX, SoftLabels, TextBatch
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
                    f"soft-label store {name!r} at {store.folder} has {len(store)} sequences / "
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
        if self.teacher is not None:
            at = slice(int(self.target_offsets[i]), int(self.target_offsets[i + 1]))
            positions = np.full(len(seq), -1, dtype=np.int64)
            positions[start : len(seq) - 1] = self.teacher.teacher_positions[at]
            item["teacher_input_ids"] = self.teacher.corpus.sequence(i).astype(np.int64)
            item["teacher_positions"] = positions
        return item


def pack_rows(lengths: list[int], capacity: int) -> list[list[int]]:
    """First-fit decreasing: item indices per row, each row's lengths summing to at most ``capacity``.

    Longer items are placed first (ties in index order), so the layout is a pure function of the lengths.
    """
    if lengths and max(lengths) > capacity:
        raise ValueError(f"a record of {max(lengths)} tokens does not fit a packed row of {capacity}")
    rows: list[list[int]] = []
    room: list[int] = []
    for i in sorted(range(len(lengths)), key=lambda i: -lengths[i]):
        row = next((r for r, free in enumerate(room) if free >= lengths[i]), None)
        if row is None:
            rows.append([])
            room.append(capacity)
            row = len(rows) - 1
        rows[row].append(i)
        room[row] -= lengths[i]
    return rows


def collate(
    items: list[dict[str, np.ndarray]],
    pad_id: int,
    store_names: tuple[str, ...] = (),
    packing: bool = False,
    pack_length: int | None = None,
) -> TextBatch:
    """Right-pad (or pack) dataset items into a :class:`TextBatch` (see the module docstring for shapes).

    With ``packing``, rows hold up to ``max(pack_length, longest item)`` tokens each.
    """
    lengths = [len(item["input_ids"]) for item in items]
    if not packing:  # one record per row, no position ids
        return _collate_rows(items, lengths, [[i] for i in range(len(items))], pad_id, store_names, False)
    layout = pack_rows(lengths, max(pack_length or 0, max(lengths)))
    return _collate_rows(items, lengths, layout, pad_id, store_names, True)


def _collate_rows(
    items: list[dict[str, np.ndarray]],
    lengths: list[int],
    layout: list[list[int]],
    pad_id: int,
    store_names: tuple[str, ...],
    packed: bool,
) -> TextBatch:
    """Place the items of each ``layout`` row one after another; packed rows get restarting position ids."""
    b, t = len(layout), max(sum(lengths[i] for i in row) for row in layout)
    input_ids = torch.full((b, t), pad_id, dtype=torch.long)
    attention = torch.zeros((b, t), dtype=torch.long)
    targets = torch.full((b, t), IGNORE_INDEX, dtype=torch.long)
    positions = torch.zeros((b, t), dtype=torch.long)
    stores = {}
    for name in store_names:
        k = items[0][f"{name}_ids"].shape[1]
        stores[name] = SoftLabels(
            torch.zeros((b, t, k), dtype=torch.long),
            torch.zeros((b, t, k), dtype=torch.float32),
            torch.zeros((b, t), dtype=torch.float32),
        )
    for row, members in enumerate(layout):
        at = 0
        for i in members:
            item, length = items[i], lengths[i]
            span = slice(at, at + length)
            input_ids[row, span] = torch.from_numpy(item["input_ids"])
            attention[row, span] = 1
            targets[row, span] = torch.from_numpy(item["target_ids"])
            positions[row, span] = torch.arange(length)
            start = at + item["target_start"]
            for name, rows in stores.items():
                n = len(item[f"{name}_ids"])
                rows.ids[row, start : start + n] = torch.from_numpy(item[f"{name}_ids"])
                rows.probs[row, start : start + n] = torch.from_numpy(item[f"{name}_probs"])
                rows.tail[row, start : start + n] = torch.from_numpy(item[f"{name}_tail"])
            at += length
        positions[row, at:] = torch.arange(t - at)  # the padding is a block of its own
    teacher = {}
    if "teacher_input_ids" in items[0]:
        names = ("teacher_input_ids", "teacher_attention_mask", "teacher_positions")
        teacher = dict(zip(names, _teacher_tensors(items, layout, t), strict=True))
    return TextBatch(
        input_ids=input_ids,
        attention_mask=attention,
        target_ids=targets,
        soft_labels=stores,
        position_ids=positions if packed else None,
        record_order=tuple(i for row in layout for i in row) if packed else None,
        **teacher,
    )


def _teacher_tensors(
    items: list[dict[str, np.ndarray]], layout: list[list[int]], width: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The teacher's rows (B, T'), their mask and the student→teacher position map (B, T) of padded rows.

    The teacher's padding is id 0 (masked out): the student's pad id need not exist in its vocabulary.
    """
    if any(len(row) != 1 for row in layout):
        raise ValueError("a teacher of another tokenizer needs padded batches; set datamodule.packing=false")
    rows = [items[row[0]] for row in layout]
    t_width = max(len(item["teacher_input_ids"]) for item in rows)
    ids = torch.zeros((len(rows), t_width), dtype=torch.long)
    mask = torch.zeros((len(rows), t_width), dtype=torch.long)
    positions = torch.full((len(rows), width), -1, dtype=torch.long)
    for r, item in enumerate(rows):
        n = len(item["teacher_input_ids"])
        ids[r, :n] = torch.from_numpy(item["teacher_input_ids"])
        mask[r, :n] = 1
        positions[r, : len(item["teacher_positions"])] = torch.from_numpy(item["teacher_positions"])
    return ids, mask, positions


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
