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
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from transformers import PreTrainedTokenizerBase

from kd_lightning.atomic import atomic_folder
from kd_lightning.data.records import CorpusError, Record

log = logging.getLogger(__name__)

FALLBACK_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"


@dataclass
class CorpusReport:
    """What happened to each record; nothing is dropped without being counted here."""

    records: int = 0
    kept: int = 0
    empty_response: int = 0
    truncated: int = 0
    prompt_too_long: int = 0
    examples: dict[str, list[int]] = field(default_factory=dict)

    def note(self, reason: str, index: int) -> None:
        setattr(self, reason, getattr(self, reason) + 1)
        self.examples.setdefault(reason, [])
        if len(self.examples[reason]) < 5:
            self.examples[reason].append(index)

    def summary(self) -> str:
        return (
            f"{self.kept}/{self.records} records kept; skipped {self.empty_response} with an empty response "
            f"and {self.prompt_too_long} whose prompt alone exceeds max_seq_len; "
            f"truncated {self.truncated} over-long responses (record indices: {self.examples})"
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


def _messages(record: Record) -> list[dict[str, str]]:
    user = record.instruction if not record.input else f"{record.instruction}\n\n{record.input}"
    messages = [{"role": "system", "content": record.system}] if record.system else []
    return [*messages, {"role": "user", "content": user}]


def prompt_and_response_ids(
    record: Record, tokenizer: PreTrainedTokenizerBase
) -> tuple[list[int], list[int]]:
    """Token ids of the chat-templated prompt (with generation prompt) and of the response (+ end token).

    The response ids are taken from the full templated conversation minus the prompt prefix, so the
    tokens the student is trained on are exactly those the template produces (end-of-turn included).
    """
    if getattr(tokenizer, "chat_template", None):
        messages = _messages(record)
        prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": record.response}], tokenize=False
        )
        if not full_text.startswith(prompt_text):
            raise CorpusError(
                "the tokenizer's chat template does not extend the prompt with the response; "
                "use a tokenizer whose template renders the generation prompt as a prefix"
            )
        prompt = tokenizer(prompt_text, add_special_tokens=False)["input_ids"]
        full = tokenizer(full_text, add_special_tokens=False)["input_ids"]
        if full[: len(prompt)] != prompt:  # tokenisation merged across the boundary; keep the prompt intact
            response = tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
        else:
            response = full[len(prompt) :]
        return prompt, response
    user = _messages(record)[-1]["content"]
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    prompt = bos + tokenizer(FALLBACK_PROMPT.format(instruction=user), add_special_tokens=False)["input_ids"]
    response = tokenizer(record.response, add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
    return prompt, response


def tokenize_records(
    records: list[Record], tokenizer: PreTrainedTokenizerBase, max_seq_len: int
) -> TokenizedCorpus:
    """Tokenise records; empty responses and over-long prompts are skipped and counted, long responses truncated and counted."""
    if max_seq_len < 4:
        raise CorpusError(f"max_seq_len={max_seq_len} is too small; use at least a few hundred tokens")
    report = CorpusReport(records=len(records))
    sequences, prompt_lens, keys = [], [], []
    for index, record in enumerate(records):
        if not record.response.strip():
            report.note("empty_response", index)
            continue
        prompt, response = prompt_and_response_ids(record, tokenizer)
        if len(prompt) + 1 > max_seq_len:
            report.note("prompt_too_long", index)
            continue
        if len(prompt) + len(response) > max_seq_len:
            report.note("truncated", index)
            response = response[: max_seq_len - len(prompt)]
        sequences.append(np.asarray(prompt + response, dtype=np.int32))
        prompt_lens.append(len(prompt))
        keys.append(record.key)
        report.kept += 1
    if not sequences:
        raise CorpusError(f"no usable records ({report.summary()})")
    if report.kept < report.records or report.truncated:
        log.warning("corpus: %s", report.summary())
    offsets = np.concatenate([[0], np.cumsum([len(s) for s in sequences])]).astype(np.int64)
    return TokenizedCorpus(
        np.concatenate(sequences), offsets, np.asarray(prompt_lens, dtype=np.int32), report, keys
    )
