"""Records to token ids, with each message of a conversation tokenised once per corpus build.

A conversation's k-th answer is a record whose prompt holds every earlier message, so rendering each
record's whole chat template and tokenising it (:class:`ReferenceEncoder`, the definition) costs the square
of a conversation's length: more than 16 minutes for ShareGPT's 61k answers, most of it re-tokenising
history. :class:`PieceEncoder` gets the same ids in time linear in the text:

* the template is rendered once per *shape* (the roles of the messages, with or without the generation
  prompt) with placeholders for the contents, which gives the template's own text around each message;
* that text is cut at the tokenizer's added tokens (``<|im_start|>``, ``<|im_end|>``...), which a tokenizer
  splits out before anything else, so the stretch between two of them (typically a role header and one
  message) tokenises the same alone as inside the whole conversation;
* each stretch is tokenised once (a batch of them per call, which the fast tokenizer spreads over the
  cores) and cached; a record's ids are its stretches' ids joined with the added tokens' ids.

Both assumptions are checked, not trusted: :func:`encode_checked` compares a sample of records with the
reference on every build (every record in the tests), and a template or tokenizer that fails is encoded
by the reference for the whole corpus, said once with the count. A shape whose rendering does not place
each message exactly once (a template that drops or repeats a message) goes to the reference record by
record, and is counted.
"""

from __future__ import annotations

import logging
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from transformers import PreTrainedTokenizerBase

from kd_lightning.data.records import CorpusError, Record

log = logging.getLogger(__name__)

FALLBACK_PROMPT = "### Instruction:\n{instruction}\n\n### Response:\n"
FALLBACK_TURN = {"user": "### Instruction:\n{content}\n\n", "assistant": "### Response:\n{content}\n\n"}
"""Earlier turns of a conversation, for a tokenizer without a chat template (before FALLBACK_PROMPT)."""
ENCODE_BATCH = 256
"""Records encoded together: their texts (or new stretches) go to the tokenizer in one call."""
CHECK_RECORDS = 128
"""Records of every build compared with the reference path (spread evenly over the corpus)."""
CACHE_TOKENS = 1 << 25
"""Token ids kept in the stretch cache (least recently used dropped first; int32, so 128 MiB): a
conversation's records are consecutive, so even a small cache holds every message still to be reused; this
one holds ShareGPT's whole text, which the prior's second, longer cut then reads without tokenising."""
_PLACEHOLDER = "\ue000{}\ue001"  # private-use characters: no template writes them
_PLACEHOLDER_SPLIT = re.compile("\ue000(\\d+)\ue001")

Pair = tuple[list[int] | np.ndarray, list[int] | np.ndarray]
"""A record's prompt ids (with the generation prompt) and response ids (with the end-of-turn token)."""


def record_messages(record: Record) -> list[dict[str, str]]:
    """The chat messages of a record's prompt: system, history, then the last user message."""
    user = record.instruction if not record.input else f"{record.instruction}\n\n{record.input}"
    messages = [{"role": "system", "content": record.system}] if record.system else []
    history = [{"role": role, "content": content} for role, content in record.history]
    return [*messages, *history, {"role": "user", "content": user}]


def reference_texts(record: Record, tokenizer: PreTrainedTokenizerBase) -> tuple[str, str]:
    """The chat-templated prompt (with generation prompt) and the whole templated conversation; without a
    template, the fallback prompt and the response."""
    if getattr(tokenizer, "chat_template", None):
        messages = record_messages(record)
        prompt_text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        full_text = tokenizer.apply_chat_template(
            [*messages, {"role": "assistant", "content": record.response}], tokenize=False
        )
        if not full_text.startswith(prompt_text):
            raise CorpusError(
                "the tokenizer's chat template does not extend the prompt with the response; "
                "use a tokenizer whose template renders the generation prompt as a prefix"
            )
        return prompt_text, full_text
    user = record_messages(record)[-1]["content"]
    turns = "".join(FALLBACK_TURN[role].format(content=content) for role, content in record.history)
    return turns + FALLBACK_PROMPT.format(instruction=user), record.response


def split_pair(
    tokenizer: PreTrainedTokenizerBase, texts: tuple[str, str], prompt: list[int], full: list[int]
) -> Pair:
    """Prompt and response ids from the ids of the prompt text and of the whole text (the definition both
    encoders share): the response is what follows the prompt's ids, or, where tokenisation merged across
    the boundary, the response text tokenised alone."""
    if not getattr(tokenizer, "chat_template", None):
        bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
        return bos + prompt, [*full, tokenizer.eos_token_id]
    if full[: len(prompt)] != prompt:
        prompt_text, full_text = texts
        return prompt, tokenizer(full_text[len(prompt_text) :], add_special_tokens=False)["input_ids"]
    return prompt, full[len(prompt) :]


class ReferenceEncoder:
    """The definition: each record's template rendered whole and tokenised (quadratic in a conversation)."""

    name = "reference"

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer

    def encode(self, records: Sequence[Record]) -> list[Pair]:
        found = []
        for start in range(0, len(records), ENCODE_BATCH):
            texts = [
                reference_texts(record, self.tokenizer) for record in records[start : start + ENCODE_BATCH]
            ]
            encoded = self.tokenizer([t for pair in texts for t in pair], add_special_tokens=False)[
                "input_ids"
            ]
            for i, pair in enumerate(texts):
                found.append(split_pair(self.tokenizer, pair, encoded[2 * i], encoded[2 * i + 1]))
        return found

    def prompt_length(self, record: Record) -> int:
        return len(self.encode([record])[0][0])


@dataclass(frozen=True)
class _Stretch:
    """Text between two added tokens, or one added token: literal parts of the template and the messages
    placed among them. An added token is a stretch of its own text, which the tokenizer maps to its id."""

    literals: tuple[str | None, ...]
    """The template's text in order, None where a message's content goes."""
    contents: tuple[int, ...]
    """Indices of the messages placed at the Nones, in order."""

    def key_spec(self) -> tuple[tuple, int | tuple[int, ...] | None]:
        """How :func:`_keys` makes this stretch's cache key: the literals and the contents themselves (str
        hashes are cached by Python). ``(key, None)`` for a stretch without contents (its key is fixed)."""
        if not self.contents:
            return (self.literals,), None
        return self.literals, self.contents[0] if len(self.contents) == 1 else self.contents

    def text(self, key: tuple) -> str:
        values = iter(key[1:])
        return "".join(part if part is not None else next(values) for part in self.literals)


@dataclass(frozen=True)
class Plan:
    """A template shape: its stretches and added tokens, in order, and how to key each one."""

    stretches: tuple[_Stretch, ...]
    specs: tuple[tuple[tuple, int | tuple[int, ...] | None], ...]


def _keys(plan: Plan, contents: Sequence[str]) -> list[tuple]:
    """The cache key of each stretch of ``plan`` for these message contents (the hot loop: no calls)."""
    return [
        fixed
        if at is None
        else ((fixed, contents[at]) if type(at) is int else (fixed, *[contents[j] for j in at]))
        for fixed, at in plan.specs
    ]


class PieceEncoder:
    """Each message tokenised once: records assembled from cached stretches (see the module docstring).

    Its pairs are int32 arrays (what :func:`~kd_lightning.data.tokenized.tokenize_records` stores), the
    reference's lists; both compare equal through :func:`same_pair`.
    """

    name = "pieces"

    def __init__(self, tokenizer: PreTrainedTokenizerBase, cache_tokens: int = CACHE_TOKENS) -> None:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError("PieceEncoder needs a chat template; use ReferenceEncoder")
        self.tokenizer = tokenizer
        self.reference = ReferenceEncoder(tokenizer)
        self.reference_records = 0
        """Records this encoder handed to the reference (a shape the template does not compose)."""
        self._added = {str(text): int(i) for text, i in tokenizer.added_tokens_encoder.items() if text}
        ordered = sorted(self._added, key=len, reverse=True)  # the longest token wins, as in the tokenizer
        self._split = re.compile("(" + "|".join(map(re.escape, ordered)) + ")") if ordered else None
        self._plans: dict[tuple[tuple[str, ...], bool], Plan | None] = {}
        self._cache: OrderedDict[tuple, np.ndarray] = OrderedDict()
        self._cached_tokens, self._cache_tokens = 0, cache_tokens
        self._tokenize = _batch_tokenizer(tokenizer)
        self.strip = self._probe_strip()
        """Whether the template strips each message (Jinja's ``trim``); None: it places none verbatim."""

    def _probe_strip(self) -> bool | None:
        try:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": " \n" + _PLACEHOLDER.format(0) + "\n "}],
                tokenize=False,
                add_generation_prompt=True,
            )
        except Exception:  # a template that refuses a lone user message: the reference decides
            return None
        if " \n" + _PLACEHOLDER.format(0) + "\n " in text:
            return False
        return True if _PLACEHOLDER.format(0) in text else None

    def _plan(self, roles: tuple[str, ...], generation: bool) -> Plan | None:
        key = (roles, generation)
        if key not in self._plans:
            self._plans[key] = self._build_plan(roles, generation)
        return self._plans[key]

    def _build_plan(self, roles: tuple[str, ...], generation: bool) -> Plan | None:
        messages = [{"role": role, "content": _PLACEHOLDER.format(i)} for i, role in enumerate(roles)]
        try:
            text = self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=generation
            )
        except Exception:  # the reference raises the template's own error for such a record
            return None
        pieces = _PLACEHOLDER_SPLIT.split(text)
        if [int(i) for i in pieces[1::2]] != list(range(len(roles))):
            return None  # a message dropped, repeated or reordered: not a composition of pieces
        items: list[_Stretch] = []
        stretch: list[str | int] = []

        def close() -> None:
            if stretch:
                literals = tuple(None if isinstance(p, int) else p for p in stretch)
                items.append(_Stretch(literals, tuple(p for p in stretch if isinstance(p, int))))
                stretch.clear()

        for j, piece in enumerate(pieces):
            if j % 2:
                stretch.append(int(piece))
                continue
            for k, part in enumerate(self._split.split(piece) if self._split else [piece]):
                if k % 2:  # an added token: it ends the stretch before it and is one of its own
                    close()
                    items.append(_Stretch((part,), ()))
                elif part:
                    stretch.append(part)
        close()
        return Plan(tuple(items), tuple(item.key_spec() for item in items))

    def _contents(self, record: Record) -> tuple[tuple[str, ...], list[str]]:
        """The roles and contents of a record's prompt messages (as :func:`record_messages` lists them)."""
        user = record.instruction if not record.input else f"{record.instruction}\n\n{record.input}"
        roles = ("system",) * bool(record.system) + tuple(r for r, _ in record.history) + ("user",)
        contents = [record.system] * bool(record.system) + [c for _, c in record.history] + [user]
        return roles, [c.strip() for c in contents] if self.strip else contents

    def _fill(self, plans: list[Plan], keyed: list[list[tuple]]) -> None:
        """Tokenise, in one call, every stretch of these records that is not cached yet."""
        cache, needed, missing = self._cache, {}, {}
        for plan, keys in zip(plans, keyed):
            for item, key in zip(plan.stretches, keys):
                if key not in needed:
                    needed[key] = item
                    if key in cache:
                        cache.move_to_end(key)  # needed now: the eviction below never drops it
                    else:
                        missing[key] = item
        if not missing:
            return
        for key, ids in zip(missing, self._tokenize([item.text(key) for key, item in missing.items()])):
            cache[key] = np.asarray(ids, dtype=np.int32)  # 4 bytes a token
            self._cached_tokens += len(ids)
        while self._cached_tokens > self._cache_tokens and len(cache) > len(needed):
            _, dropped = cache.popitem(last=False)
            self._cached_tokens -= len(dropped)

    def _ids(self, keys: list[tuple]) -> np.ndarray:
        cache = self._cache
        return np.concatenate([cache[k] for k in keys])

    def encode(self, records: Sequence[Record]) -> list[Pair]:
        if self.strip is None:
            self.reference_records += len(records)
            return self.reference.encode(records)
        found: list[Pair | None] = [None] * len(records)
        for start in range(0, len(records), ENCODE_BATCH):
            batch, jobs, others, plans, keyed = records[start : start + ENCODE_BATCH], [], [], [], []
            for i, record in enumerate(batch):
                roles, contents = self._contents(record)
                prompt_plan, full_plan = self._plan(roles, True), self._plan((*roles, "assistant"), False)
                if prompt_plan is None or full_plan is None:
                    others.append(i)
                    continue
                response = record.response.strip() if self.strip else record.response
                prompt_keys, full_keys = _keys(prompt_plan, contents), _keys(full_plan, [*contents, response])
                jobs.append((i, prompt_keys, full_keys))
                plans += [prompt_plan, full_plan]
                keyed += [prompt_keys, full_keys]
            self._fill(plans, keyed)
            for i, prompt_keys, full_keys in jobs:
                prompt, full = self._ids(prompt_keys), self._ids(full_keys)
                if len(full) >= len(prompt) and np.array_equal(full[: len(prompt)], prompt):
                    found[start + i] = (prompt, full[len(prompt) :])
                else:  # tokenisation merged across the end of the prompt: the reference's rule
                    texts = reference_texts(batch[i], self.tokenizer)
                    pair = split_pair(self.tokenizer, texts, prompt.tolist(), full.tolist())
                    found[start + i] = (np.asarray(pair[0], np.int32), np.asarray(pair[1], np.int32))
            for i, pair in zip(others, self.reference.encode([batch[i] for i in others])):
                found[start + i] = pair
            self.reference_records += len(others)
        return found  # type: ignore[return-value]

    def prompt_length(self, record: Record) -> int:
        """Tokens of the record's prompt, summed from cached stretches (nothing is joined)."""
        roles, contents = self._contents(record)
        plan = self._plan(roles, True) if self.strip is not None else None
        if plan is None:
            return self.reference.prompt_length(record)
        keys = _keys(plan, contents)
        if any(key not in self._cache for key in keys):
            self._fill([plan], [keys])
        cache = self._cache
        return sum(len(cache[k]) for k in keys)


def same_pair(a: Pair, b: Pair) -> bool:
    """Whether two encoders gave a record the same prompt and response ids (lists or arrays)."""
    return all(
        np.array_equal(np.asarray(x, dtype=np.int64), np.asarray(y, dtype=np.int64)) for x, y in zip(a, b)
    )


Encoder = ReferenceEncoder | PieceEncoder


def _batch_tokenizer(tokenizer: PreTrainedTokenizerBase) -> Callable[[list[str]], list[list[int]]]:
    """A batch call without the special tokens: the Rust tokenizer's own (no per-call Python work, the
    batch spread over the cores) when the tokenizer has one, else the tokenizer's ``__call__``."""
    backend = getattr(tokenizer, "backend_tokenizer", None) if getattr(tokenizer, "is_fast", False) else None
    if backend is not None:
        batch = getattr(backend, "encode_batch_fast", None) or backend.encode_batch
        return lambda texts: [e.ids for e in batch(texts, add_special_tokens=False)]
    return lambda texts: tokenizer(texts, add_special_tokens=False)["input_ids"]


def chat_encoder(tokenizer: PreTrainedTokenizerBase) -> Encoder:
    """The piece encoder for a templated tokenizer, the reference otherwise (its texts have no pieces)."""
    return (
        PieceEncoder(tokenizer) if getattr(tokenizer, "chat_template", None) else ReferenceEncoder(tokenizer)
    )


@dataclass
class EncodingCheck:
    """How a build's ids were checked against the reference path."""

    checked: int = 0
    """Records compared with the reference."""
    mismatched: int = 0
    """Of those, records whose ids differ: any one sends the whole corpus to the reference."""
    reference_records: int = 0
    """Records encoded by the reference (all of them after a mismatch)."""


def encode_checked(
    records: Sequence[Record], encoder: Encoder, check_records: int | None = CHECK_RECORDS
) -> tuple[list[Pair], Encoder, EncodingCheck]:
    """Every record's ids by ``encoder``, with ``check_records`` of them (None: all) compared with the
    reference. On any difference the whole corpus is encoded by the reference, said once with the count;
    returns the pairs, the encoder that made them (for the records' later fitting) and the check."""
    handed_over = encoder.reference_records if isinstance(encoder, PieceEncoder) else 0
    pairs = encoder.encode(records)
    check = EncodingCheck()
    if not isinstance(encoder, PieceEncoder) or not records:
        check.reference_records = len(records)
        return pairs, encoder, check
    count = len(records) if check_records is None else min(check_records, len(records))
    sample = np.unique(np.linspace(0, len(records) - 1, count).round().astype(int)).tolist()
    expected = encoder.reference.encode([records[i] for i in sample])
    wrong = [i for i, pair in zip(sample, expected) if not same_pair(pairs[i], pair)]
    check.checked, check.mismatched = len(sample), len(wrong)
    if wrong:
        log.warning(
            "corpus: this chat template and tokenizer do not compose from message pieces: %d of %d checked "
            "records differ from the reference (first: record %d); encoding all %d records with the "
            "reference path (slower, same result as before)",
            len(wrong),
            len(sample),
            wrong[0],
            len(records),
        )
        check.reference_records = len(records)
        return encoder.reference.encode(records), encoder.reference, check
    check.reference_records = encoder.reference_records - handed_over
    if check.reference_records:
        log.warning(
            "corpus: %d of %d records have a template shape that does not place each message once; "
            "they were encoded by the reference path",
            check.reference_records,
            len(records),
        )
    return pairs, encoder, check
