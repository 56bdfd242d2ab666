"""Records, split, tokenisation reports, and DataModule alignment of soft labels."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kd_lightning.data.datamodule import TeacherTextDataModule
from kd_lightning.data.records import CorpusError, Record, read_jsonl, split_records
from kd_lightning.data.soft_labels import write_store
from kd_lightning.data.tokenized import TokenizedCorpus, tokenize_records
from kd_lightning.estimation.ngram import NGramPriorEstimator
from kd_lightning.losses.functional import IGNORE_INDEX
from kd_lightning.models.loading import load_tokenizer


def test_malformed_jsonl_line_names_file_and_line(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"instruction": "a", "response": "b"}\n{"instruction": "a", "resp\n')
    with pytest.raises(CorpusError, match=r"c\.jsonl:2: malformed JSON"):
        read_jsonl(path)


def test_missing_field_names_file_line_and_fix(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text('{"instruction": "a", "answer": "b"}\n')
    with pytest.raises(CorpusError, match=r"c\.jsonl:1: record has no 'response'.*data\.fields\.response"):
        read_jsonl(path)
    assert read_jsonl(path, fields={"response": "answer"})[0].response == "b"


def test_alpaca_output_field_is_accepted(tmp_path):
    path = tmp_path / "c.jsonl"
    path.write_text(json.dumps({"instruction": "a", "input": "x", "output": "b", "generator": "g"}) + "\n")
    rec = read_jsonl(path)[0]
    assert (rec.instruction, rec.input, rec.response, rec.meta["generator"]) == ("a", "x", "b", "g")


def test_split_is_deterministic_and_order_independent():
    records = [Record(instruction=f"q{i}", response="r") for i in range(50)]
    train, held = split_records(records, 10)
    _train2, held2 = split_records(list(reversed(records)), 10)
    assert {r.instruction for r in held} == {r.instruction for r in held2}
    assert len(train) == 40 and len(held) == 10
    with pytest.raises(CorpusError, match="heldout_size"):
        split_records(records, 50)


def test_empty_and_overlong_records_are_counted_not_dropped_silently(tiny_dir, caplog):
    tok = load_tokenizer(tiny_dir)
    records = [
        Record("say hi.", "hi."),
        Record("say hi.", "   "),
        Record("say hi.", "x" * 200),
        Record("q" * 300, "a"),
    ]
    corpus = tokenize_records(records, tok, max_seq_len=64)
    report = corpus.report
    assert (report.records, report.kept, report.empty_response, report.truncated, report.prompt_too_long) == (
        4,
        2,
        1,
        1,
        1,
    )
    assert "1 with an empty response" in report.summary()
    assert max(np.diff(corpus.offsets)) <= 64
    assert "records kept" in caplog.text


def test_prompt_is_masked_and_response_ends_with_end_token(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    corpus = tokenize_records([Record("count 2 from 1.", "1 2.")], tok, 96)
    seq, pl = corpus.sequence(0), corpus.prompt_lens[0]
    assert tok.decode(seq[pl:]).replace(" ", "") == "12.<|end|>"
    assert corpus.num_targets(0) == len(seq) - pl


def test_datamodule_soft_label_t_describes_token_t_plus_1(tiny_dir, tmp_path):
    tok = load_tokenizer(tiny_dir)
    corpus = tokenize_records(read_jsonl(tiny_dir / "corpus.jsonl")[:10], tok, 96)
    # gamma huge -> prior is one-hot on the observed next token
    rows, _ = NGramPriorEstimator(ngram_order=3, gamma=1e9, top_k=4).estimate(corpus, len(tok))
    store = write_store(tmp_path / "prior", rows, corpus.target_offsets(), {})
    dm = TeacherTextDataModule(batch_size=4).connect(tok.pad_token_id, corpus, stores={"prior": store})
    batch = next(iter(dm.train_dataloader()))
    mask = batch.target_ids != IGNORE_INDEX
    top = batch.soft_labels["prior"].ids[..., 0]
    assert torch.equal(top[mask], batch.target_ids[mask])
    # target t is input t+1 (where both exist)
    assert torch.equal(batch.target_ids[:, :-1][mask[:, :-1]], batch.input_ids[:, 1:][mask[:, :-1]])
    # padding and prompt positions carry no soft-label mass
    assert batch.soft_labels["prior"].probs[~mask].abs().sum() == 0
    # attention covers exactly the real tokens: every target position is attended
    assert batch.attention_mask[mask].all()


def test_store_for_another_corpus_is_refused(tiny_dir, tmp_path):
    tok = load_tokenizer(tiny_dir)
    records = read_jsonl(tiny_dir / "corpus.jsonl")
    a = tokenize_records(records[:10], tok, 96)
    b = tokenize_records(records[10:20], tok, 96)
    rows, _ = NGramPriorEstimator(ngram_order=2, top_k=4).estimate(a, len(tok))
    store = write_store(tmp_path / "prior", rows, a.target_offsets(), {})
    with pytest.raises(ValueError, match="built for another corpus"):
        TeacherTextDataModule().connect(tok.pad_token_id, b, stores={"prior": store})


def test_tokenized_corpus_save_load_round_trip(tiny_dir, tmp_path):
    tok = load_tokenizer(tiny_dir)
    corpus = tokenize_records(read_jsonl(tiny_dir / "corpus.jsonl")[:5], tok, 96)
    corpus.save(tmp_path / "c")
    again = TokenizedCorpus.load(tmp_path / "c")
    assert again.fingerprint == corpus.fingerprint and again.report.kept == 5
