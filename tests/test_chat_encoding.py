"""The corpus build from message pieces (each message tokenised once) against the reference path (each record's
template rendered and tokenised whole): the same ids on every record of the shipped corpora, on multi-turn
records with system prompts and trimmed history, on templates that strip, and the reference taken (and
counted) where a template does not compose."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from kd_lightning.data.chat_encoding import (
    PieceEncoder,
    ReferenceEncoder,
    chat_encoder,
    encode_checked,
    same_pair,
)
from kd_lightning.data.records import Record, load_records, split_records
from kd_lightning.data.tokenized import TokenizedCorpus, tokenize_records
from kd_lightning.models.tiny_assets import char_tokenizer
from tests.helpers.assets import requires_real_assets
from tests.helpers.tokenizers import SPECIAL, byte_fallback_tokenizer, byte_level_tokenizer, random_texts

CHATML = (
    "{% for m in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are helpful.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + '<|im_end|>' + '\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
TRIMMING = (  # as Llama 3's template: every message stripped
    "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n\n' + m['content'] | trim + '<|im_end|>' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n\n' }}{% endif %}"
)


def same_corpus(a: TokenizedCorpus, b: TokenizedCorpus) -> None:
    for name in ("tokens", "offsets", "prompt_lens"):
        np.testing.assert_array_equal(getattr(a, name), getattr(b, name), err_msg=name)
    assert a.record_keys == b.record_keys
    assert {k: v for k, v in a.report.__dict__.items() if k != "encoding"} == {
        k: v for k, v in b.report.__dict__.items() if k != "encoding"
    }


def both_paths(records: list[Record], tokenizer, max_seq_len: int) -> tuple[TokenizedCorpus, TokenizedCorpus]:
    pieces = tokenize_records(records, tokenizer, max_seq_len, check_records=None)
    reference = tokenize_records(
        records, tokenizer, max_seq_len, encoder=ReferenceEncoder(tokenizer), check_records=0
    )
    return pieces, reference


def conversations(n: int, seed: int = 0, system_every: int = 3) -> list[Record]:
    """Multi-turn records as ShareGPT yields them: every answer of a conversation is a record, some with a
    system prompt, contents with leading/trailing whitespace, newlines, emoji and a special token's text."""
    texts = random_texts(12 * n, seed)
    texts[5] = f"a literal {SPECIAL} inside a message"
    texts[7] = "\n\n  starts and ends with whitespace  \n"
    records = []
    for c in range(n):
        system = "Be brief.\n" if c % system_every == 0 else ""
        history: tuple[tuple[str, str], ...] = ()
        for t in range(1 + c % 5):
            question, answer = texts[12 * c + 2 * t], texts[12 * c + 2 * t + 1] or "ok"
            records.append(Record(instruction=question, response=answer, system=system, history=history))
            history = (*history, ("user", question), ("assistant", answer))
    return records


def tokenizer_with(template: str, tokenizer):
    tokenizer.chat_template = template
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>"]})
    return tokenizer


@pytest.mark.parametrize(
    ("name", "make"),
    [
        ("char/own template", lambda: char_tokenizer()),
        ("byte-level BPE/ChatML", lambda: tokenizer_with(CHATML, byte_level_tokenizer(300))),
        ("byte-fallback BPE/ChatML", lambda: tokenizer_with(CHATML, byte_fallback_tokenizer(300))),
        ("byte-level BPE/trimming", lambda: tokenizer_with(TRIMMING, byte_level_tokenizer(300))),
    ],
)
def test_pieces_equal_the_reference_on_every_multi_turn_record(name, make):
    tokenizer = make()
    records = conversations(40)
    for cap in (48, 96, 4096):  # history trimmed to fit, truncated answers, and nothing cut
        pieces, reference = both_paths(records, tokenizer, cap)
        same_corpus(pieces, reference)
        assert pieces.report.encoding == {
            "path": "pieces", "checked": len(records), "mismatched": 0, "reference_records": 0
        }  # fmt: skip
    assert PieceEncoder(tokenizer).strip is ("trimming" in name)


def test_a_small_cache_gives_the_same_ids():
    tokenizer = tokenizer_with(CHATML, byte_level_tokenizer(300))
    records = conversations(30, seed=1)
    small = PieceEncoder(tokenizer, cache_tokens=64)  # evicts all the time, never what a batch still needs
    pairs, _, check = encode_checked(records, small, check_records=None)
    reference = ReferenceEncoder(tokenizer).encode(records)
    assert all(same_pair(a, b) for a, b in zip(pairs, reference, strict=True)) and check.mismatched == 0
    assert small._cached_tokens <= max(64, max(len(v) for v in small._cache.values()) * len(small._cache))


def test_a_template_that_changes_contents_falls_back_to_the_reference_and_says_so(caplog):
    tokenizer = tokenizer_with(
        CHATML.replace("m['content']", "m['content'] | replace('e', 'E')"), byte_level_tokenizer(300)
    )
    records = conversations(20, seed=2)
    with caplog.at_level(logging.WARNING):
        pieces, reference = both_paths(records, tokenizer, 96)
    same_corpus(pieces, reference)
    assert pieces.report.encoding["path"] == "reference"
    assert pieces.report.encoding["mismatched"] > 0
    assert pieces.report.encoding["reference_records"] == len(records)
    assert (
        "do not compose from message pieces" in caplog.text and f"all {len(records)} records" in caplog.text
    )


def test_a_template_that_drops_a_message_sends_those_records_to_the_reference_and_counts_them(caplog):
    drops_system = CHATML.replace(
        "{% for m in messages %}", "{% for m in messages if m['role'] != 'system' %}", 1
    )
    tokenizer = tokenizer_with(drops_system, byte_level_tokenizer(300))
    records = conversations(12, seed=3, system_every=2)
    with_system = sum(bool(r.system) for r in records)
    with caplog.at_level(logging.WARNING):
        pieces, reference = both_paths(records, tokenizer, 4096)
    same_corpus(pieces, reference)
    assert pieces.report.encoding == {
        "path": "pieces", "checked": len(records), "mismatched": 0, "reference_records": with_system
    }  # fmt: skip
    assert f"{with_system} of {len(records)} records have a template shape" in caplog.text


def test_a_tokenizer_without_a_template_uses_the_reference():
    tokenizer = char_tokenizer()
    tokenizer.chat_template = None
    assert isinstance(chat_encoder(tokenizer), ReferenceEncoder)
    corpus = tokenize_records(conversations(5), tokenizer, 96)
    assert corpus.report.encoding["path"] == "reference"


@requires_real_assets
@pytest.mark.parametrize("source", ["alpaca_gpt35", "smollm2_self_instruct"])
def test_every_record_of_a_shipped_corpus_equals_the_reference(source):
    from kd_lightning.models.loading import load_tokenizer

    tokenizer = load_tokenizer("smollm2")
    records = load_records(source, None, {})
    pieces, reference = both_paths(records, tokenizer, 512)
    same_corpus(pieces, reference)
    assert pieces.report.encoding["path"] == "pieces" and pieces.report.encoding["checked"] == len(records)


@requires_real_assets
def test_sharegpt_conversations_equal_the_reference_with_both_cuts():
    """The first 1,500 training answers of ShareGPT (multi-turn, system prompts, history trimmed to fit):
    the whole corpus is compared by ``benchmarks/bench_corpus.py`` (16 minutes of reference path)."""
    from kd_lightning.models.loading import load_tokenizer

    tokenizer = load_tokenizer("smollm2")
    train, _ = split_records(load_records("sharegpt", None, {}), 200)
    records = train[:1500]
    assert sum(bool(r.history) for r in records) > 1000
    for cap in (512, 2048):
        pieces, reference = both_paths(records, tokenizer, cap)
        same_corpus(pieces, reference)
        assert pieces.report.history_trimmed > 100
