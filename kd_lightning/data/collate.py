"""Collating dataset items into a :class:`~kd_lightning.data.batch.TextBatch`: right-padded rows, or records
packed first-fit-decreasing into as few rows as fit (position ids restarting per record), with each
connected store's rows and channels placed at the target positions."""

from __future__ import annotations

import numpy as np
import torch

from kd_lightning.data.batch import IGNORE_INDEX, STORE_CHANNELS, SoftLabels, TextBatch


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
        channels = [c for c in STORE_CHANNELS if f"{name}_{c}" in items[0]]
        stores[name] = SoftLabels(
            torch.zeros((b, t, k), dtype=torch.long),
            torch.zeros((b, t, k), dtype=torch.float32),
            torch.zeros((b, t), dtype=torch.float32),
            {c: torch.zeros((b, t), dtype=torch.float32) for c in channels},
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
                for channel, values in rows.channels.items():
                    values[row, start : start + n] = torch.from_numpy(item[f"{name}_{channel}"])
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
