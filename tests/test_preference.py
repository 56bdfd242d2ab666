"""Proxy-KD's preference step (alignment=proxy_kd): the DPO loss, the pairs, and the cached artifact."""

from __future__ import annotations

import json
import math

import pytest
import torch

from kd_lightning.losses.preference import DPOLoss, dpo_loss
from kd_lightning.models.builders import tiny_llama
from kd_lightning.modules.preference import PreferencePair, PreferenceStep, collate_pairs, preference_pairs
from tests.helpers.cli import artifacts, kdl


def test_dpo_loss_equals_its_definition_and_is_log2_where_the_policy_is_the_reference():
    chosen, rejected = torch.tensor([-3.0, -5.0], requires_grad=True), torch.tensor([-4.0, -2.0])
    ref_chosen, ref_rejected = torch.tensor([-3.5, -4.0]), torch.tensor([-3.0, -2.5])
    loss, margins = dpo_loss(chosen, rejected, ref_chosen, ref_rejected, beta=0.5)
    expected = [
        0.5 * ((c - rc) - (r - rr)) for c, r, rc, rr in zip([-3, -5], [-4, -2], [-3.5, -4], [-3, -2.5])
    ]
    torch.testing.assert_close(margins, torch.tensor(expected))
    torch.testing.assert_close(loss, torch.tensor(sum(math.log1p(math.exp(-m)) for m in expected) / 2))
    loss.backward()
    assert (chosen.grad < 0).all()  # descending the loss raises the chosen answers' log-probs
    same, _ = dpo_loss(chosen.detach(), rejected, chosen.detach(), rejected, beta=0.1)
    torch.testing.assert_close(same, torch.tensor(math.log(2.0)))
    with pytest.raises(ValueError, match="beta must be > 0"):
        DPOLoss(beta=0.0)
    with pytest.raises(ValueError, match=r"alignment\.preference\.beta must be > 0"):
        PreferenceStep(beta=-1.0)


def test_collated_pairs_mark_exactly_the_answer_positions():
    pairs = [PreferencePair([1, 2, 3], [4, 5], [6]), PreferencePair([7], [8, 9, 10], [11, 12])]
    batch = collate_pairs(pairs, pad_id=0)
    assert batch["input_ids"].tolist()[0] == [1, 2, 3, 4, 5] and batch["input_ids"].tolist()[2] == [
        1,
        2,
        3,
        6,
        0,
    ]
    # position t predicts token t + 1: the answer's tokens are predicted from the prompt's last position on
    assert batch["answer_mask"].tolist() == [
        [False, False, True, True],
        [True, True, True, False],
        [False, False, True, False],
        [True, True, False, False],
    ]


class Records:
    """The part of a TokenizedCorpus that preference_pairs reads."""

    def __init__(self, prompts, answers):
        self.rows = [torch.tensor(p + a) for p, a in zip(prompts, answers)]
        self.prompt_lens = [len(p) for p in prompts]

    def __len__(self):
        return len(self.rows)

    def sequence(self, i):
        return self.rows[i]


def test_a_sample_equal_to_the_teachers_answer_is_dropped_and_counted():
    model = tiny_llama(32, hidden_size=16, num_layers=1, num_heads=2, intermediate_size=32)
    prompts = [[3, 4, 5], [6, 7], [8, 9, 10, 11]]
    step = PreferenceStep(max_new_tokens=4, sampling_batch_size=2, seed=3)
    first, counts = preference_pairs(model, Records(prompts, [[1, 2]] * 3), eos_id=31, pad_id=0, step=step)
    assert counts == {"prompts": 3, "samples": 3, "pairs": 3, "dropped_equal": 0}
    # the same draws again, now with the first two samples as the teacher's answers: both are dropped
    answers = [first[0].rejected, first[1].rejected, [1, 2]]
    again, counts = preference_pairs(model, Records(prompts, answers), eos_id=31, pad_id=0, step=step)
    assert counts["dropped_equal"] == 2 and [p.prompt for p in again] == [prompts[2]]


def test_kdl_align_proxy_kd_builds_sft_then_preference_as_two_cached_artifacts(kdl_env, monkeypatch):
    settings = ["experiment=tiny", "alignment=proxy_kd", "alignment.lora_rank=null",
                "alignment.preference.learning_rate=1e-3", "alignment.preference.max_new_tokens=8"]  # fmt: skip
    kdl("align", *settings, env_dir=kdl_env)
    folders = artifacts(kdl_env, "align")
    assert len(folders) == 2  # the SFT proxy, and the proxy after DPO
    (preferred,) = [f for f in folders if (f / "model" / "preference.json").is_file()]
    report = json.loads((preferred / "model" / "preference.json").read_text())
    assert report["pairs"] > 0 and report["pairs"] + report["dropped_equal"] == report["samples"]
    from safetensors.torch import load_file

    (sft,) = [f for f in folders if f != preferred]
    before, after = (load_file(f / "model" / "model.safetensors") for f in (sft, preferred))
    assert before.keys() == after.keys() and any(not torch.equal(before[k], after[k]) for k in before)
    kdl("align", *settings, "alignment.preference.beta=0.5", env_dir=kdl_env)  # SFT reused, DPO rebuilt
    assert len(artifacts(kdl_env, "align")) == 3
    bad = kdl("align", *settings, "alignment.preference.beta=0", env_dir=kdl_env, check=False)
    assert (
        bad.returncode == 1 and "alignment.preference.beta must be > 0" in bad.stderr.strip().splitlines()[-1]
    )

    from kd_lightning.modules import alignment

    def nothing_left(model, records, eos_id, pad_id, step):
        return [], {
            "prompts": len(records),
            "samples": len(records),
            "pairs": 0,
            "dropped_equal": len(records),
        }

    monkeypatch.setattr(alignment, "preference_pairs", nothing_left)
    empty = kdl("align", *settings, "alignment.preference.beta=0.7", env_dir=kdl_env, check=False)
    assert empty.returncode == 1 and "no preference pairs left" in empty.stderr.strip().splitlines()[-1]
