"""Tokenised teacher corpus: chat template applied, prompt masked, stored flat with offsets.

Convention used everywhere downstream: a *target position* is an index ``t`` whose next token
``input_ids[t + 1]`` is a response token. Logits at ``t`` are trained toward that token, and soft labels
are stored for target positions only, in order.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from kd_lightning.atomic import atomic_folder
from kd_lightning.data.chat_encoding import (
    CHECK_RECORDS,
    Encoder,
    ReferenceEncoder,
    chat_encoder,
    encode_checked,
)
from kd_lightning.data.records import CorpusError, Record

log = logging.getLogger(__name__)

CHARS_PER_TOKEN_BOUND = 16
"""History beyond this many characters per prompt token cannot fit: it is dropped before tokenising."""


@dataclass
class CorpusReport:
    """What happened to each record; nothing is dropped without being counted here."""

    records: int = 0
    kept: int = 0
    empty_response: int = 0
    truncated: int = 0
    prompt_too_long: int = 0
    history_trimmed: int = 0
    examples: dict[str, list[int]] = field(default_factory=dict)
    encoding: dict[str, int | str] = field(default_factory=dict)
    """How the ids were made (``pieces`` or ``reference``) and how many records were checked against the
    reference path (see :func:`kd_lightning.data.chat_encoding.encode_checked`)."""

    def note(self, reason: str, index: int) -> None:
        setattr(self, reason, getattr(self, reason) + 1)
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(index)

    def summary(self) -> str:
        return (
            f"{self.kept}/{self.records} records kept; skipped {self.empty_response} with an empty response "
            f"and {self.prompt_too_long} whose prompt alone exceeds max_seq_len; "
            f"truncated {self.truncated} over-long responses"
            + (
                f"; dropped the oldest turns of {self.history_trimmed} conversations"
                if self.history_trimmed
                else ""
            )
            + f" (record indices: {self.examples})"
        )


@dataclass
class TokenizedCorpus:
    """Flat token ids with per-sequence offsets and prompt lengths (everything before the response)."""

    tokens: np.ndarray  # (total,) int32
    offsets: np.ndarray  # (num_seqs + 1,) int64
    prompt_lens: np.ndarray  # (num_seqs,) int32
    report: CorpusReport = field(default_factory=CorpusReport)
    record_keys: list[str] | None = None  # Record.key of each sequence (links API log-probs to positions)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def sequence(self, i: int) -> np.ndarray:
        return self.tokens[self.offsets[i] : self.offsets[i + 1]]

    def num_targets(self, i: int) -> int:
        """Target positions of sequence i: ``prompt_len - 1 ... len - 2`` (each predicts a response token)."""
        return int(self.offsets[i + 1] - self.offsets[i] - self.prompt_lens[i])

    def target_offsets(self) -> np.ndarray:
        """(num_seqs + 1,) offsets of each sequence's rows in a soft-label store."""
        counts = np.diff(self.offsets) - self.prompt_lens
        return np.concatenate([[0], np.cumsum(counts)]).astype(np.int64)

    def target_mask(self) -> np.ndarray:
        """(total,) bool: flat position ``p`` is a target position (its next token is a response token)."""
        mask = np.zeros(len(self.tokens), dtype=bool)
        for i in range(len(self)):
            start = self.offsets[i] + self.prompt_lens[i] - 1
            mask[start : self.offsets[i + 1] - 1] = True
        return mask

    @property
    def fingerprint(self) -> str:
        """Hash of the token ids and prompt masks: soft-label stores are tied to it."""
        digest = hashlib.sha256()
        for array in (self.tokens, self.offsets, self.prompt_lens):
            digest.update(np.ascontiguousarray(array).tobytes())
        return digest.hexdigest()[:16]

    def save(self, folder: str | os.PathLike) -> None:
        with atomic_folder(folder) as tmp:
            np.save(tmp / "tokens.npy", self.tokens)
            np.save(tmp / "offsets.npy", self.offsets)
            np.save(tmp / "prompt_lens.npy", self.prompt_lens)
            (tmp / "report.json").write_text(json.dumps(self.report.__dict__, indent=1))
            if self.record_keys is not None:
                (tmp / "record_keys.json").write_text(json.dumps(self.record_keys))

    @classmethod
    def load(cls, folder: str | os.PathLike) -> TokenizedCorpus:
        folder = Path(folder)
        report = CorpusReport(**json.loads((folder / "report.json").read_text()))
        return cls(
            np.load(folder / "tokens.npy"),
            np.load(folder / "offsets.npy"),
            np.load(folder / "prompt_lens.npy"),
            report,
            json.loads(keys.read_text()) if (keys := folder / "record_keys.json").is_file() else None,
        )


def encode_records(
    records: list[Record], tokenizer: PreTrainedTokenizerBase
) -> list[tuple[list[int], list[int]]]:
    """Token ids of each record's prompt and response (see :func:`prompt_and_response_ids`), by the
    reference path (each record's template rendered and tokenised whole)."""
    return ReferenceEncoder(tokenizer).encode(records)


def prompt_and_response_ids(
    record: Record, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], list[int]]:
    """Token ids of the chat-templated prompt (with generation prompt) and of the response (+ end token).

    The response ids are taken from the full templated conversation minus the prompt prefix, so the
    tokens the student is trained on are exactly those the template produces (end-of-turn included).
    """
    return encode_records([record], tokenizer)[0]


def without_unfitting_history(record: Record, max_tokens: int) -> Record:
    """The record without the oldest history turns that cannot fit ``max_tokens`` whatever their
    tokenization (beyond ``CHARS_PER_TOKEN_BOUND`` characters per token), so they are never tokenised."""
    budget = CHARS_PER_TOKEN_BOUND * max_tokens - len(record.instruction) - len(record.system)
    history, total = record.history, sum(len(content) for _, content in record.history)
    while history and total > budget:
        total -= len(history[0][1])
        history = history[1:]
    return record if history == record.history else replace(record, history=history)


def fit_history(
    record: Record, tokenizer: PreTrainedTokenizerBase, max_prompt_len: int, encoder: Encoder | None = None
) -> Record:
    """The record with the fewest oldest history turns dropped so that its prompt fits ``max_prompt_len``
    tokens (itself when it fits; with no history left when even the last user message alone does not)."""
    if not record.history:
        return record
    encoder = encoder or ReferenceEncoder(tokenizer)
    history = without_unfitting_history(record, max_prompt_len).history
    if history == record.history and encoder.prompt_length(record) <= max_prompt_len:
        return record
    low, high = len(record.history) - len(history), len(record.history)  # drop `high` turns: always fits
    while low < high:  # the fewest dropped turns whose prompt fits
        middle = (low + high) // 2
        if (
            encoder.prompt_length(replace(record, history=record.history[middle:], response=""))
            <= max_prompt_len
        ):
            high = middle
        else:
            low = middle + 1
    return replace(record, history=record.history[high:])


def fit_record(
    record: Record,
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int,
    encoded: tuple[list[int], list[int]] | None = None,
    encoder: Encoder | None = None,
) -> tuple[Record, list[int], list[int]]:
    """A record cut to ``max_seq_len`` tokens, the response first: a conversation's oldest turns are dropped
    until prompt and response fit (or no history is left); the caller truncates a response that still does
    not. Returns the fitted record and its prompt and response ids (``encoded``: the whole record's;
    ``encoder``: how ids are made, the reference path by default)."""
    encoder = encoder or ReferenceEncoder(tokenizer)
    prompt, response = encoded or encoder.encode([record])[0]
    if not record.history or len(prompt) + len(response) <= max_seq_len:
        return record, prompt, response
    fitted = fit_history(record, tokenizer, max(max_seq_len - len(response), 1), encoder)
    return (fitted, *encoder.encode([fitted])[0])


def tokenize_records(
    records: list[Record],
    tokenizer: PreTrainedTokenizerBase,
    max_seq_len: int,
    *,
    encoder: Encoder | None = None,
    check_records: int | None = CHECK_RECORDS,
) -> TokenizedCorpus:
    """Tokenise records; empty responses and over-long prompts are skipped and counted, long responses
    truncated and counted. A conversation's oldest turns are dropped (and counted) until prompt and
    response fit (see :func:`fit_record`); its record key stays the whole conversation's.

    ``encoder`` makes the ids (default: each message tokenised once, :class:`PieceEncoder`, for a templated
    tokenizer); ``check_records`` of them (None: all) are compared with the reference path, which encodes the
    whole corpus instead if any differs (see :func:`encode_checked`)."""
    if max_seq_len < 4:
        raise CorpusError(f"max_seq_len={max_seq_len} is too small; use at least a few hundred tokens")
    report = CorpusReport(records=len(records))
    sequences, prompt_lens, keys = [], [], []
    usable = []
    for index, record in enumerate(records):
        if record.response.strip():
            usable.append(index)
        else:
            report.note("empty_response", index)
    shortened = [without_unfitting_history(records[i], max_seq_len) for i in usable]
    pairs, encoder, check = encode_checked(shortened, encoder or chat_encoder(tokenizer), check_records)
    report.encoding = {"path": encoder.name, **asdict(check)}
    for index, record, pair in zip(usable, shortened, pairs):
        fitted, prompt, response = fit_record(record, tokenizer, max_seq_len, pair, encoder)
        if fitted.history != records[index].history:
            report.note("history_trimmed", index)
        if len(prompt) + 1 > max_seq_len:
            report.note("prompt_too_long", index)
            continue
        if len(prompt) + len(response) > max_seq_len:
            report.note("truncated", index)
            response = response[: max_seq_len - len(prompt)]
        sequences.append(np.concatenate([prompt, response]).astype(np.int32, copy=False))
        prompt_lens.append(len(prompt))
        keys.append(records[index].key)
        report.kept += 1
    if not sequences:
        raise CorpusError(f"no usable records ({report.summary()})")
    if report.kept < report.records or report.truncated:
        log.warning("corpus: %s", report.summary())
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in sequences])]).astype(np.int64)
    return TokenizedCorpus(
        np.concatenate(sequences), offsets, np.asarray(prompt_lens, dtype=np.int32), report, keys
    )
