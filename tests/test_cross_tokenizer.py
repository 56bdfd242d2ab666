"""Cross-tokenizer pieces: aligning two tokenizations of one text, and ULD across vocabularies.

Two tiny tokenizers with different merges are built in-process: a GPT-2-style byte-level BPE (whitespace
folded into the next token) and a Llama/Gemma-style BPE with ``▁`` word markers and byte fallback."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kd_lightning.data.token_alignment import align_spans, align_tokenizations, token_spans
from kd_lightning.losses import uld, uld_per_position
from tests.helpers.tokenizers import (
    CORPUS,
    SPECIAL,
    byte_fallback_tokenizer,
    byte_level_tokenizer,
    random_texts,
)


@pytest.fixture(scope="module")
def tokenizers_pair():
    return byte_level_tokenizer(400), byte_fallback_tokenizer(450)


def test_spans_tile_the_text_exactly_once(tokenizers_pair):
    for tokenizer in tokenizers_pair:
        for text in [*random_texts(200), *CORPUS[:4], f"done.{SPECIAL}"]:
            spans = token_spans(tokenizer, text)
            assert spans.starts[0] == 0 and spans.ends[-1] == len(text)
            assert np.array_equal(spans.starts[1:], spans.ends[:-1])  # contiguous, no overlap
            assert (spans.ends >= spans.starts).all() and (spans.ends - spans.starts).sum() == len(text)


def test_byte_fallback_pieces_of_one_character_are_not_boundaries(tokenizers_pair):
    _, fallback = tokenizers_pair
    spans = token_spans(fallback, "a😀b")
    pieces = [fallback.convert_ids_to_tokens(int(i)) for i in spans.ids]
    assert sum(p.startswith("<0x") for p in pieces) == 4  # the emoji's 4 UTF-8 bytes
    assert spans.boundary.sum() == len(spans.ids) - 3  # only its first byte starts at a boundary
    starts = spans.starts[spans.boundary]
    assert list(starts) == sorted(set(starts.tolist()))  # no two boundary tokens start at one character


def test_the_same_tokenizer_aligns_every_position_to_itself(tokenizers_pair):
    for tokenizer in tokenizers_pair:
        for text in random_texts(50, seed=1):
            alignment = align_tokenizations(text, tokenizer, tokenizer)
            boundary = np.flatnonzero(alignment.student.boundary)
            assert np.array_equal(alignment.pairs[:, 0], boundary)
            assert np.array_equal(alignment.pairs[:, 0], alignment.pairs[:, 1])


def test_different_tokenizers_align_at_shared_boundaries_and_spell_each_other(tokenizers_pair):
    student, teacher = tokenizers_pair
    text = "Tokenizers of different families split unbelievable words 😀 differently."
    alignment = align_tokenizations(text, student, teacher)
    assert 0 < len(alignment.pairs) < len(alignment.student.ids)  # some positions align, not all
    for (i, j), spelled in zip(alignment.pairs, alignment.spelled_by):
        assert alignment.student.starts[i] == alignment.teacher.starts[j]  # same prefix text
        assert spelled[0] == j
        # the spelled teacher tokens cover the text up to the next shared boundary, no more
        assert (
            alignment.teacher.starts[spelled[-1]] < alignment.teacher.ends[spelled[-1]] or len(spelled) == 1
        )
    # the text between consecutive shared boundaries decodes the same on both sides
    s_cuts = [*alignment.student.starts[alignment.pairs[:, 0]].tolist(), len(text)]
    for k in range(len(alignment.pairs)):
        piece = text[s_cuts[k] : s_cuts[k + 1]]
        j = list(alignment.spelled_by[k])
        assert "".join(text[alignment.teacher.starts[t] : alignment.teacher.ends[t]] for t in j) == piece


def test_alignment_refuses_tokenizations_of_different_texts(tokenizers_pair):
    a, b = tokenizers_pair
    with pytest.raises(ValueError, match="same text"):
        align_spans(token_spans(a, "abc"), token_spans(b, "abcd"))


def test_uld_is_the_sorted_l1_distance_with_zero_padding():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(3, 5, 11, generator=g), torch.randn(3, 5, 7, generator=g)
    expected = np.zeros((3, 5))
    p_s, p_t = torch.softmax(student, -1).numpy(), torch.softmax(teacher, -1).numpy()
    for b in range(3):
        for t in range(5):
            a = np.sort(p_s[b, t])[::-1]
            c = np.concatenate([np.sort(p_t[b, t])[::-1], np.zeros(4)])
            expected[b, t] = np.abs(a - c).sum()
    torch.testing.assert_close(uld_per_position(student, teacher).double(), torch.from_numpy(expected))
    mask = torch.rand(3, 5, generator=g) > 0.4
    torch.testing.assert_close(
        uld(student, teacher, mask).double(), torch.tensor(expected[mask.numpy()].mean(), dtype=torch.float64)
    )


def test_uld_properties():
    g = torch.Generator().manual_seed(1)
    logits = torch.randn(4, 9, generator=g)
    assert uld(logits, logits).abs() < 1e-6  # equal distributions
    assert (
        uld(logits, logits[:, torch.randperm(9, generator=g)]).abs() < 1e-6
    )  # blind to which token is which
    assert (
        uld(logits, torch.cat([logits, torch.full((4, 3), -1e4)], -1)).abs() < 1e-5
    )  # padding ids cost nothing
    student = torch.randn(4, 9, generator=g, requires_grad=True)
    value = uld(student, torch.randn(4, 13, generator=g))
    assert value > 0
    value.backward()
    assert torch.isfinite(student.grad).all() and student.grad.abs().sum() > 0
    assert uld(student, torch.randn(4, 13), torch.zeros(4, dtype=torch.bool)) == 0  # nothing to average
    with pytest.raises(ValueError, match="every dimension but the vocabulary"):
        uld(torch.randn(4, 9), torch.randn(5, 9))


def padded_copy(tiny_dir, folder, extra: int = 13):
    """The tiny model with ``extra`` padded vocabulary rows (Qwen-style), saved with its tokenizer."""
    from kd_lightning.models.loading import load_causal_lm, load_tokenizer

    tok = load_tokenizer(tiny_dir)
    model = load_causal_lm(tiny_dir)
    torch.manual_seed(0)
    model.resize_token_embeddings(len(tok) + extra)
    model.save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


def test_a_teachers_padded_vocabulary_is_trimmed_not_refused(kdl_env, tiny_dir):
    from tests.helpers.cli import artifacts, kdl

    padded = padded_copy(tiny_dir, kdl_env / "padded")
    stores = {}
    for name, path in (("plain", tiny_dir), ("padded", padded)):
        kdl("teacher-logits", "experiment=tiny", "teacher=local", f"teacher.path={path}", env_dir=kdl_env)
        (newest,) = [f for f in artifacts(kdl_env, "teacher_logits") if f not in stores.values()]
        stores[name] = newest
    for array in ("ids.npy", "probs.npy", "tail.npy"):
        assert (stores["plain"] / array).read_bytes() == (stores["padded"] / array).read_bytes(), array


def test_an_online_teacher_with_padded_rows_is_trimmed_to_the_student(tiny_dir):
    from kd_lightning.losses import HardCrossEntropy
    from kd_lightning.models.builders import tiny_llama
    from kd_lightning.models.loading import load_causal_lm, load_tokenizer
    from kd_lightning.modules.distill import DistillModule

    tok = load_tokenizer(tiny_dir)
    teacher = load_causal_lm(tiny_dir)
    teacher.resize_token_embeddings(len(tok) + 7)
    module = DistillModule(
        tiny_llama(len(tok)),
        {"hard_ce": HardCrossEntropy()},
        optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
        teacher=teacher,
        tokenizer=tok,
    )
    assert module.teacher.config.vocab_size == len(tok)
    with pytest.raises(
        ValueError, match="vocab_size"
    ):  # a student narrower than the tokenizer is still refused
        DistillModule(
            tiny_llama(len(tok) - 3),
            {"hard_ce": HardCrossEntropy()},
            optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
            teacher=load_causal_lm(tiny_dir),
            tokenizer=tok,
        )
