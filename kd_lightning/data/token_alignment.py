"""Aligning two tokenizations of the same text by character offsets (cross-tokenizer distillation).

A student and a teacher (or proxy) from different families split the same response differently. Their
next-token distributions are comparable only where both models have read the same text: at a position
whose prefix ends at the same character in both tokenizations. This module finds those positions.

Each tokenization becomes a list of character spans that tile the text exactly once:

* a token's span starts where the previous one ended (so whitespace that a tokenizer folds into the next
  token, ``Ġword`` or ``▁word``, or trims from its offsets, belongs to exactly one token);
* byte-fallback tokens (``<0xF0><0x9F><0x98><0x80>`` for one emoji) all report the same character span;
  they form one group, and only the first of them starts at a text boundary (a prefix that ends inside a
  character is no boundary at all);
* special tokens are not added (``add_special_tokens=False``); a special token written in the text is one
  token like any other.

Chat templates differ per family, so only the response text is aligned; each side adds its own prompt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np


@dataclass(frozen=True)
class TokenSpans:
    """One tokenization of a text: ids, and per token the character span ``[start, end)`` it covers.

    ``boundary[i]`` is true when the prefix before token i ends at a text boundary (false for the 2nd, 3rd,
    ... byte-fallback token of one character).
    """

    ids: np.ndarray
    starts: np.ndarray
    ends: np.ndarray
    boundary: np.ndarray
    text_length: int


def token_spans(tokenizer: Any, text: str) -> TokenSpans:
    """Tokenise ``text`` (no special tokens added) into spans that tile it (see the module docstring)."""
    encoded = tokenizer(text, return_offsets_mapping=True, add_special_tokens=False)
    ids = np.asarray(encoded["input_ids"], dtype=np.int64)
    offsets = np.asarray(encoded["offset_mapping"], dtype=np.int64).reshape(-1, 2)
    n = len(ids)
    if n == 0:
        empty = np.zeros(0, dtype=np.int64)
        return TokenSpans(ids, empty, empty, np.zeros(0, dtype=bool), len(text))
    raw_start, raw_end = offsets[:, 0], offsets[:, 1]
    # byte-fallback pieces of one character report one span: only the first of a run starts a boundary
    same_as_previous = np.zeros(n, dtype=bool)
    same_as_previous[1:] = (raw_start[1:] == raw_start[:-1]) & (raw_end[1:] == raw_end[:-1])
    ends = np.maximum.accumulate(raw_end)  # never move backwards
    ends[-1] = max(int(ends[-1]), len(text))  # trailing text a tokenizer trimmed belongs to the last token
    starts = np.concatenate([[0], ends[:-1]])
    return TokenSpans(ids, starts, ends, ~same_as_previous, len(text))


@dataclass(frozen=True)
class TokenAlignment:
    """Where two tokenizations of one text can be compared.

    ``pairs`` (A, 2) holds (student token index, teacher token index) whose prefixes end at the same
    character: the student's distribution for its token i and the teacher's for its token j are both
    distributions of the text that follows that boundary. ``spelled_by[k]`` lists the teacher tokens that
    spell the student tokens from pair k up to the next pair (the text between two shared boundaries).
    """

    student: TokenSpans
    teacher: TokenSpans
    pairs: np.ndarray
    spelled_by: tuple[tuple[int, ...], ...]

    @property
    def student_positions(self) -> np.ndarray:
        """Student token indices that have an aligned teacher position."""
        return self.pairs[:, 0]

    @property
    def coverage(self) -> float:
        """Share of the student's tokens that are aligned."""
        return len(self.pairs) / max(len(self.student.ids), 1)


def align_spans(student: TokenSpans, teacher: TokenSpans) -> TokenAlignment:
    """Pairs of positions whose prefixes end at the same text boundary (both spans tile one text)."""
    if student.text_length != teacher.text_length:
        raise ValueError(
            f"the two tokenizations cover {student.text_length} and {teacher.text_length} characters; "
            "align tokenizations of the same text"
        )
    s_index = np.flatnonzero(student.boundary)
    t_index = np.flatnonzero(teacher.boundary)
    common, s_at, t_at = np.intersect1d(student.starts[s_index], teacher.starts[t_index], return_indices=True)
    pairs = np.stack([s_index[s_at], t_index[t_at]], axis=1) if len(common) else np.zeros((0, 2), np.int64)
    spelled = []
    for k in range(len(pairs)):
        end = teacher.text_length if k + 1 == len(pairs) else int(teacher.starts[pairs[k + 1, 1]])
        first = int(pairs[k, 1])
        last = first
        while last + 1 < len(teacher.ids) and teacher.starts[last + 1] < end:
            last += 1
        spelled.append(tuple(range(first, last + 1)))
    return TokenAlignment(student, teacher, pairs.astype(np.int64), tuple(spelled))


def align_tokenizations(text: str, student_tokenizer: Any, teacher_tokenizer: Any) -> TokenAlignment:
    """Align the student's and the teacher's tokenizations of ``text`` (a response, without template)."""
    return align_spans(token_spans(student_tokenizer, text), token_spans(teacher_tokenizer, text))


def _decoded_spans(tokenizer: Any, ids: list[int], text: str) -> TokenSpans:
    """Spans of ``ids`` over ``text`` by decoding every prefix (exact, O(n²): the fallback path).

    A prefix is a boundary when its decoding is a prefix of ``text`` (a prefix that ends inside a
    character or disagrees with the text is none); tokens past the text (end-of-turn) start at its end.
    """
    n = len(ids)
    starts = np.zeros(n, dtype=np.int64)
    boundary = np.zeros(n, dtype=bool)
    reached = 0
    for k in range(n):
        prefix = tokenizer.decode(ids[:k], skip_special_tokens=False, clean_up_tokenization_spaces=False)
        ok = "\ufffd" not in prefix and text.startswith(prefix) and len(prefix) >= reached
        if ok:
            reached = len(prefix)
        starts[k], boundary[k] = reached, ok
    ends = np.concatenate([starts[1:], [len(text)]]) if n else starts
    return TokenSpans(np.asarray(ids, dtype=np.int64), starts, ends, boundary, len(text))


def response_spans(tokenizer: Any, ids: list[int], text: str) -> TokenSpans:
    """Spans over ``text`` of a response's token ids as a corpus holds them (taken from the templated
    conversation, so they may differ from tokenising ``text`` alone, and may end with end-of-turn tokens).

    When the ids begin with the plain tokenisation of ``text`` (the usual case) its offsets are used and the
    trailing tokens start at the text's end; otherwise every prefix is decoded (:func:`_decoded_spans`).
    """
    plain = token_spans(tokenizer, text)
    n = len(plain.ids)
    if n <= len(ids) and np.array_equal(np.asarray(ids[:n]), plain.ids):
        extra = len(ids) - n
        at_end = np.full(extra, len(text), dtype=np.int64)
        return TokenSpans(
            np.asarray(ids, dtype=np.int64),
            np.concatenate([plain.starts, at_end]),
            np.concatenate([plain.ends, at_end]),
            np.concatenate([plain.boundary, np.ones(extra, dtype=bool)]),
            len(text),
        )
    return _decoded_spans(tokenizer, list(ids), text)


def aligned_positions(student: TokenSpans, teacher: TokenSpans) -> np.ndarray:
    """(A, 2) pairs (student index, teacher index) of tokens predicted from the same text boundary.

    Response tokens pair by :func:`align_spans`; the first token after the text on each side (end of
    turn: "the response is over") pairs with the other's. Identical id sequences pair every position with
    itself (both sides have read the same tokens, even inside a character).
    """
    if np.array_equal(student.ids, teacher.ids):
        index = np.arange(len(student.ids), dtype=np.int64)
        return np.stack([index, index], axis=1)
    n_s = int((student.starts < student.text_length).sum()) if len(student.ids) else 0
    n_t = int((teacher.starts < teacher.text_length).sum()) if len(teacher.ids) else 0

    def head(spans: TokenSpans, n: int) -> TokenSpans:
        return TokenSpans(
            spans.ids[:n], spans.starts[:n], spans.ends[:n], spans.boundary[:n], spans.text_length
        )

    pairs = align_spans(head(student, n_s), head(teacher, n_t)).pairs
    if n_s < len(student.ids) and n_t < len(teacher.ids):
        pairs = np.concatenate([pairs, [[n_s, n_t]]]).astype(np.int64)
    return pairs


@dataclass(frozen=True)
class VocabularyMatch:
    """Tokens that spell the same string in two vocabularies (the GOLD hybrid's exact part).

    ``student_ids[m]`` and ``teacher_ids[m]`` spell one string; each id appears at most once. Strings are
    compared as decoded text (``Ġword`` and ``▁word`` both spell " word"), not as raw vocabulary entries.
    """

    student_ids: np.ndarray
    teacher_ids: np.ndarray
    student_size: int
    teacher_size: int

    @classmethod
    def identity(cls, size: int) -> VocabularyMatch:
        ids = np.arange(size, dtype=np.int64)
        return cls(ids, ids, size, size)


def token_strings(tokenizer: Any) -> list[str | None]:
    """The text each id spells, decoded after an anchor so leading spaces survive; None for special
    tokens and pieces of a character (byte tokens that are not a whole character)."""
    size = int(max(len(tokenizer), tokenizer.vocab_size))
    special = set(tokenizer.all_special_ids)
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.decoder is None:  # no decoder (WordLevel): decode joins with spaces,
        tokens = tokenizer.convert_ids_to_tokens(list(range(size)))  # so a token's text is the token itself
        return [None if i in special or not t else t for i, t in enumerate(tokens)]
    anchor = tokenizer("a", add_special_tokens=False)["input_ids"]
    base = tokenizer.decode(anchor, clean_up_tokenization_spaces=False)
    texts = tokenizer.batch_decode(
        [[*anchor, i] for i in range(size)], skip_special_tokens=False, clean_up_tokenization_spaces=False
    )
    found: list[str | None] = []
    for i, text in enumerate(texts):
        piece = text[len(base) :] if text.startswith(base) else None
        found.append(None if i in special or not piece or "\ufffd" in piece else piece)
    return found


def match_vocabularies(student_tokenizer: Any, teacher_tokenizer: Any) -> VocabularyMatch:
    """Student and teacher ids that spell identical strings (the lowest id of each side where several do)."""
    student, teacher = token_strings(student_tokenizer), token_strings(teacher_tokenizer)
    first: dict[str, int] = {}
    for i, text in enumerate(student):
        if text is not None:
            first.setdefault(text, i)
    pairs, used = [], set()
    for j, text in enumerate(teacher):
        if text is not None and text in first and first[text] not in used:
            used.add(first[text])
            pairs.append((first[text], j))
    array = np.asarray(pairs, dtype=np.int64).reshape(-1, 2)
    return VocabularyMatch(array[:, 0], array[:, 1], len(student), len(teacher))


def first_token_map(student_tokenizer: Any, proxy_tokenizer: Any) -> np.ndarray:
    """(V_proxy,) the student token that begins each proxy token's string, or -1 (no string: a special
    token or a piece of a character). The proxy's end-of-sequence token maps to the student's: both say
    "the response is over". Context-free: the first student token of the string tokenised alone, which is
    the in-context one wherever the student's pre-tokenizer splits there (always at a word start)."""
    strings = token_strings(proxy_tokenizer)
    encoded = student_tokenizer([s or "" for s in strings], add_special_tokens=False)["input_ids"]
    mapped = np.asarray([ids[0] if s and ids else -1 for s, ids in zip(strings, encoded)], dtype=np.int64)
    if proxy_tokenizer.eos_token_id is not None and student_tokenizer.eos_token_id is not None:
        mapped[int(proxy_tokenizer.eos_token_id)] = int(student_tokenizer.eos_token_id)
    return mapped
