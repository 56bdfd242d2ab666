"""The teacher's own tokenization of a student corpus, and where its positions meet the student's.

A teacher (or proxy) of another family reads each record through its own chat template and tokenizer. For
every student target position (the layout of a soft-label store: ``TokenizedCorpus.target_offsets``) a
:class:`TeacherView` names the teacher position whose next-token distribution describes the same text
(-1 where the two tokenizations share no boundary there). See :mod:`kd_lightning.data.token_alignment`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from kd_lightning.data.records import CorpusError, Record
from kd_lightning.data.token_alignment import aligned_positions, response_spans
from kd_lightning.data.tokenized import (
    CorpusReport,
    TokenizedCorpus,
    fit_record,
    prompt_and_response_ids,
)


@dataclass
class TeacherView:
    """The teacher's token sequences (one per student sequence) and the position map.

    ``teacher_positions`` (rows,) int64, one per student target row: the index, inside the teacher's
    sequence, of the position aligned with it, or -1.
    """

    corpus: TokenizedCorpus
    teacher_positions: np.ndarray

    def aligned_rows(self, student_offsets: np.ndarray, seqs: list[int]) -> tuple[np.ndarray, int]:
        """For the student target rows of ``seqs`` (``student_offsets``: the student corpus's
        ``target_offsets``), the index of the aligned row among the teacher's target rows of ``seqs``
        taken in the same order, or -1; and how many teacher rows those are. This is how a teacher pass
        over these sequences lines up with a store in the student's layout."""
        t_offsets = self.corpus.target_offsets()
        index, base = [], 0
        for i in seqs:
            positions = self.teacher_positions[student_offsets[i] : student_offsets[i + 1]]
            first = int(self.corpus.prompt_lens[i]) - 1
            index.append(np.where(positions >= 0, positions - first + base, -1))
            base += int(t_offsets[i + 1] - t_offsets[i])
        return (np.concatenate(index) if index else np.zeros(0, dtype=np.int64)), base

    @property
    def coverage(self) -> float:
        """Share of the student's target positions that have an aligned teacher position."""
        return float((self.teacher_positions >= 0).mean()) if len(self.teacher_positions) else 0.0


def teacher_view(
    corpus: TokenizedCorpus,
    records: Mapping[str, Record | list[Record]],
    student_tokenizer: Any,
    teacher_tokenizer: Any,
    max_seq_len: int,
) -> TeacherView:
    """Tokenise each of ``corpus``'s records with the teacher's template and align it to the student's.

    Args:
        corpus: the student's tokenised corpus (its ``record_keys`` name each sequence's record).
        records: record key → the record (or the records of that prompt): the text both sides tokenise.
        student_tokenizer, teacher_tokenizer: the two tokenizers.
        max_seq_len: the teacher's sequences are truncated like the student's.
    """
    if corpus.record_keys is None:
        raise CorpusError("this tokenised corpus has no record keys; rebuild it (rebuild=[corpus])")
    missing = [key for key in corpus.record_keys if key not in records]
    if missing:
        raise CorpusError(f"{len(missing)} corpus records are not in the source any more; rebuild=[corpus]")
    sequences, prompt_lens, rows = [], [], []
    for i, key in enumerate(corpus.record_keys):
        student_response = corpus.sequence(i)[int(corpus.prompt_lens[i]) :].tolist()
        record = _record_of(records[key], student_response, student_tokenizer)
        _, prompt, response = fit_record(record, teacher_tokenizer, max_seq_len)
        response = response[: max(max_seq_len - len(prompt), 1)]
        text = record.response
        pairs = aligned_positions(
            response_spans(student_tokenizer, student_response, text),
            response_spans(teacher_tokenizer, response, text),
        )
        positions = np.full(len(student_response), -1, dtype=np.int64)
        keep = (pairs[:, 0] < len(student_response)) & (pairs[:, 1] < len(response))
        positions[pairs[keep, 0]] = len(prompt) - 1 + pairs[keep, 1]
        sequences.append(np.asarray(prompt + response, dtype=np.int32))
        prompt_lens.append(len(prompt))
        rows.append(positions)
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in sequences])]).astype(np.int64)
    teacher = TokenizedCorpus(
        np.concatenate(sequences),
        offsets,
        np.asarray(prompt_lens, dtype=np.int32),
        CorpusReport(records=len(sequences), kept=len(sequences)),
        list(corpus.record_keys),
    )
    return TeacherView(teacher, np.concatenate(rows) if rows else np.zeros(0, dtype=np.int64))


def _record_of(found: Record | list[Record], response_ids: list[int], tokenizer: Any) -> Record:
    """The record whose response the student's sequence holds (several records may share a prompt)."""
    if isinstance(found, Record):
        return found
    if len(found) == 1:
        return found[0]
    for record in found:
        _, response = prompt_and_response_ids(record, tokenizer)
        if response[: len(response_ids)] == response_ids:
            return record
    raise CorpusError("a corpus sequence matches none of its prompt's records; rebuild=[corpus]")


@dataclass
class ForeignTokenizer:
    """A model slot (proxy or teacher) that reads the records through its own tokenizer and template."""

    tokenizer: Any
    records: Mapping[str, Record | list[Record]]
    max_seq_len: int

    def view(self, corpus: TokenizedCorpus, student_tokenizer: Any) -> TeacherView:
        return teacher_view(corpus, self.records, student_tokenizer, self.tokenizer, self.max_seq_len)


@dataclass
class MappedProxy:
    """A proxy of another tokenizer, for the posterior: its view of the corpus, ``token_map`` (V_proxy,)
    from its ids to the student token that begins each one's string (-1: none), and the student's
    vocabulary size."""

    view: TeacherView
    token_map: np.ndarray
    vocab_size: int
