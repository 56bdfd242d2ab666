"""Typed batches: what a DataModule yields (:class:`TextBatch`) and what loss terms read (:class:`PositionBatch`).

Shapes: B batch, T padded length, K stored entries per position, N target positions of a batch, V vocab,
H hidden size. A position t describes token t+1: logits at t, ``target_ids[t]`` and the soft labels at t.

``PositionBatch`` is packed to the target positions only (prompt and padding dropped), with a leading
dimension of 1 so every loss sees (1, N, ...). Only declared fields are packed. Loss terms read its typed
fields. The key form of :data:`SCHEMA` (``target_ids``, ``<store>_ids`` ...) is what tests write
(a private parser reads it); ``batch["prior_ids"]`` in a user's term still reads the typed
field, with a ``FutureWarning`` naming it, until v0.3.0.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace

import torch

IGNORE_INDEX = -100
"""``target_ids`` value of a position that is not a target (prompt, padding)."""


class BatchFormWarning(FutureWarning):
    """The key form of a batch (``batch["prior_ids"]``, a term called with a dict): will be removed in v0.3.0."""


SCHEMA = {
    "target_ids": "(1, N) long: the observed next token",
    "<store>_ids": "(1, N, K) long: a soft-label store's ids (prior, posterior, offline_teacher, ...)",
    "<store>_probs": "(1, N, K) float: their probabilities; or (1, N, V) dense probabilities, without _ids",
    "<store>_tail": "(1, N) float: mass not stored in the K entries",
    "<store>_<channel>": "(1, N) float: a store's per-position number (STORE_CHANNELS), e.g. prior_context_count",
    "<name>_logits": "(1, N, V) float: a dense distribution as logits (teacher_logits: the online teacher)",
    "student_hidden_<layer>": "(1, N, H): the student's hidden states at that layer",
    "teacher_hidden_<layer>": "(1, N, H'): the online teacher's",
    "<prepared>": "(1, N): a per-position field a term computed over the whole batch (LossTerm.prepare)",
}
"""The key form of a :class:`PositionBatch`'s fields (what tests write, and earlier releases' terms read)."""


STORE_CHANNELS = ("context_count", "ngram_order")
"""Per-position numbers a store may carry beside its rows: the prior's count of the context it used and the
order it backed off to (``weighting=prior_reliability`` reads the count)."""


@dataclass
class SoftLabels:
    """Sparse rows of a distribution: ``ids`` (..., K), ``probs`` (..., K), ``tail`` (...) the rest, and the
    store's per-position ``channels`` (name → (...), see :data:`STORE_CHANNELS`)."""

    ids: torch.Tensor
    probs: torch.Tensor
    tail: torch.Tensor
    channels: dict[str, torch.Tensor] = field(default_factory=dict)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> SoftLabels:
        return SoftLabels(
            fn(self.ids), fn(self.probs), fn(self.tail), {name: fn(t) for name, t in self.channels.items()}
        )

    def at(self, mask: torch.Tensor) -> SoftLabels:
        """Rows at a (B, T) mask, packed to (1, N, ...)."""
        return self._map(lambda t: t[mask][None])

    def rows(self, index: slice) -> SoftLabels:
        return self._map(lambda t: t[index])

    def positions(self, index: slice) -> SoftLabels:
        return self._map(lambda t: t[:, index])

    def to(self, device: torch.device | str, non_blocking: bool = False) -> SoftLabels:
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))


TENSOR_FIELDS = (
    "input_ids",
    "attention_mask",
    "target_ids",
    "position_ids",
    "teacher_input_ids",
    "teacher_attention_mask",
    "teacher_positions",
)
"""The (B, T) / (B, T') tensor fields of a :class:`TextBatch` (rows of one sequence each)."""


@dataclass
class TextBatch:
    """Padded teacher text, (B, T): ``input_ids``, ``attention_mask``, ``target_ids`` (``IGNORE_INDEX`` off
    target), and each connected soft-label store's rows (B, T, K) under its name (zeros off target).

    A packed batch (``datamodule.packing``) holds several records per row. ``position_ids`` (B, T) then
    restart at 0 for each record (and for the padding after the last), and the model is run with them and
    no attention mask, so attention stays inside each record (:func:`kd_lightning.models.forward.model_inputs`).
    ``attention_mask`` still marks real tokens. ``record_order`` lists the collated items in the order
    their tokens appear, row by row.

    With a teacher of another tokenizer (:mod:`kd_lightning.data.cross_tokenizer`) the batch also carries
    the teacher's own tokenization: ``teacher_input_ids`` / ``teacher_attention_mask`` (B, T') and
    ``teacher_positions`` (B, T), for each student position the aligned position in the teacher's row, or -1.
    """

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    target_ids: torch.Tensor
    soft_labels: dict[str, SoftLabels] = field(default_factory=dict)
    position_ids: torch.Tensor | None = None
    record_order: tuple[int, ...] | None = None
    teacher_input_ids: torch.Tensor | None = None
    teacher_attention_mask: torch.Tensor | None = None
    teacher_positions: torch.Tensor | None = None

    @property
    def packed(self) -> bool:
        return self.position_ids is not None

    @property
    def num_records(self) -> int:
        """Records in the batch (rows when padded; more than the rows when packed)."""
        return len(self.record_order) if self.record_order is not None else len(self)

    @property
    def target_mask(self) -> torch.Tensor:
        return self.target_ids != IGNORE_INDEX

    def rows(self, index: slice) -> TextBatch:
        """A sub-batch of rows (sequences; of a packed batch, the records packed into those rows)."""
        return replace(
            self,
            **self._tensors(lambda t: t[index]),
            soft_labels={name: rows.rows(index) for name, rows in self.soft_labels.items()},
            record_order=None,
        )

    def to(self, device: torch.device | str, non_blocking: bool = False) -> TextBatch:
        """Lightning calls this to move the batch to the module's device."""
        return replace(
            self,
            **self._tensors(lambda t: t.to(device=device, non_blocking=non_blocking)),
            soft_labels={name: rows.to(device, non_blocking) for name, rows in self.soft_labels.items()},
        )

    def _tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> dict[str, torch.Tensor | None]:
        """Each tensor field, through ``fn`` (the optional ones left None)."""
        return {
            name: None if getattr(self, name) is None else fn(getattr(self, name)) for name in TENSOR_FIELDS
        }

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])


@dataclass
class PositionBatch:
    """What loss terms read, packed to the N target positions of a batch (see the module docstring)."""

    target_ids: torch.Tensor
    soft_labels: dict[str, SoftLabels] = field(default_factory=dict)
    dense_logits: dict[str, torch.Tensor] = field(default_factory=dict)
    """name → (1, N, V) logits of a dense target (``teacher``: the online teacher)."""
    dense_probs: dict[str, torch.Tensor] = field(default_factory=dict)
    """name → (1, N, V) probabilities of a dense target."""
    student_hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    teacher_hidden: dict[int, torch.Tensor] = field(default_factory=dict)
    prepared: dict[str, torch.Tensor] = field(default_factory=dict)

    @classmethod
    def pack(cls, batch: TextBatch, mask: torch.Tensor | None = None) -> PositionBatch:
        """The declared fields of ``batch`` at its target positions (or at ``mask``), (1, N, ...)."""
        mask = batch.target_mask if mask is None else mask
        return cls(
            batch.target_ids[mask][None], {name: rows.at(mask) for name, rows in batch.soft_labels.items()}
        )

    @property
    def teacher_logits(self) -> torch.Tensor | None:
        return self.dense_logits.get("teacher")

    @property
    def num_positions(self) -> int:
        return int(self.target_ids.shape[-1])

    def positions(self, index: slice) -> PositionBatch:
        """A chunk of positions (the chunked loss path)."""
        return PositionBatch(
            self.target_ids[:, index],
            {name: rows.positions(index) for name, rows in self.soft_labels.items()},
            {name: t[:, index] for name, t in self.dense_logits.items()},
            {name: t[:, index] for name, t in self.dense_probs.items()},
            {layer: t[:, index] for layer, t in self.student_hidden.items()},
            {layer: t[:, index] for layer, t in self.teacher_hidden.items()},
            {name: t[:, index] for name, t in self.prepared.items()},
        )

    def with_prepared(self, fields: Mapping[str, torch.Tensor]) -> PositionBatch:
        return replace(self, prepared={**self.prepared, **fields}) if fields else self

    # ------------------------------------------------------------ the key form (SCHEMA)
    def _fields(self) -> dict[str, tuple[torch.Tensor, str]]:
        """Key → (tensor, the typed field that holds it)."""
        found = {"target_ids": (self.target_ids, "batch.target_ids")}
        for name, rows in self.soft_labels.items():
            for part in ("ids", "probs", "tail"):
                found[f"{name}_{part}"] = (getattr(rows, part), f"batch.soft_labels[{name!r}].{part}")
            for channel, tensor in rows.channels.items():
                found[f"{name}_{channel}"] = (tensor, f"batch.soft_labels[{name!r}].channels[{channel!r}]")
        found.update({f"{n}_logits": (t, f"batch.dense_logits[{n!r}]") for n, t in self.dense_logits.items()})
        found.update({f"{n}_probs": (t, f"batch.dense_probs[{n!r}]") for n, t in self.dense_probs.items()})
        for side, hidden in (("student", self.student_hidden), ("teacher", self.teacher_hidden)):
            found.update({f"{side}_hidden_{k}": (t, f"batch.{side}_hidden[{k}]") for k, t in hidden.items()})
        found.update({n: (t, f"batch.prepared[{n!r}]") for n, t in self.prepared.items()})
        return found

    def __getitem__(self, key: str) -> torch.Tensor:
        """Deprecated since 0.2.0, removed in v0.3.0: the key form of earlier releases' user terms; read the typed field."""
        fields = self._fields()
        if key not in fields:
            raise KeyError(f"{key!r}: this batch has no such field (it has {sorted(fields)})")
        tensor, typed = fields[key]
        warnings.warn(
            f'batch["{key}"] is deprecated and will be removed in v0.3.0; read {typed}',
            BatchFormWarning,
            stacklevel=2,
        )
        return tensor

    def __contains__(self, key: object) -> bool:
        """Deprecated with ``__getitem__``: whether the key form names a field of this batch."""
        fields = self._fields()
        warnings.warn(
            f"`{key!r} in batch` is deprecated and will be removed in v0.3.0; test the typed fields instead "
            f"({fields[key][1] if key in fields else 'e.g. name in batch.soft_labels, batch.dense_logits'})",
            BatchFormWarning,
            stacklevel=2,
        )
        return key in fields


def _from_fields(fields: Mapping[str, torch.Tensor]) -> PositionBatch:
    """A batch from the key form (:data:`SCHEMA`), as tests write it; unknown keys become ``prepared``.

    Not public API (0.2.0): earlier releases' terms that were called with a dict reach it until v0.3.0;
    build a :class:`PositionBatch` from its typed fields instead."""
    if isinstance(fields, PositionBatch):
        return fields
    if "target_ids" not in fields:
        raise KeyError("a loss batch needs target_ids (see kd_lightning.data.batch.SCHEMA)")
    rest = {k: v for k, v in fields.items() if k != "target_ids"}
    batch = PositionBatch(fields["target_ids"])
    for key in [k for k in rest if k.endswith("_ids")]:
        name = key[: -len("_ids")]
        if f"{name}_probs" in rest and f"{name}_tail" in rest:
            batch.soft_labels[name] = SoftLabels(
                rest.pop(key),
                rest.pop(f"{name}_probs"),
                rest.pop(f"{name}_tail"),
                {c: rest.pop(f"{name}_{c}") for c in STORE_CHANNELS if f"{name}_{c}" in rest},
            )
    for key in list(rest):
        for prefix, into in (
            ("student_hidden_", batch.student_hidden),
            ("teacher_hidden_", batch.teacher_hidden),
        ):
            if key.startswith(prefix) and key[len(prefix) :].lstrip("-").isdigit():
                into[int(key[len(prefix) :])] = rest.pop(key)
    for suffix, into in (("_logits", batch.dense_logits), ("_probs", batch.dense_probs)):
        for key in [k for k in rest if k.endswith(suffix)]:
            into[key[: -len(suffix)]] = rest.pop(key)
    batch.prepared.update(rest)
    return batch
