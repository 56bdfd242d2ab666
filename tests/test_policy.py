"""Reverse-KL policy-gradient maths (MiniLLM) and the KV-cached rollout sampler, on tiny models."""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch

from kd_lightning.losses import policy as P
from kd_lightning.losses.functional import IGNORE_INDEX
from kd_lightning.models.builders import tiny_llama
from kd_lightning.rollout import Rollout, response_logits, sample_rollouts

V = 24


def models(seed_student: int = 0, seed_teacher: int = 1):
    student = tiny_llama(
        V, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=seed_student
    )
    teacher = tiny_llama(
        V, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64, seed=seed_teacher
    )
    with torch.no_grad():  # a confident teacher, clearly unlike the near-uniform random student
        teacher.model.norm.weight.mul_(40.0)
    return student, teacher.eval().requires_grad_(False)


def test_single_step_gradient_is_the_analytic_gradient_of_reverse_kl():
    """∇ of the single-step term = ∇ KL(q‖p) = −∇ E_q[r]; checked through a tiny model's parameters."""
    student, teacher = models()
    ids = torch.randint(0, V, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones(3, 7, dtype=torch.bool)
    mask[2, 4:] = False
    weights = torch.rand(3, 7, generator=torch.Generator().manual_seed(1)) + 0.5
    t_logits = teacher(input_ids=ids).logits

    logits = student(input_ids=ids).logits
    P.single_step_reverse_kl(logits, t_logits, mask, weights).backward()
    ours = [p.grad.clone() for p in student.parameters()]
    student.zero_grad()

    # analytic: d KL(q‖p) / d z_i = q_i (log q_i − log p_i − KL), weighted and averaged over masked positions
    logits = student(input_ids=ids).logits
    with torch.no_grad():
        log_q, log_p = torch.log_softmax(logits, -1), torch.log_softmax(t_logits, -1)
        kl = (log_q.exp() * (log_q - log_p)).sum(-1, keepdim=True)
        grad = log_q.exp() * (log_q - log_p - kl) * (weights * mask)[..., None] / mask.sum()
    logits.backward(grad)
    for a, b in zip(ours, (p.grad for p in student.parameters())):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-6)


def chi_square_p_value(counts: torch.Tensor, probs: torch.Tensor) -> float:
    """Pearson's goodness-of-fit p-value (regularised upper incomplete gamma), over cells with mass."""
    probs = probs.double() / probs.double().sum()
    expected = probs * counts.sum()
    keep = expected > 0
    statistic = ((counts[keep] - expected[keep]) ** 2 / expected[keep]).sum()
    dof = torch.tensor(float(keep.sum() - 1), dtype=torch.float64)
    return float(torch.special.gammaincc(dof / 2, statistic / 2))


def test_teacher_mixed_sampling_draws_from_the_mixture():
    """Chi-square: 6000 first tokens drawn by the sampler match α·p + (1 − α)·q of the two models."""
    student, teacher = models()
    prompt = [1, 5, 9, 3]
    alpha = 0.2
    with torch.no_grad():
        q = torch.softmax(student(input_ids=torch.tensor([prompt])).logits[0, -1], -1)
        p = torch.softmax(teacher(input_ids=torch.tensor([prompt])).logits[0, -1], -1)
    expected = alpha * p + (1 - alpha) * q
    draws = 6000
    rollout = sample_rollouts(
        student,
        [prompt] * draws,
        max_new_tokens=1,
        eos_token_id=0,
        pad_token_id=0,
        teacher=teacher,
        teacher_mix_alpha=alpha,
        generator=torch.Generator().manual_seed(0),
    )
    counts = torch.bincount(rollout.response_ids[:, 0], minlength=V).double()
    assert chi_square_p_value(counts, expected) > 1e-3
    # the student alone is a different distribution: the test has the power to tell them apart
    assert chi_square_p_value(counts, q) < 1e-6
    # importance weight of each draw is q/p̃
    torch.testing.assert_close(
        rollout.student_logprobs[:, 0] - rollout.sampling_logprobs[:, 0],
        (q.log() - expected.log())[rollout.response_ids[:, 0]],
        rtol=1e-4,
        atol=1e-4,
    )


def test_kv_cached_rollout_matches_a_full_forward_with_left_padding():
    student, teacher = models()
    prompts = [[2, 3, 4, 5, 6, 7], [8, 9], [10, 11, 12]]
    rollout = sample_rollouts(
        student,
        prompts,
        max_new_tokens=6,
        eos_token_id=[],
        pad_token_id=0,
        teacher=teacher,
        teacher_mix_alpha=0.3,
        keep_teacher_logits=True,
        generator=torch.Generator().manual_seed(3),
    )
    assert rollout.response_mask.all() and rollout.response_ids.shape == (3, 6)
    with torch.no_grad():
        s_logits = response_logits(student, rollout)
        t_logits = response_logits(teacher, rollout)
    torch.testing.assert_close(
        P.gather_log_probs(s_logits, rollout.response_ids), rollout.student_logprobs, atol=1e-4, rtol=1e-4
    )
    torch.testing.assert_close(t_logits, rollout.teacher_logits, atol=1e-4, rtol=1e-4)
    # a row alone gives the same log-probs as inside the left-padded batch
    alone = sample_rollouts(student, [prompts[1]], max_new_tokens=1, eos_token_id=[], pad_token_id=0)
    with torch.no_grad():
        single = response_logits(
            student,
            Rollout(
                input_ids=torch.tensor([prompts[1] + rollout.response_ids[1].tolist()]),
                attention_mask=torch.ones(1, 8, dtype=torch.long),
                prompt_width=2,
                response_mask=torch.ones(1, 6, dtype=torch.bool),
                student_logprobs=alone.student_logprobs,
                sampling_logprobs=alone.sampling_logprobs,
            ),
        )
    torch.testing.assert_close(single[0], s_logits[1], atol=1e-4, rtol=1e-4)


class ScriptedLM(torch.nn.Module):
    """Emits a fixed token per row and step (ignores its input); enough to test stopping and masks."""

    def __init__(self, script: list[list[int]]):
        super().__init__()
        self.script = torch.tensor(script)
        self.weight = torch.nn.Parameter(torch.zeros(1))
        self.config = SimpleNamespace(vocab_size=V)
        self.steps = 0

    def forward(
        self, input_ids, attention_mask=None, position_ids=None, past_key_values=None, use_cache=False, **_
    ):
        step = 0 if past_key_values is None else past_key_values + 1
        logits = torch.full((input_ids.shape[0], input_ids.shape[1], V), -1e4)
        logits[:, -1].scatter_(1, self.script[:, step : step + 1], 0.0)
        return SimpleNamespace(logits=logits, past_key_values=step)


def test_eos_stays_a_target_when_pad_equals_eos_and_prompts_are_never_targets():
    eos = pad = 2
    student = ScriptedLM([[5, eos, 7, 7], [6, 6, 6, eos], [eos, 9, 9, 9]])
    rollout = sample_rollouts(
        student, [[3, 4], [3], [4, 4, 4]], max_new_tokens=4, eos_token_id=eos, pad_token_id=pad
    )
    assert rollout.lengths.tolist() == [2, 4, 1]
    assert rollout.response_ids.tolist() == [[5, eos, pad, pad], [6, 6, 6, eos], [eos, pad, pad, pad]]
    targets = rollout.target_ids()
    p = rollout.prompt_width
    assert (targets[:, : p - 1] == IGNORE_INDEX).all()  # prompt tokens are never targets
    assert targets[0, p - 1 : p + 1].tolist() == [5, eos] and (targets[0, p + 1 :] == IGNORE_INDEX).all()
    assert targets[2, p - 1].item() == eos
    assert rollout.attention_mask[0].tolist()[-4:] == [1, 1, 0, 0]
    # sampling stops once every row has finished
    short = sample_rollouts(
        ScriptedLM([[eos, 5, 5], [eos, 5, 5]]),
        [[3], [3]],
        max_new_tokens=3,
        eos_token_id=eos,
        pad_token_id=pad,
    )
    assert short.response_ids.shape == (2, 1)


def test_length_normalised_future_returns():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 4.0], [1.0, 1.0, 0.0, 0.0]])
    mask = torch.tensor([[1, 1, 1, 1], [1, 1, 0, 0]], dtype=torch.bool)
    raw = P.future_returns(rewards, mask, length_normalize=False)
    torch.testing.assert_close(raw, torch.tensor([[9.0, 7.0, 4.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    normed = P.future_returns(rewards, mask, length_normalize=True)
    torch.testing.assert_close(normed, torch.tensor([[3.0, 3.5, 4.0, 0.0], [1.0, 0.0, 0.0, 0.0]]))
    discounted = P.future_returns(rewards, mask, discount=0.5, length_normalize=False)
    torch.testing.assert_close(discounted[0, 0], torch.tensor(2.0 + 0.5 * 3.0 + 0.25 * 4.0))
    current = P.future_returns(rewards, mask, length_normalize=True, include_current=True)
    torch.testing.assert_close(current[0], torch.tensor([10 / 4, 9 / 3, 7 / 2, 4.0]))
    with pytest.raises(ValueError, match="discount"):
        P.future_returns(rewards, mask, discount=0.0)


def test_reward_scaling_and_clipping():
    teacher_lp = torch.tensor([[-1.0, -50.0, -float("inf")]])
    student_lp = torch.tensor([[-3.0, -1.0, -2.0]])
    mask = torch.tensor([[True, True, False]])
    rewards = P.token_rewards(teacher_lp, student_lp, mask, reward_scale=2.0, reward_clip=10.0)
    torch.testing.assert_close(rewards, torch.tensor([[1.0, -10.0, 0.0]]))
    assert torch.isfinite(P.token_rewards(teacher_lp, student_lp, torch.ones_like(mask))).all()
    with pytest.raises(ValueError, match="reward_clip"):
        P.token_rewards(teacher_lp, student_lp, mask, reward_clip=0.0)


def test_no_nan_with_minus_inf_padding_logits():
    student_logits = torch.randn(2, 3, V, requires_grad=True)
    teacher_logits = torch.randn(2, 3, V)
    blocked = torch.zeros(2, 3, V, dtype=torch.bool)
    blocked[..., -4:] = True  # padded vocabulary rows, as some models emit
    s = student_logits.masked_fill(blocked, -float("inf"))
    t = teacher_logits.masked_fill(blocked, -float("inf"))
    t[1, 2] = -float("inf")  # a fully masked (padding) position
    t[1, 2, 0] = 0.0
    mask = torch.tensor([[True, True, True], [True, True, False]])
    loss = P.single_step_reverse_kl(s, t, mask)
    mix = P.teacher_mixed_log_probs(s, t, 0.2)
    ids = torch.zeros(2, 3, dtype=torch.long)
    surrogate, _ = P.ppo_clipped_surrogate(
        P.gather_log_probs(s, ids),
        P.gather_log_probs(s, ids).detach(),
        torch.randn(2, 3),
        torch.ones(2, 3),
        mask,
    )
    (loss + surrogate).backward()
    assert torch.isfinite(loss) and torch.isfinite(mix).all() and torch.isfinite(student_logits.grad).all()


def test_ppo_clip_stops_the_gradient_outside_the_trust_region():
    old = torch.zeros(1, 2)
    new = torch.tensor([[math.log(1.5), math.log(1.1)]], requires_grad=True)
    advantages = torch.ones(1, 2)
    loss, clipped = P.ppo_clipped_surrogate(
        new, old, advantages, torch.ones(1, 2), torch.ones(1, 2, dtype=torch.bool)
    )
    loss.backward()
    assert new.grad[0, 0] == 0 and new.grad[0, 1] < 0  # ratio 1.5 > 1.2 is clipped; 1.1 is not
    assert clipped.item() == pytest.approx(0.5)


def test_importance_weights_are_zero_on_padding_and_capped():
    weights = P.importance_weights(
        torch.tensor([[-1.0, -1.0, -1.0]]),
        torch.tensor([[-2.0, -1.0, -9.0]]),
        torch.tensor([[True, True, False]]),
        max_weight=2.0,
    )
    torch.testing.assert_close(weights, torch.tensor([[2.0, 1.0, 0.0]]))
