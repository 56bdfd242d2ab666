"""Batched, KV-cached sampling of student rollouts, optionally mixed with a teacher (MiniLLM, GKD, DistiLLM).

Prompts are left-padded so every row generates from the same column; the response is right-padded after
each row's end-of-sequence token. The student runs in eval mode (no dropout) and both models keep a KV
cache, so a step costs one token's forward per model. The response mask is built from the sampling itself,
not by comparing ids with the pad id, so the EOS token stays a target even when ``pad_id == eos_id``
(SmolLM2, Llama 3 ...), and prompt tokens are never targets.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from kd_lightning.data.batch import IGNORE_INDEX, TextBatch
from kd_lightning.losses.policy import finite_log_softmax, teacher_mixed_log_probs
from kd_lightning.models.forward import left_pad


@dataclass
class Rollout:
    """A batch of sampled responses. B rollouts, P prompt width (left-padded), T response width.

    Log-probabilities of the drawn tokens are at temperature 1 for the student and the teacher (the
    distributions being distilled) and at the generation temperature for ``sampling_logprobs`` (what the
    tokens were actually drawn from), so ``student_logprobs − sampling_logprobs`` is the importance weight.
    """

    input_ids: torch.Tensor  # (B, P + T) prompt then response
    attention_mask: torch.Tensor  # (B, P + T) 1 on prompt and response tokens
    prompt_width: int  # P
    response_mask: torch.Tensor  # (B, T) bool: generated tokens, EOS included
    student_logprobs: torch.Tensor  # (B, T) log q(y_t), the student at sampling time
    sampling_logprobs: torch.Tensor  # (B, T) log p̃(y_t)
    teacher_logprobs: torch.Tensor | None = None  # (B, T) log p(y_t)
    teacher_logits: torch.Tensor | None = None  # (B, T, V) teacher logits at the response positions

    @property
    def response_ids(self) -> torch.Tensor:
        """(B, T) the generated tokens (pad after EOS)."""
        return self.input_ids[:, self.prompt_width :]

    @property
    def lengths(self) -> torch.Tensor:
        """(B,) generated tokens per row, EOS included."""
        return self.response_mask.sum(-1)

    def target_ids(self) -> torch.Tensor:
        """(B, P + T) labels in the DistillModule convention: position t targets ``input_ids[t + 1]``.

        Only response tokens are targets; prompt and padding get ``IGNORE_INDEX``.
        """
        b, width = self.input_ids.shape
        targets = torch.full((b, width), IGNORE_INDEX, dtype=torch.long, device=self.input_ids.device)
        p = self.prompt_width
        targets[:, p - 1 : width - 1] = torch.where(
            self.response_mask, self.response_ids, torch.full_like(self.response_ids, IGNORE_INDEX)
        )
        return targets

    def as_batch(self) -> TextBatch:
        """The samples as a teacher-text batch (no soft labels): what DistillModule trains on."""
        return TextBatch(
            input_ids=self.input_ids, attention_mask=self.attention_mask, target_ids=self.target_ids()
        )

    def texts(self, tokenizer) -> list[str]:
        """The decoded responses (special tokens dropped)."""
        return [
            tokenizer.decode(ids[mask].tolist(), skip_special_tokens=True).strip()
            for ids, mask in zip(self.response_ids.cpu(), self.response_mask.cpu())
        ]


def prompts_from_batch(batch: TextBatch) -> list[list[int]]:
    """The prompt of each record of a teacher-text batch: its tokens up to and including its first target
    position. Of a packed batch, one per packed record, in the order the records were collated."""
    if batch.position_ids is not None:
        return _packed_prompts(batch)
    targets = batch.target_ids != IGNORE_INDEX
    if not bool(targets.any(-1).all()):
        raise ValueError("a batch row has no response tokens, so its prompt cannot be located")
    first = targets.float().argmax(-1)
    return [batch.input_ids[i, : int(first[i]) + 1].tolist() for i in range(len(first))]


def _packed_prompts(batch: TextBatch) -> list[list[int]]:
    prompts = []
    for row in range(len(batch)):
        real = int(batch.attention_mask[row].sum())
        starts = torch.nonzero(batch.position_ids[row, :real] == 0).flatten().tolist()
        for start, end in zip(starts, [*starts[1:], real]):
            targets = torch.nonzero(batch.target_ids[row, start:end] != IGNORE_INDEX).flatten()
            if not len(targets):
                raise ValueError("a packed record has no response tokens, so its prompt cannot be located")
            prompts.append(batch.input_ids[row, start : start + int(targets[0]) + 1].tolist())
    if batch.record_order is None:
        return prompts
    by_item = dict(zip(batch.record_order, prompts))
    return [by_item[i] for i in range(len(prompts))]


def position_ids(attention_mask: torch.Tensor) -> torch.Tensor:
    """Positions that skip left padding (absolute-position models need them; RoPE is shift-invariant)."""
    return (attention_mask.long().cumsum(-1) - 1).clamp_min(0)


def _step(model: nn.Module, ids: torch.Tensor, attention: torch.Tensor, cache, width: int):
    out = model(
        input_ids=ids,
        attention_mask=attention,
        position_ids=position_ids(attention)[:, -width:],
        past_key_values=cache,
        use_cache=True,
    )
    return out.logits[:, -1].float(), out.past_key_values


@torch.no_grad()
def sample_rollouts(
    student: nn.Module,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    eos_token_id: int | Sequence[int],
    pad_token_id: int,
    teacher: nn.Module | None = None,
    teacher_mix_alpha: float = 0.0,
    generation_temperature: float = 1.0,
    keep_teacher_logits: bool = False,
    generator: torch.Generator | None = None,
) -> Rollout:
    """Sample one response per prompt from ``α·p_teacher + (1 − α)·q_student`` (at ``generation_temperature``).

    Args:
        student: causal LM (put in eval mode for the duration, then restored).
        prompts: token ids of each prompt (chat template with generation prompt applied).
        max_new_tokens: response length cap; rows stop at their first EOS.
        eos_token_id: id (or ids) that end a response; the EOS token is kept as a target.
        pad_token_id: fills the response after EOS (may equal the EOS id).
        teacher: frozen causal LM on the same vocabulary; needed for α > 0, teacher log-probs or logits.
        teacher_mix_alpha: α, the teacher's share of the sampling distribution (MiniLLM: 0.2).
        generation_temperature: divides both models' logits while sampling (not the distilled distributions).
        keep_teacher_logits: also return the teacher's (B, T, V) logits (the single-step term needs them).
        generator: for reproducible draws.
    """
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    if generation_temperature <= 0:
        raise ValueError(f"generation_temperature must be > 0 (sampling), got {generation_temperature}")
    if teacher is None and (teacher_mix_alpha > 0 or keep_teacher_logits):
        raise ValueError(
            "teacher-mixed sampling (teacher_mix_alpha > 0) and teacher logits need a teacher model"
        )
    device = next(student.parameters()).device
    eos = torch.as_tensor(
        [eos_token_id] if isinstance(eos_token_id, int) else list(eos_token_id), device=device
    )
    ids, attention = left_pad(prompts, pad_token_id, device)
    prompt_width, b = ids.shape[1], ids.shape[0]
    was_training = student.training
    student.eval()
    try:
        s_logits, s_cache = _step(student, ids, attention, None, prompt_width)
        t_logits, t_cache = (
            (None, None) if teacher is None else _step(teacher, ids, attention, None, prompt_width)
        )
        finished = torch.zeros(b, dtype=torch.bool, device=device)
        tokens, masks, s_lp, mix_lp, t_lp, t_all = [], [], [], [], [], []
        for step in range(max_new_tokens):
            log_mix = teacher_mixed_log_probs(
                s_logits,
                t_logits if t_logits is not None else s_logits,
                teacher_mix_alpha,
                generation_temperature,
            )
            draw = torch.multinomial(log_mix.exp(), 1, generator=generator).squeeze(-1)
            draw = torch.where(finished, torch.full_like(draw, pad_token_id), draw)
            live = ~finished
            tokens.append(draw)
            masks.append(live)
            s_lp.append(finite_log_softmax(s_logits).gather(-1, draw[:, None]).squeeze(-1))
            mix_lp.append(log_mix.gather(-1, draw[:, None]).squeeze(-1))
            if t_logits is not None:
                t_lp.append(finite_log_softmax(t_logits).gather(-1, draw[:, None]).squeeze(-1))
                if keep_teacher_logits:
                    t_all.append(t_logits)
            finished = finished | torch.isin(draw, eos)
            if bool(finished.all()) or step == max_new_tokens - 1:
                break
            attention = torch.cat([attention, live.long()[:, None]], dim=1)
            s_logits, s_cache = _step(student, draw[:, None], attention, s_cache, 1)
            if teacher is not None:
                t_logits, t_cache = _step(teacher, draw[:, None], attention, t_cache, 1)
    finally:
        student.train(was_training)
    response = torch.stack(tokens, 1)
    mask = torch.stack(masks, 1)
    full_attention = torch.cat([attention[:, :prompt_width], mask.long()], dim=1)
    return Rollout(
        input_ids=torch.cat([ids, response], dim=1),
        attention_mask=full_attention,
        prompt_width=prompt_width,
        response_mask=mask,
        student_logprobs=torch.where(mask, torch.stack(s_lp, 1), torch.zeros_like(mask, dtype=torch.float)),
        sampling_logprobs=torch.where(
            mask, torch.stack(mix_lp, 1), torch.zeros_like(mask, dtype=torch.float)
        ),
        teacher_logprobs=(
            torch.where(mask, torch.stack(t_lp, 1), torch.zeros_like(mask, dtype=torch.float))
            if t_lp
            else None
        ),
        teacher_logits=torch.stack(t_all, 1) if t_all else None,
    )


def response_logits(model: nn.Module, rollout: Rollout) -> torch.Tensor:
    """Logits (B, T, V) of ``model`` at the positions that predict each response token (one forward)."""
    width = rollout.response_mask.shape[1]
    out = model(
        input_ids=rollout.input_ids,
        attention_mask=rollout.attention_mask,
        position_ids=position_ids(rollout.attention_mask),
        logits_to_keep=width + 1,
    )
    return out.logits[:, :-1]
