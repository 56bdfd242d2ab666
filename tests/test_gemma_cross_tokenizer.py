"""Integration: the real pair, SmolLM2 (student tokenizer) and Gemma 3 270M (262,144 tokens, another family),
on the shipped gpt-3.5 text. Slow: loads Gemma (in CI a missing asset is an error, not a skip)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kd_lightning.data.cross_tokenizer import teacher_view
from kd_lightning.data.datamodule import SoftLabelDataset, collate
from kd_lightning.data.records import load_records
from kd_lightning.data.token_alignment import first_token_map, match_vocabularies
from kd_lightning.data.tokenized import tokenize_records
from kd_lightning.losses import GoldHybrid, HardCrossEntropy, UniversalLogitDistillation
from kd_lightning.models.builders import layer_selected_student
from kd_lightning.models.loading import load_causal_lm, load_tokenizer
from kd_lightning.modules.foreign_teacher import ForeignTeacherDistillModule
from tests.helpers.assets import requires_real_assets

pytestmark = [pytest.mark.slow, requires_real_assets]


@pytest.fixture(scope="module")
def pair():
    return load_tokenizer("smollm2"), load_tokenizer("gemma3_270m")


def test_real_tokenizers_align_most_positions_and_match_most_strings(pair):
    student, gemma = pair
    records = load_records("alpaca_gpt35")[:60]
    corpus = tokenize_records(records, student, 256)
    by_key = {}
    for record in records:
        by_key.setdefault(record.key, []).append(record)
    view = teacher_view(corpus, by_key, student, gemma, 256)
    assert view.coverage > 0.9  # measured 0.955 on 200 records
    assert gemma.decode(view.corpus.sequence(0)[: int(view.corpus.prompt_lens[0])]).startswith("<bos>")
    match = match_vocabularies(student, gemma)
    assert len(match.student_ids) > 40_000  # 46,031 of the student's 49,152 strings are Gemma tokens too
    table = first_token_map(student, gemma)
    the = gemma(" the", add_special_tokens=False)["input_ids"][0]
    assert student.decode([int(table[the])]) == " the"
    assert table[gemma.eos_token_id] == student.eos_token_id


def test_one_step_from_gemma_into_a_smollm2_student(pair):
    student_tok, gemma_tok = pair
    records = load_records("alpaca_gpt35")[:4]
    corpus = tokenize_records(records, student_tok, 128)
    view = teacher_view(corpus, {r.key: r for r in records}, student_tok, gemma_tok, 128)
    dataset = SoftLabelDataset(corpus, teacher=view)
    batch = collate([dataset[i] for i in range(2)], pad_id=student_tok.pad_token_id)
    teacher = load_causal_lm("gemma3_270m")
    student = layer_selected_student("smollm2", [0, 29])
    terms = {"hard_ce": HardCrossEntropy(), "uld": UniversalLogitDistillation(), "gold_hybrid": GoldHybrid()}
    module = ForeignTeacherDistillModule(
        student,
        teacher,
        terms,
        lambda params: torch.optim.SGD(params, lr=0.0),
        tokenizer=student_tok,
        teacher_tokenizer=gemma_tok,
    )
    logits, packed = module.student_logits(batch)
    assert packed.teacher_logits.shape[-1] == teacher.config.vocab_size == 262_144
    values = module.compute_terms(logits, packed)
    assert all(torch.isfinite(v) and v > 0 for _, v in values.values())
    sum(w * v for w, v in values.values()).backward()
    assert all(p.grad is None for p in module.teacher.parameters())
    assert np.isclose(packed.prepared["teacher_aligned"].float().mean().item(), 1.0, atol=0.2)
