"""Integration tests on the shipped real assets: SmolLM2-135M-Instruct and the gpt-3.5 responses.

They need ``make setup`` (which ``make test`` runs first); outside CI they are skipped when it was not run.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from kd_lightning.data.datamodule import TeacherTextDataModule
from kd_lightning.data.records import load_records, split_records
from kd_lightning.data.soft_labels import write_store
from kd_lightning.data.tokenized import tokenize_records
from kd_lightning.estimation.ngram import NGramPriorEstimator
from kd_lightning.estimation.posterior import ProxyPosteriorEstimator
from kd_lightning.evaluation.nll import heldout_nll
from kd_lightning.losses import ForwardKL, HardCrossEntropy
from kd_lightning.models.builders import layer_selected_student
from kd_lightning.models.loading import freeze, load_causal_lm, load_tokenizer
from kd_lightning.modules.distill import DistillModule
from tests.helpers.assets import requires_real_assets
from tests.helpers.training import fit_one_batch

pytestmark = [pytest.mark.slow, requires_real_assets]


@pytest.fixture(scope="module")
def real():
    tokenizer = load_tokenizer("smollm2")
    records = load_records("alpaca_gpt35")
    train, heldout = split_records(records, 100)
    return tokenizer, records, train, heldout


def test_gpt35_corpus_and_split(real):
    tokenizer, records, train, heldout = real
    assert len(records) == 805 and len(train) == 705 and len(heldout) == 100
    assert {r.meta["generator"] for r in records} == {"gpt-3.5-turbo-0301"}
    assert {r.meta["dataset"] for r in records} == {
        "selfinstruct",
        "oasst",
        "koala",
        "helpful_base",
        "vicuna",
    }
    corpus = tokenize_records(train, tokenizer, max_seq_len=512)
    assert corpus.report.kept + corpus.report.prompt_too_long + corpus.report.empty_response == 705
    text = tokenizer.decode(corpus.sequence(0)[corpus.prompt_lens[0] :])
    assert text.rstrip().endswith("<|im_end|>") and train[0].response.strip()[:20] in text


def test_prior_on_real_text_is_a_distribution(real):
    tokenizer, _, train, _ = real
    corpus = tokenize_records(train[:200], tokenizer, 256)
    rows, stats = NGramPriorEstimator(ngram_order=5, gamma=2.0, min_context_count=2, top_k=32).estimate(
        corpus, 49152
    )
    total = rows.probs.astype(np.float64).sum(1) + rows.tail
    np.testing.assert_allclose(total, 1.0, atol=2e-3)
    assert stats["positions"] == int(corpus.target_offsets()[-1])
    assert 0.0 < stats["mean_ngram_prob_of_observed"] < 1.0
    observed = corpus.tokens[np.flatnonzero(corpus.target_mask()) + 1]
    on_observed = np.where(
        rows.ids.astype(np.int64) == observed[:, None], rows.probs.astype(np.float64), 0
    ).sum(1)
    assert on_observed.min() >= (1 - 1 / 2.0) - 1e-3  # the (1 - 1/γ) one-hot share, plus the n-gram's


def test_proxy_posterior_and_a_distill_step_on_real_models(real, tmp_path):
    tokenizer, _, train, _heldout = real
    corpus = tokenize_records(train[:4], tokenizer, 192)
    prior_rows, _ = NGramPriorEstimator(ngram_order=3, top_k=16).estimate(corpus, 49152)
    prior = write_store(tmp_path / "prior", prior_rows, corpus.target_offsets(), {})
    proxy = freeze(load_causal_lm("smollm2"))
    posterior = ProxyPosteriorEstimator(sampling_rounds=8, top_k=16, batch_size=4).estimate(
        proxy, corpus, prior, tokenizer.pad_token_id, str(tmp_path / "post"), {}
    )
    rows = posterior.all_rows()
    np.testing.assert_allclose(rows.probs.astype(np.float64).sum(1) + rows.tail, 1.0, atol=5e-3)

    student = layer_selected_student("smollm2", [0, 29])
    module = DistillModule(
        student,
        {
            "hard_ce": HardCrossEntropy(),
            "prior_kl": ForwardKL("prior"),
            "posterior_kl": ForwardKL("posterior"),
        },
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
    )
    dm = TeacherTextDataModule(batch_size=4).connect(
        tokenizer.pad_token_id, corpus, stores={"prior": prior, "posterior": posterior}
    )
    batch = next(iter(dm.train_dataloader()))
    losses = fit_one_batch(module, batch, steps=3)
    assert all(np.isfinite(losses)) and losses[-1] < losses[0]


def test_shipped_proxy_fits_gpt35_text_plausibly(real):
    tokenizer, _, _, heldout = real
    corpus = tokenize_records(heldout[:8], tokenizer, 256)
    metrics = heldout_nll(freeze(load_causal_lm("smollm2")), corpus, tokenizer.pad_token_id)
    assert 1.0 < metrics["nll"] < 2.6  # ~1.9 nats/token on held-out gpt-3.5 responses


def test_smollm2_answers_a_real_question_set(real):
    """SmolLM2 on OpenAI evals' born_first: both scorings run on the real chat template and tokenizer."""
    from kd_lightning.evaluation.question_sets import load_question_set, prompt_ids, score_question_set

    tok = real[0]
    model = freeze(load_causal_lm("smollm2"))
    questions = load_question_set("born_first", limit=12)
    prompt = tok.decode(prompt_ids(questions.questions[0], tok))
    assert "Answer Y or N." in prompt and prompt.rstrip().endswith("assistant")
    got = score_question_set(model, tok, questions, max_new_tokens=4, batch_size=6)
    assert got["born_first/questions"] == 12
    assert 0 <= got["born_first/mc_accuracy"] <= 1 and 0 <= got["born_first/answer_match"] <= 1


def test_smollm2_teacher_mixed_rollouts_and_a_minillm_update(real):
    """SmolLM2 (pad == eos) as teacher, 4 of its layers as student: the KV-cached teacher-mixed rollout keeps
    EOS as a target, matches a full forward, and one MiniLLM update runs and leaves finite weights."""
    from kd_lightning.losses import policy as P
    from kd_lightning.modules.minillm import MiniLLMModule
    from kd_lightning.rollout import response_logits, sample_rollouts

    tokenizer, _, train, _ = real
    assert tokenizer.pad_token_id == tokenizer.eos_token_id  # the case the response mask must survive
    teacher = freeze(load_causal_lm("smollm2"))
    student = layer_selected_student("smollm2", [0, 10, 20, 29])
    prompts = [
        tokenizer.apply_chat_template(
            [{"role": "user", "content": r.instruction}], add_generation_prompt=True, tokenize=False
        )
        for r in train[:3]
    ]
    ids = [tokenizer(p, add_special_tokens=False)["input_ids"] for p in prompts]
    rollout = sample_rollouts(
        student,
        ids,
        max_new_tokens=12,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        teacher=teacher,
        teacher_mix_alpha=0.2,
        keep_teacher_logits=True,
        generator=torch.Generator().manual_seed(0),
    )
    with torch.no_grad():
        logits = response_logits(student, rollout)
        teacher_logits = response_logits(teacher, rollout)
    torch.testing.assert_close(
        P.gather_log_probs(logits, rollout.response_ids), rollout.student_logprobs, atol=2e-3, rtol=1e-3
    )
    torch.testing.assert_close(teacher_logits, rollout.teacher_logits, atol=2e-3, rtol=1e-3)
    # a row that ends keeps its EOS as the last target, although EOS is also the pad id: a student that
    # ends every answer (EOS logit +1e4) makes every row end, so the check always runs
    import copy

    ending = copy.deepcopy(student)
    head = torch.nn.Linear(ending.lm_head.in_features, ending.lm_head.out_features, bias=True)
    with torch.no_grad():
        head.weight.copy_(ending.lm_head.weight)
        head.bias.zero_()
        head.bias[tokenizer.eos_token_id] = 1e4
    ending.lm_head = head
    ended = sample_rollouts(
        ending,
        ids,
        max_new_tokens=12,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        generator=torch.Generator().manual_seed(0),
    )
    assert (ended.lengths < 12).all()
    for row in range(3):
        targets = ended.response_ids[row][ended.response_mask[row]]
        assert len(targets) == int(ended.lengths[row]) and targets[-1].item() == tokenizer.eos_token_id
    module = MiniLLMModule(
        student, teacher, tokenizer, optimizer=lambda params: torch.optim.AdamW(params, lr=1e-5)
    )
    scored = module.score(rollout)
    losses = module.policy_losses(rollout, scored)
    (losses["single_step"] + losses["long_term"]).backward()
    assert all(torch.isfinite(p.grad).all() for p in student.parameters() if p.grad is not None)
    assert torch.isfinite(losses["single_step"]) and losses["single_step"] > 0
