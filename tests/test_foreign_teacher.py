"""A teacher of another tokenizer: response spans, the teacher's view of a corpus, the vocabulary match, the
cross-vocabulary terms against a real match, and ``ForeignTeacherDistillModule`` end to end.

Two tiny tokenizers with different merges (byte-level BPE vs ``▁`` + byte fallback) are built in-process
(``tests.test_cross_tokenizer``); models are tiny random Llamas."""

from __future__ import annotations

import itertools
import json

import numpy as np
import pytest
import torch

from kd_lightning.artifacts import build_events
from kd_lightning.data.cross_tokenizer import teacher_view
from kd_lightning.data.datamodule import SoftLabelDataset, collate
from kd_lightning.data.token_alignment import (
    VocabularyMatch,
    aligned_positions,
    match_vocabularies,
    response_spans,
    token_spans,
    token_strings,
)
from kd_lightning.data.tokenized import tokenize_records
from kd_lightning.losses import ForwardKL, GoldHybrid, HardCrossEntropy, UniversalLogitDistillation
from kd_lightning.models.builders import tiny_llama
from kd_lightning.modules.foreign_teacher import ForeignTeacherDistillModule
from kd_lightning.modules.teacher import OnlineTeacherDistillModule
from tests.helpers.batches import position_batch
from tests.helpers.tokenizers import RECORDS, byte_fallback_tokenizer, byte_level_tokenizer, random_texts


@pytest.fixture(scope="module")
def tokenizers_pair():
    return byte_level_tokenizer(400), byte_fallback_tokenizer(450)


def sgd(params):
    return torch.optim.SGD(params, lr=0.1)


def test_response_spans_follow_the_corpus_ids_with_end_tokens(tokenizers_pair):
    for tokenizer in tokenizers_pair:
        for text in random_texts(40, seed=3):
            plain = token_spans(tokenizer, text)
            ids = [*plain.ids.tolist(), tokenizer.eos_token_id]
            spans = response_spans(tokenizer, ids, text)
            assert np.array_equal(spans.starts[:-1], plain.starts) and spans.starts[-1] == len(text)
            assert spans.boundary[-1]


def test_response_spans_decode_ids_that_differ_from_the_plain_tokenization(tokenizers_pair):
    """A template can merge differently from the text alone: spans then come from decoded prefixes."""
    student, _ = tokenizers_pair
    text = "The quick brown fox"
    ids = [i for char in text for i in student(char)["input_ids"]]  # unmerged: not the plain tokenization
    assert ids != token_spans(student, text).ids.tolist()
    spans = response_spans(student, ids, text)
    assert spans.boundary.all()
    decoded = [student.decode(ids[:k]) for k in range(len(ids))]
    assert [len(d) for d in decoded] == spans.starts.tolist()


def test_end_of_turn_tokens_pair_up(tokenizers_pair):
    student, teacher = tokenizers_pair
    text = "Distillation trains a small student."
    s = response_spans(student, [*token_spans(student, text).ids.tolist(), 0], text)
    t = response_spans(teacher, [*token_spans(teacher, text).ids.tolist(), 0, 0], text)
    pairs = aligned_positions(s, t)
    assert pairs[-1].tolist() == [len(s.ids) - 1, len(t.ids) - 2]
    assert (pairs[:, 0] < len(s.ids)).all() and pairs[0].tolist() == [0, 0]


def test_teacher_view_of_the_same_tokenizer_is_the_identity(tokenizers_pair):
    tokenizer, _ = tokenizers_pair
    corpus = tokenize_records(RECORDS, tokenizer, 256)
    view = teacher_view(corpus, {r.key: r for r in RECORDS}, tokenizer, tokenizer, 256)
    assert np.array_equal(view.corpus.tokens, corpus.tokens) and view.coverage == 1.0
    expected = np.concatenate(
        [np.arange(corpus.prompt_lens[i] - 1, len(corpus.sequence(i)) - 1) for i in range(len(corpus))]
    )
    assert np.array_equal(view.teacher_positions, expected)


def test_teacher_view_across_tokenizers_maps_positions_that_read_the_same_text(tokenizers_pair):
    student, teacher = tokenizers_pair
    corpus = tokenize_records(RECORDS, student, 256)
    view = teacher_view(corpus, {r.key: r for r in RECORDS}, student, teacher, 256)
    assert 0.3 < view.coverage < 1.0
    offsets = corpus.target_offsets()
    for i, record in enumerate(RECORDS):
        rows = view.teacher_positions[offsets[i] : offsets[i + 1]]
        s_seq, t_seq = corpus.sequence(i), view.corpus.sequence(i)
        s_prompt, t_prompt = int(corpus.prompt_lens[i]), int(view.corpus.prompt_lens[i])
        for k, j in enumerate(rows):
            if j < 0:
                continue
            # the response text each side has read before predicting is the same
            s_read = student.decode(s_seq[s_prompt : s_prompt + k].tolist())
            t_read = teacher.decode(t_seq[t_prompt : j + 1].tolist())
            assert s_read.replace(" ", "") == t_read.replace(" ", "")
            assert record.response.replace(" ", "").startswith(s_read.replace(" ", ""))


def test_vocabulary_match_spells_the_same_strings(tokenizers_pair):
    student, teacher = tokenizers_pair
    same = match_vocabularies(student, student)
    strings = token_strings(student)
    assert np.array_equal(same.student_ids, same.teacher_ids)
    assert len(same.student_ids) == len({s for s in strings if s is not None})
    match = match_vocabularies(student, teacher)
    s_strings, t_strings = token_strings(student), token_strings(teacher)
    assert 20 < len(match.student_ids) < min(len(student), len(teacher))
    for i, j in zip(match.student_ids, match.teacher_ids):
        assert s_strings[i] == t_strings[j] is not None
    assert " fox" in {s_strings[i] for i in match.student_ids}  # "Ġfox" and "▁fox" spell the same string
    assert len(set(match.student_ids.tolist())) == len(match.student_ids)


def test_gold_hybrid_against_a_real_match():
    """Matched part is the JSD over matched tokens + one shared bucket; unmatched is ULD; TRL's weights."""
    match = VocabularyMatch(np.array([0, 2, 3]), np.array([4, 0, 1]), 5, 6)
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(1, 3, 5, generator=g), torch.randn(1, 3, 6, generator=g)
    term = GoldHybrid(beta=0.0)  # forward KL on the matched part
    term.set_vocabulary_match(match)
    batch = {"target_ids": torch.zeros(1, 3, dtype=torch.long), "teacher_logits": teacher}
    q, p = torch.softmax(student, -1)[0], torch.softmax(teacher, -1)[0]
    pb = torch.stack([p[:, 4], p[:, 0], p[:, 1], p[:, [2, 3, 5]].sum(-1)], -1)
    qb = torch.stack([q[:, 0], q[:, 2], q[:, 3], q[:, [1, 4]].sum(-1)], -1)
    kl = (pb * (pb / qb).log()).sum(-1)
    q_rest = torch.nn.functional.pad(q[:, [1, 4]].sort(-1, descending=True).values, (0, 1))
    uld_part = (q_rest - p[:, [2, 3, 5]].sort(-1, descending=True).values).abs().sum(-1)
    expected = (3 / 6 * kl + 3 / 6 * uld_part).mean()
    torch.testing.assert_close(term(student, position_batch(batch)), expected, atol=1e-5, rtol=1e-5)
    fixed = GoldHybrid(beta=0.0, matched_weight=1.0, unmatched_weight=0.0)
    fixed.set_vocabulary_match(match)
    torch.testing.assert_close(fixed(student, position_batch(batch)), kl.mean(), atol=1e-5, rtol=1e-5)
    # a sparse store with every teacher id equals the dense teacher
    probs, ids = torch.softmax(teacher, -1).sort(-1, descending=True)
    sparse = {"target_ids": batch["target_ids"], "teacher_ids": ids, "teacher_probs": probs}
    sparse["teacher_tail"] = torch.zeros(1, 3)
    torch.testing.assert_close(term(student, position_batch(sparse)), expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="both"):
        GoldHybrid(matched_weight=0.5)
    with pytest.raises(ValueError, match="vocabulary match"):
        GoldHybrid()(student, position_batch(batch))


def foreign_setup(student_tok, teacher_tok, terms, **settings):
    corpus = tokenize_records(RECORDS, student_tok, 256)
    view = teacher_view(corpus, {r.key: r for r in RECORDS}, student_tok, teacher_tok, 256)
    dataset = SoftLabelDataset(corpus, teacher=view)
    batch = collate([dataset[i] for i in range(len(dataset))], pad_id=0)
    module = ForeignTeacherDistillModule(
        tiny_llama(len(student_tok), seed=1),
        tiny_llama(len(teacher_tok), seed=2),
        terms,
        sgd,
        tokenizer=student_tok,
        teacher_tokenizer=teacher_tok,
        **settings,
    )
    return module, batch, view


@pytest.mark.parametrize("loss", ["uld", "gold_hybrid"])
def test_foreign_teacher_trains_the_student_and_leaves_the_teacher(tokenizers_pair, loss):
    student_tok, teacher_tok = tokenizers_pair
    term = UniversalLogitDistillation() if loss == "uld" else GoldHybrid()
    module, batch, view = foreign_setup(student_tok, teacher_tok, {"hard_ce": HardCrossEntropy(), loss: term})
    teacher_before = [p.clone() for p in module.teacher.parameters()]
    logits, packed = module.student_logits(batch)
    aligned = packed.prepared["teacher_aligned"]
    assert packed.teacher_logits.shape == (1, logits.shape[1], len(teacher_tok))
    assert aligned.float().mean().item() == pytest.approx(view.coverage, abs=1e-6)
    values = module.compute_terms(logits, packed)
    value = values[loss][1]
    assert torch.isfinite(value) and value > 0
    value.backward()
    grads = [p.grad for p in module.student.parameters() if p.grad is not None]
    assert grads and all(torch.isfinite(g).all() for g in grads)
    assert all(p.grad is None for p in module.teacher.parameters())
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, module.teacher.parameters()))
    assert "teacher" not in "".join(module.state_dict())
    # a few optimizer steps on this batch lower the term: the gradients train the student
    optimizer = module.configure_optimizers()
    losses = []
    for _ in range(8):
        optimizer.zero_grad()
        logits, packed = module.student_logits(batch)
        term_value = module.compute_terms(logits, packed)[loss][1]
        term_value.backward()
        optimizer.step()
        losses.append(float(term_value.detach()))
    assert all(b < a for a, b in itertools.pairwise(losses)), losses  # every step lowers it
    assert all(torch.equal(a, b) for a, b in zip(teacher_before, module.teacher.parameters()))


def test_same_tokenizer_through_the_foreign_path_equals_the_online_teacher(tokenizers_pair):
    """With one tokenizer on both sides, every position aligns to itself: the teacher logits, and so ULD, are
    those of the plain online teacher."""
    tokenizer, _ = tokenizers_pair
    terms = {"uld": UniversalLogitDistillation()}
    module, batch, view = foreign_setup(tokenizer, tokenizer, terms)
    online = OnlineTeacherDistillModule(module.student, module.teacher, terms, sgd, tokenizer=tokenizer)
    mask = batch.target_mask
    foreign, plain = module.pack_positions(batch, mask), online.pack_positions(batch, mask)
    assert view.coverage == 1.0
    torch.testing.assert_close(foreign.teacher_logits, plain.teacher_logits, atol=1e-5, rtol=1e-5)
    logits, _ = module.student_logits(batch)
    torch.testing.assert_close(terms["uld"](logits, foreign), terms["uld"](logits, plain))


def test_single_vocabulary_terms_and_packing_are_refused(tokenizers_pair):
    student_tok, teacher_tok = tokenizers_pair
    with pytest.raises(ValueError, match="loss=\\[hard_ce,uld\\]"):
        foreign_setup(student_tok, teacher_tok, {"forward_kl": ForwardKL("teacher")})
    corpus = tokenize_records(RECORDS, student_tok, 256)
    view = teacher_view(corpus, {r.key: r for r in RECORDS}, student_tok, teacher_tok, 256)
    dataset = SoftLabelDataset(corpus, teacher=view)
    with pytest.raises(ValueError, match="packing=false"):
        collate([dataset[i] for i in range(3)], pad_id=0, packing=True, pack_length=4096)


def test_kdl_distill_with_a_teacher_of_another_vocabulary(kdl_env, tiny_dir):
    """From the command line: a teacher whose vocabulary orders the characters differently (every id moves)
    is refused by the same-vocabulary module and trains the student through module=foreign_teacher."""
    from kd_lightning.models.tiny_assets import char_tokenizer
    from tests.helpers.cli import artifacts, kdl

    tokenizer = char_tokenizer(specials_first=False)
    folder = kdl_env / "foreign_teacher"
    tiny_llama(len(tokenizer), seed=5).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    teacher = ["teacher=local", f"teacher.path={folder}"]
    refused = kdl(
        "distill", "experiment=tiny", *teacher, "module=online_teacher", "loss=[hard_ce,forward_kl]",
        "kd_target=teacher", env_dir=kdl_env, check=False,
    )  # fmt: skip
    assert refused.returncode == 1 and "Traceback" not in refused.stderr
    assert "maps tokens to ids differently from the student's" in refused.stderr.strip().splitlines()[-1]
    assert "module=foreign_teacher" in refused.stderr
    for loss in ("uld", "gold_hybrid"):
        done = kdl(
            "distill", "experiment=tiny", *teacher, "module=foreign_teacher", f"loss=[hard_ce,{loss}]",
            env_dir=kdl_env,
        )  # fmt: skip
        assert "100.0% of the student's target positions aligned" in done.stderr + done.stdout
    students = artifacts(kdl_env, "distill")
    assert len(students) == 2
    kdl("distill", "experiment=tiny", "loss=[hard_ce]", "trainer.max_steps=0", env_dir=kdl_env)  # the start
    (untrained,) = [s for s in artifacts(kdl_env, "distill") if s not in students]
    start_nll = json.loads((untrained / "result.json").read_text())["nll"]
    for student in students:  # each trained: optimizer steps taken, and its held-out NLL below the start
        (train,) = build_events(student, "train")
        assert train["end_step"] > train["start_step"] == 0
        assert json.loads((student / "result.json").read_text())["nll"] < start_nll


def test_offline_store_of_a_foreign_teacher_holds_its_rows_at_aligned_positions(tokenizers_pair, tmp_path):
    """kdl teacher-logits with own_tokenizer: the rows are the teacher's (its ids) at the aligned student
    positions, unaligned rows hold no entry; ULD on the store (k = the teacher's vocabulary) equals ULD on the
    online foreign teacher."""
    from kd_lightning.data.soft_labels import SoftLabelStore
    from kd_lightning.estimation.teacher_targets import TeacherTargetBuilder

    student_tok, teacher_tok = tokenizers_pair
    module, batch, view = foreign_setup(student_tok, teacher_tok, {"uld": UniversalLogitDistillation()})
    corpus = tokenize_records(RECORDS, student_tok, 256)
    builder = TeacherTargetBuilder(k=len(teacher_tok), batch_size=2, shard_size=2, own_tokenizer=True)
    store = builder.estimate(module.teacher, corpus, 0, str(tmp_path / "t"), {"kind": "test"}, view)
    assert isinstance(store, SoftLabelStore) and np.array_equal(store.offsets, corpus.target_offsets())
    unaligned = view.teacher_positions < 0
    assert (np.asarray(store.probs)[unaligned] == 0).all() and (np.asarray(store.tail)[unaligned] == 1).all()
    dataset = SoftLabelDataset(corpus, {"offline_teacher": store}, teacher=view)
    batch = collate([dataset[i] for i in range(len(dataset))], pad_id=0, store_names=("offline_teacher",))
    logits, online = module.student_logits(batch)
    offline = UniversalLogitDistillation("offline_teacher")
    torch.testing.assert_close(
        offline(logits, online), module.loss_terms["uld"](logits, online), atol=2e-3, rtol=2e-3
    )


def test_kdl_teacher_logits_and_distill_from_a_foreign_teacher_store(kdl_env, tiny_dir):
    from kd_lightning.models.tiny_assets import char_tokenizer
    from tests.helpers.cli import artifacts, kdl

    tokenizer = char_tokenizer(specials_first=False)
    folder = kdl_env / "foreign_teacher"
    tiny_llama(len(tokenizer), seed=5).save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    teacher = ["teacher=local", f"teacher.path={folder}", "estimator.teacher_targets.own_tokenizer=true"]
    kdl("teacher-logits", "experiment=tiny", *teacher, env_dir=kdl_env)
    assert len(artifacts(kdl_env, "teacher_logits")) == 1
    for loss in ("uld", "gold_hybrid"):
        kdl(
            "distill", "experiment=tiny", *teacher, f"loss=[hard_ce,{loss}]", f"loss.{loss}.kd_target=offline_teacher",
            env_dir=kdl_env,
        )  # fmt: skip
    refused = kdl(
        "distill", "experiment=tiny", *teacher, "loss=[hard_ce,forward_kl]", "kd_target=offline_teacher",
        env_dir=kdl_env, check=False,
    )  # fmt: skip
    assert refused.returncode != 0 and "teacher's own vocabulary" in refused.stderr + refused.stdout
    assert "Traceback" not in refused.stderr
    assert len(artifacts(kdl_env, "distill")) == 2
