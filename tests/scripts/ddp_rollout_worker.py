"""A few steps of a module that samples its own rollouts (GAD: one warm-up, then adversarial, one prompt's
answers per forward/backward pass; MiniLLM) on tiny models: under 2-process DDP, or one process replaying the ranks' rollouts.

Run by ``tests/test_distributed.py`` as a script (Lightning's DDP launcher re-executes it per rank):

    python tests/scripts/ddp_rollout_worker.py gad|minillm TINY_DIR OUT ddp      # writes OUT.rank0.pt, OUT.rank1.pt
    python tests/scripts/ddp_rollout_worker.py gad|minillm TINY_DIR OUT replay RANK0.pt RANK1.pt

``ddp`` records, per rank and step, the rollout seed, the sampled rollout, the step's logged losses and the
module's parameters after the step (and before the first). ``replay`` trains one process on the global batch
whose step-``s`` rollout is the union of both ranks' (prompts left-padded, answers right-padded to one width,
rank 0's rows first as the global batch has them), sampling nothing.
"""

from __future__ import annotations

import sys
from dataclasses import fields

import torch
from worker_common import StepRecord, quiet_trainer, save_rank, tiny_corpus

from kd_lightning.data.datamodule import TeacherTextDataModule
from kd_lightning.models.loading import load_causal_lm, load_tokenizer
from kd_lightning.modules import gad as gad_module
from kd_lightning.modules import minillm as minillm_module
from kd_lightning.modules.gad import GADModule
from kd_lightning.modules.minillm import MiniLLMModule
from kd_lightning.rollout import Rollout

STEPS = 4
LOGGED = (
    "train/discriminator_loss",
    "train/policy_loss",
    "train/reward",
    "train/pair_accuracy",
    "train/loss",
)


DRAWN: list[int] = []
"""The seed of every generator the modules sampled with (what they drew from, not a formula of ours)."""


def recording_seeds(sample):
    def run(*args, generator=None, **kwargs):
        DRAWN.append(int(generator.initial_seed()))
        return sample(*args, generator=generator, **kwargs)

    return run


gad_module.sample_rollouts = recording_seeds(gad_module.sample_rollouts)
minillm_module.sample_rollouts = recording_seeds(minillm_module.sample_rollouts)


class Replaying:
    """Keeps the step's rollout (or, replaying, returns the union of the ranks' rollouts of that step)."""

    replayed: list[Rollout] | None = None
    steps_done = 0

    def keep(self, sample) -> Rollout:
        sampled = self.replayed[self.steps_done] if self.replayed is not None else sample()
        self.last_rollout_seed = DRAWN[-1] if self.replayed is None else None
        self.steps_done += 1
        self.last_rollout = {
            f.name: getattr(sampled, f.name) for f in fields(Rollout) if getattr(sampled, f.name) is not None
        }
        return sampled


class RecordingGAD(Replaying, GADModule):
    def sample(self, batch, batch_idx: int, group: int) -> Rollout:
        return self.keep(lambda: super(RecordingGAD, self).sample(batch, batch_idx, group))


class RecordingMiniLLM(Replaying, MiniLLMModule):
    def rollout(self, batch, keep_teacher_logits: bool = True) -> Rollout:
        return self.keep(lambda: super(RecordingMiniLLM, self).rollout(batch, keep_teacher_logits))


def union(parts: list[dict], pad_id: int) -> Rollout:
    """The ranks' rollouts as one: each prompt left-padded to the widest, each answer right-padded."""
    prompt = max(p["prompt_width"] for p in parts)
    answer = max(p["input_ids"].shape[1] - p["prompt_width"] for p in parts)

    def widen(t: torch.Tensor, width: int, left: bool, value) -> torch.Tensor:
        pad = (width - t.shape[1], 0) if left else (0, width - t.shape[1])
        return torch.nn.functional.pad(t, pad, value=value)

    def joined(name: str, value) -> torch.Tensor:
        rows = []
        for p in parts:
            t, w = p[name], p["prompt_width"]
            rows.append(
                torch.cat([widen(t[:, :w], prompt, True, value), widen(t[:, w:], answer, False, value)], 1)
            )
        return torch.cat(rows)

    def answers(name: str, value) -> torch.Tensor | None:
        if name not in parts[0]:
            return None
        # (B, T) or (B, T, V): pad the answer dimension (dim 1) on the right
        padded = [
            torch.nn.functional.pad(
                p[name], (0, 0) * (p[name].dim() - 2) + (0, answer - p[name].shape[1]), value=value
            )
            for p in parts
        ]
        return torch.cat(padded)

    return Rollout(
        input_ids=joined("input_ids", pad_id),
        attention_mask=joined("attention_mask", 0),
        prompt_width=prompt,
        response_mask=answers("response_mask", False),
        student_logprobs=answers("student_logprobs", 0.0),
        sampling_logprobs=answers("sampling_logprobs", 0.0),
        teacher_logprobs=answers("teacher_logprobs", 0.0),
        teacher_logits=answers("teacher_logits", 0.0),
    )


def build(kind: str, tiny_dir: str, tok):
    """The module of ``kind`` and the optimizer updates one training step of it makes (the first: a GAD
    warm-up step updates D only)."""
    torch.manual_seed(0)
    optimizer = lambda params: torch.optim.SGD(params, lr=0.5)  # noqa: E731
    if kind == "gad":
        module = RecordingGAD(
            load_causal_lm(tiny_dir), optimizer=optimizer, tokenizer=tok, discriminator_lr=0.1, group_size=2, prompts_per_pass=1,
            max_new_tokens=24, warmup_steps=1, eval_generation_limit=0, seed=3,
        )  # fmt: skip
        return module, 1 + 2 * (STEPS - 1)
    teacher = load_causal_lm(tiny_dir)
    with torch.no_grad():  # a teacher unlike the student, so rewards and the single-step KL are not zero
        for parameter in teacher.parameters():
            parameter.add_(0.05 * torch.randn_like(parameter))
    module = RecordingMiniLLM(
        load_causal_lm(tiny_dir), optimizer=optimizer, teacher=teacher, tokenizer=tok, max_new_tokens=24,
        ppo_epochs=1, whiten_advantages=True, pt_loss_weight=0.5, eval_generation_limit=0, seed=3,
    )  # fmt: skip
    return module, STEPS


def main() -> None:
    kind, tiny_dir, out, mode = sys.argv[1:5]
    torch.use_deterministic_algorithms(True)
    tok = load_tokenizer(tiny_dir)
    module, updates = build(kind, tiny_dir, tok)
    devices, strategy, batch_size = (
        (2, "ddp_find_unused_parameters_true", 2) if mode == "ddp" else (1, "auto", 4)
    )
    if mode == "replay":
        ranks = [torch.load(path, weights_only=True) for path in sys.argv[5:7]]
        module.replayed = [
            union([r["steps"][s]["rollout"] for r in ranks], tok.pad_token_id) for s in range(STEPS)
        ]
    data = TeacherTextDataModule(batch_size=batch_size, shuffle_seed=0).connect(
        tok.pad_token_id, tiny_corpus(tiny_dir, tok, 16)
    )
    record = StepRecord(LOGGED)
    trainer = quiet_trainer(devices=devices, strategy=strategy, max_steps=updates, callbacks=[record])
    trainer.fit(module, datamodule=data)
    save_rank(trainer, out, record, STEPS)


if __name__ == "__main__":
    main()
