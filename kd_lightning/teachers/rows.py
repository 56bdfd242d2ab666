"""A served teacher in the training step: its top-k log-probs at every target position, over HTTP.

``teacher=served`` with a module that runs the teacher online (``module=online_teacher``, GKD, DistiLLM)
gives the module a :class:`ServedTeacherRows` instead of a model. At each step it sends each record's tokens
(teacher text, or the student's own samples) as a prompt to score, and turns the prompt log-probs into the
sparse rows every divergence term reads: the top ``k`` (``teacher.max_logprobs``) and the tail ``1 − Σp``,
as an offline teacher store holds them. The teacher then needs no memory beside the student, at the cost of
seeing only its top k. Modules that need the teacher's whole distribution or its hidden states (MiniLLM,
feature terms, a teacher of another tokenizer) refuse it when the run is built.
"""

from __future__ import annotations

import itertools
from typing import Any

import torch

from kd_lightning.data.batch import SoftLabels
from kd_lightning.teachers.served import ServedTeacher, rows_of_entries
from kd_lightning.teachers.wire import text_of


class TeacherRows:
    """An online teacher that gives top-k rows at a batch's target positions instead of a model's logits (a
    served teacher, or a kind of your own): the divergence terms read them as sparse rows, as they read an
    offline store. Subclass it and fill :meth:`rows`; :meth:`check` runs once before training."""

    def check(self, sample_ids: list[int]) -> None:
        """Refuse, before training, a teacher that cannot score the student's tokens (one line)."""

    def rows(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> SoftLabels:
        """Top-k rows (1, N, k) + tail (1, N) at the N positions of ``mask`` (B, T), in ``mask``'s order;
        position t is described by the teacher's distribution of token t + 1."""
        raise NotImplementedError


class ServedTeacherRows(TeacherRows):
    """A :class:`ServedTeacher` read as the online teacher's top-k rows at a batch's target positions.

    Args:
        served: the client (``teacher=served``); each position keeps ``served.max_logprobs`` entries.
        tokenizer: the student's tokenizer; the server must tokenize as it does (one probe request, at
            :meth:`check`), and the ``openai_completions`` form maps token texts back to its ids.
    """

    def __init__(self, served: ServedTeacher, tokenizer: Any) -> None:
        self.served = served
        self.tokenizer = tokenizer
        self.k = int(served.max_logprobs)
        self.texts = text_of(tokenizer)
        self.to_id = served.wire.id_map(tokenizer)

    def check(self, sample_ids: list[int]) -> None:
        """One probe request: the server tokenizes as the student does, or the run stops with one line."""
        self.served.check_tokenizer(sample_ids, self.texts, self.tokenizer)

    def rows(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        mask: torch.Tensor,
        position_ids: torch.Tensor | None = None,
    ) -> SoftLabels:
        """Top-k rows (1, N, k) + tail (1, N) at the N positions of ``mask`` (B, T), in ``mask``'s order.

        Each record is scored alone: a row's real tokens (left or right padding dropped), or, in a packed
        row (``position_ids`` restarting at 0), each record in it. Position t is described by the scores of
        token t + 1 of its record.
        """
        ids_cpu, real, targets = input_ids.cpu(), attention_mask.cpu().bool(), mask.cpu().bool()
        sequences: list[list[int]] = []
        located: dict[tuple[int, int], tuple[int, int]] = {}  # (row, t) → (record, index in record)
        for row in range(ids_cpu.shape[0]):
            for record in records_of_row(
                real[row], None if position_ids is None else position_ids[row].cpu()
            ):
                if not targets[row, record].any():
                    continue  # padding, or a record without targets: nothing to ask
                for index, t in enumerate(record.tolist()):
                    located[row, t] = (len(sequences), index)
                sequences.append(ids_cpu[row, record].tolist())
        scored = self.served.score(sequences, [self.texts(s) for s in sequences], self.k) if sequences else []
        entries = []
        for row, t in targets.nonzero().tolist():
            record, index = located.get((row, t), (None, None))
            if record is None or index + 1 >= len(scored[record]) or scored[record][index + 1] is None:
                raise ValueError(
                    "a target position has no next token in its record to score; the served teacher reads "
                    "each target position t from the log-probs of token t + 1"
                )
            entries.append(scored[record][index + 1])
        ids, probs, tail = (torch.from_numpy(a) for a in rows_of_entries(entries, self.k, self.to_id))
        probs, tail = probs.float(), tail.float()
        return SoftLabels(ids[None], probs[None], tail[None]).to(input_ids.device)


def records_of_row(real: torch.Tensor, position_ids: torch.Tensor | None) -> list[torch.Tensor]:
    """The token positions of each record in one row: its real tokens, split where a packed row's
    ``position_ids`` restart at 0."""
    if position_ids is None:
        return [real.nonzero().squeeze(1)]
    starts = [*(position_ids == 0).nonzero().squeeze(1).tolist(), len(position_ids)]
    return [torch.arange(a, b) for a, b in itertools.pairwise(starts) if b > a]


def gives_rows(teacher: Any) -> bool:
    """Whether a module's online teacher gives top-k rows (a server's, or a :class:`TeacherRows` of your own:
    no weights in process to check, freeze, move or shard); the one place that tells it from a model."""
    return isinstance(teacher, TeacherRows)
