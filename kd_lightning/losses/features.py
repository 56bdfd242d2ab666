"""Feature distillation: the student's hidden states matched to the teacher's, layer by layer.

Layers are numbered as Hugging Face's ``output_hidden_states`` tuple: 0 is the embedding output, ``i`` the
output of block ``i``, and the last (``-1``) the final normed hidden state that feeds the output head.
The module running the models packs the requested layers into the batch at the target positions, as
``student_hidden_<layer>`` and ``teacher_hidden_<layer>`` of shape (1, N, H); a :class:`HiddenStateLoss`
reads them like any other term reads its targets.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.data.batch import IGNORE_INDEX, PositionBatch
from kd_lightning.losses.functional import masked_mean
from kd_lightning.losses.terms import LossTerm


def hidden_cosine_distance(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over ``mask`` of ``1 − cos(h_s, h_t)``; hidden states (..., H), mask (...). DistilBERT's L_cos."""
    cos = F.cosine_similarity(student_hidden.float(), teacher_hidden.float(), dim=-1, eps=1e-8)
    return masked_mean(1.0 - cos, mask)


def hidden_mse(
    student_hidden: torch.Tensor, teacher_hidden: torch.Tensor, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """Mean over ``mask`` of the per-position mean squared error over the H features; (..., H) each."""
    return masked_mean((student_hidden.float() - teacher_hidden.float()).pow(2).mean(-1), mask)


DISTANCES = {"cosine": hidden_cosine_distance, "mse": hidden_mse}


def _layer_count(model: nn.Module, role: str) -> tuple[int, int]:
    config = getattr(model, "config", None)
    if config is None or not hasattr(config, "hidden_size") or not hasattr(config, "num_hidden_layers"):
        raise TypeError(
            f"HiddenStateLoss needs a {role} with config.hidden_size and config.num_hidden_layers"
        )
    return int(config.num_hidden_layers), int(config.hidden_size)


def _resolve(layer: int, num_layers: int, role: str) -> int:
    states = num_layers + 1  # embeddings + one per block
    if not -states <= layer < states:
        raise ValueError(
            f"HiddenStateLoss: {role} layer {layer} is out of range; the {role} has {num_layers} blocks, so "
            f"hidden-state layers are 0..{num_layers} (or -1 for the last)"
        )
    return layer % states


class HiddenStateLoss(LossTerm):
    """Distance between student and teacher hidden states over mapped layer pairs (mean over pairs).

    When the widths differ, each mapped student layer gets a learned linear projection to the teacher's
    width (trained with the student, saved in the checkpoint); ``projection="always"`` adds one anyway,
    ``"never"`` refuses different widths.

    Args:
        layer_map: ``[[student_layer, teacher_layer], ...]``; negative indices count from the last.
        distance: ``cosine`` (1 − cosine similarity) or ``mse``.
        projection: ``auto`` | ``always`` | ``never``.
        weight: multiplier of this term in the total.
    """

    reads_logits = False
    kd_target = "teacher"  # needs an online teacher (hidden states are not stored offline)

    def __init__(
        self,
        layer_map: Sequence[Sequence[int]] = ((-1, -1),),
        distance: str = "cosine",
        projection: str = "auto",
        weight: float = 1.0,
    ) -> None:
        super().__init__(weight)
        if distance not in DISTANCES:
            raise ValueError(f"distance must be one of {sorted(DISTANCES)}, got {distance!r}")
        if projection not in ("auto", "always", "never"):
            raise ValueError(f"projection must be auto, always or never, got {projection!r}")
        pairs = [tuple(int(x) for x in pair) for pair in layer_map]
        if not pairs or any(len(pair) != 2 for pair in pairs):
            raise ValueError(
                f"layer_map must be a non-empty list of [student_layer, teacher_layer], got {layer_map}"
            )
        self.layer_map = pairs
        self.distance = distance
        self.projection = projection
        self.projections = nn.ModuleDict()
        self.pairs: list[tuple[int, int]] | None = None  # resolved by setup()

    def setup(self, student: nn.Module, teacher: nn.Module | None) -> None:
        if teacher is None:
            return  # a module without a teacher cannot run this term; forward says so
        s_layers, s_width = _layer_count(student, "student")
        t_layers, t_width = _layer_count(teacher, "teacher")
        self.pairs = [
            (_resolve(s, s_layers, "student"), _resolve(t, t_layers, "teacher")) for s, t in self.layer_map
        ]
        if s_width != t_width and self.projection == "never":
            raise ValueError(
                f"student hidden size {s_width} != teacher hidden size {t_width}; set projection=auto to learn one"
            )
        if s_width != t_width or self.projection == "always":
            for s, _ in self.pairs:
                if str(s) not in self.projections:
                    self.projections[str(s)] = nn.Linear(s_width, t_width, bias=False)

    @property
    def student_layers(self) -> tuple[int, ...]:
        return tuple(sorted({s for s, _ in self.pairs or ()}))

    @property
    def teacher_layers(self) -> tuple[int, ...]:
        return tuple(sorted({t for _, t in self.pairs or ()}))

    def forward(self, student_logits: torch.Tensor | None, batch: PositionBatch) -> torch.Tensor:
        if self.pairs is None:
            raise RuntimeError(
                "HiddenStateLoss needs an online teacher: use OnlineTeacherDistillModule (CLI: teacher=smollm2)"
            )
        mask = batch.target_ids != IGNORE_INDEX
        fn = DISTANCES[self.distance]
        values = []
        for s, t in self.pairs:
            h_s, h_t = batch.student_hidden.get(s), batch.teacher_hidden.get(t)
            if h_s is None or h_t is None:
                missing = f"student_hidden_{s}" if h_s is None else f"teacher_hidden_{t}"
                raise KeyError(
                    f"the batch has no {missing}; the module packs the layers its terms ask for "
                    "(use DistillModule with a teacher, which reads student_layers/teacher_layers)"
                )
            if str(s) in self.projections:
                h_s = self.projections[str(s)](h_s.to(self.projections[str(s)].weight.dtype))
            values.append(fn(h_s, h_t.detach(), mask))
        return torch.stack(values).mean()
