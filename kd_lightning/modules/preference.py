"""Proxy-KD's second alignment step: preference optimisation of the SFT proxy toward the teacher.

Proxy-KD (arXiv 2401.07013v2) aligns the proxy in two steps: SFT on the teacher's text (the aligned-proxy
artifact of :mod:`kd_lightning.modules.alignment`), then preference optimisation. For each training prompt the
teacher's answer is preferred over an answer the SFT proxy samples itself, and the proxy is trained with DPO
against the frozen SFT proxy as the reference (:func:`kd_lightning.losses.preference.dpo_loss`). A sampled
answer equal to the teacher's gives no preference: that pair is dropped and counted.

The step is an artifact of its own (kind ``align``), keyed by the SFT proxy's key, these settings and the
code, so the SFT step is reused when only the preference settings change.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from lightning import LightningModule
from torch import nn
from torch.utils.data import DataLoader

from kd_lightning.data.tokenized import TokenizedCorpus
from kd_lightning.losses.preference import DPOLoss
from kd_lightning.models.loading import freeze
from kd_lightning.rollout import sample_rollouts


@dataclass
class PreferenceStep:
    """``alignment.preference``: the DPO step after SFT (``alignment=proxy_kd``)."""

    samples: int = 1
    """Answers the SFT proxy samples per prompt; each gives one (teacher ≻ sample) pair."""
    beta: float = 0.1
    """DPO's β (> 0): how far the proxy may move from the SFT reference."""
    learning_rate: float = 5e-6
    max_epochs: int = 1
    batch_size: int = 4
    """Pairs per optimizer step."""
    max_new_tokens: int = 128
    """Length cap of the sampled answers."""
    generation_temperature: float = 1.0
    sampling_batch_size: int = 8
    seed: int = 0

    def __post_init__(self) -> None:
        checks = (
            ("beta", self.beta > 0, "> 0"),
            ("samples", self.samples >= 1, ">= 1"),
            ("learning_rate", self.learning_rate > 0, "> 0"),
            ("max_epochs", self.max_epochs >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("max_new_tokens", self.max_new_tokens >= 1, ">= 1"),
            ("generation_temperature", self.generation_temperature > 0, "> 0"),
            ("sampling_batch_size", self.sampling_batch_size >= 1, ">= 1"),
        )
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"alignment.preference.{name} must be {rule}, got {getattr(self, name)}")


@dataclass
class PreferencePair:
    prompt: list[int]
    chosen: list[int]  # the teacher's answer
    rejected: list[int]  # the SFT proxy's sampled answer


def until_eos(ids: list[int], eos: int) -> list[int]:
    """``ids`` up to and including the first ``eos`` (all of them if there is none)."""
    return ids[: ids.index(eos) + 1] if eos in ids else ids


@torch.no_grad()
def preference_pairs(
    model: nn.Module, records: TokenizedCorpus, eos_id: int, pad_id: int, step: PreferenceStep
) -> tuple[list[PreferencePair], dict[str, int]]:
    """(teacher ≻ sample) pairs over ``records``, and counts: prompts, samples drawn, pairs dropped because
    the sample equals the teacher's answer (up to its first EOS)."""
    generator = torch.Generator(device=next(model.parameters()).device).manual_seed(step.seed)
    prompts, answers = [], []
    for i in range(len(records)):
        sequence, start = records.sequence(i).tolist(), int(records.prompt_lens[i])
        prompts.append(sequence[:start])
        answers.append(sequence[start:])
    pairs, dropped = [], 0
    jobs = [i for i in range(len(prompts)) for _ in range(step.samples)]
    for first in range(0, len(jobs), step.sampling_batch_size):
        chunk = jobs[first : first + step.sampling_batch_size]
        rollout = sample_rollouts(
            model,
            [prompts[i] for i in chunk],
            max_new_tokens=step.max_new_tokens,
            eos_token_id=eos_id,
            pad_token_id=pad_id,
            generation_temperature=step.generation_temperature,
            generator=generator,
        )
        for row, i in enumerate(chunk):
            sample = rollout.response_ids[row, : int(rollout.lengths[row])].tolist()
            if sample == until_eos(answers[i], eos_id):
                dropped += 1
                continue
            pairs.append(PreferencePair(prompts[i], answers[i], sample))
    counts = {"prompts": len(prompts), "samples": len(jobs), "pairs": len(pairs), "dropped_equal": dropped}
    return pairs, counts


def collate_pairs(pairs: list[PreferencePair], pad_id: int) -> dict[str, torch.Tensor]:
    """Chosen rows then rejected rows, right-padded: ``input_ids``, ``attention_mask`` (2P, T) and
    ``answer_mask`` (2P, T − 1), true where position t predicts an answer token."""
    rows = [(p.prompt, p.chosen) for p in pairs] + [(p.prompt, p.rejected) for p in pairs]
    width = max(len(prompt) + len(answer) for prompt, answer in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    attention = torch.zeros((len(rows), width), dtype=torch.long)
    answer_mask = torch.zeros((len(rows), width - 1), dtype=torch.bool)
    for r, (prompt, answer) in enumerate(rows):
        n = len(prompt) + len(answer)
        input_ids[r, :n] = torch.tensor(prompt + answer)
        attention[r, :n] = 1
        answer_mask[r, len(prompt) - 1 : n - 1] = True
    return {"input_ids": input_ids, "attention_mask": attention, "answer_mask": answer_mask}


def answer_log_probs(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """(R,) summed log-probs of each row's answer tokens."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits[:, :-1]
    token = torch.log_softmax(logits.float(), -1).gather(-1, batch["input_ids"][:, 1:, None]).squeeze(-1)
    return (token * batch["answer_mask"]).sum(-1)


class PreferenceModule(LightningModule):
    """DPO of ``policy`` against a frozen ``reference`` (held outside the module tree: never trained or
    checkpointed) on batches from :func:`collate_pairs`."""

    def __init__(self, policy: nn.Module, reference: nn.Module, beta: float, learning_rate: float) -> None:
        super().__init__()
        self.policy = policy
        object.__setattr__(self, "reference", freeze(reference))
        self.loss = DPOLoss(beta)
        self.learning_rate = learning_rate

    def on_fit_start(self) -> None:
        self.policy.train()
        self.reference.to(self.device).eval()

    def training_step(self, batch: dict[str, torch.Tensor], batch_idx: int) -> torch.Tensor:
        pairs = batch["input_ids"].shape[0] // 2
        policy = answer_log_probs(self.policy, batch)
        with torch.no_grad():
            reference = answer_log_probs(self.reference, batch)
        loss, margins = self.loss(policy[:pairs], policy[pairs:], reference[:pairs], reference[pairs:])
        self.log("train/dpo_loss", loss, batch_size=pairs)
        self.log("train/reward_margin", margins.mean(), batch_size=pairs)
        self.log("train/preference_accuracy", (margins > 0).float().mean(), batch_size=pairs)
        return loss

    def configure_optimizers(self):
        return torch.optim.AdamW(
            [p for p in self.policy.parameters() if p.requires_grad], lr=self.learning_rate
        )


def pair_loader(pairs: list[PreferencePair], pad_id: int, step: PreferenceStep) -> DataLoader:
    """Pairs in a seeded order, ``step.batch_size`` per batch (the order is the same on resumption)."""
    return DataLoader(
        pairs,
        batch_size=step.batch_size,
        shuffle=True,
        generator=torch.Generator().manual_seed(step.seed),
        collate_fn=lambda chunk: collate_pairs(chunk, pad_id),
    )


def write_report(folder: Path, counts: dict[str, int], extra: dict[str, Any]) -> None:
    (folder / "preference.json").write_text(json.dumps({**counts, **extra}, indent=2))
