"""MiniLLM, GKD and DistiLLM modules on tiny in-process models: they run under a Trainer, keep the teacher
out of the checkpoint, and lower the reverse KL to the teacher."""

from __future__ import annotations

import json
import os

import pytest
import torch
from lightning import Trainer

from kd_lightning.data.datamodule import TeacherTextDataModule
from kd_lightning.data.records import read_jsonl
from kd_lightning.data.tokenized import tokenize_records
from kd_lightning.evaluation.reverse_kl import sampled_reverse_kl
from kd_lightning.losses import GeneralizedJSD, HardCrossEntropy, SkewForwardKL
from kd_lightning.models.builders import tiny_llama
from kd_lightning.models.loading import load_causal_lm, load_tokenizer
from kd_lightning.modules.minillm import MiniLLMModule
from kd_lightning.modules.on_policy import AdaptiveStudentData, FixedStudentData, OnPolicyDistillModule


def setup(tiny_dir, records: int = 48):
    tok = load_tokenizer(tiny_dir)
    teacher = load_causal_lm(tiny_dir)
    with torch.no_grad():  # a confident teacher, so the reverse KL has far to fall
        teacher.model.norm.weight.mul_(6.0)
    student = tiny_llama(len(tok), hidden_size=32, num_layers=1, num_heads=2, intermediate_size=64, seed=1)
    rows = read_jsonl(tiny_dir / "corpus.jsonl")
    train = tokenize_records(rows[:records], tok, 96)
    heldout = tokenize_records(rows[records : records + 16], tok, 96)
    dm = TeacherTextDataModule(batch_size=8, eval_batch_size=8).connect(tok.pad_token_id, train, heldout)
    prompts = [heldout.sequence(i)[: heldout.prompt_lens[i]].tolist() for i in range(len(heldout))]
    return tok, teacher, student, dm, prompts


def reverse_kl(student, teacher, tok, prompts) -> float:
    return sampled_reverse_kl(
        student,
        teacher,
        prompts,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
        max_new_tokens=12,
    )["reverse_kl"]


def trainer(tmp_path, **settings) -> Trainer:
    defaults = dict(
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        default_root_dir=tmp_path,
        accelerator="cpu",
        num_sanity_val_steps=0,
        limit_val_batches=0,
    )
    return Trainer(**{**defaults, **settings})


def test_minillm_run_lowers_reverse_kl_and_keeps_the_teacher_out(tiny_dir, tmp_path):
    tok, teacher, student, dm, prompts = setup(tiny_dir)
    before = reverse_kl(student, teacher, tok, prompts)
    module = MiniLLMModule(
        student,
        teacher,
        tok,
        optimizer=lambda params: torch.optim.AdamW(params, lr=5e-3),
        max_new_tokens=12,
        ppo_epochs=2,
        pt_loss_weight=0.0,
        eval_generation_limit=0,
    )
    assert not any(k.startswith("teacher") for k in module.state_dict())
    trainer(tmp_path, max_steps=12).fit(module, datamodule=dm)
    after = reverse_kl(module.student, teacher, tok, prompts)
    assert after < 0.8 * before, (before, after)
    assert (
        len(module.step_seconds["rollout_seconds"]) == 6 and len(module.step_seconds["update_seconds"]) == 6
    )
    assert all(p.grad is None or not p.requires_grad for p in teacher.parameters())


def test_minillm_validation_logs_rouge_l_and_keeps_the_best_checkpoint(tiny_dir, tmp_path):
    tok, teacher, student, dm, _ = setup(tiny_dir, records=16)
    module = MiniLLMModule(
        student,
        teacher,
        tok,
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
        max_new_tokens=6,
        ppo_epochs=1,
        eval_generation_limit=4,
        eval_max_new_tokens=6,
    )
    fit = trainer(tmp_path, max_steps=2, limit_val_batches=1, val_check_interval=1, enable_checkpointing=True)
    fit.fit(module, datamodule=dm)
    metrics = fit.callback_metrics
    assert {"val/rouge_l", "val/reverse_kl", "val/nll"} <= set(metrics)
    assert 0.0 <= float(metrics["val/rouge_l"]) <= 1.0 and float(metrics["val/reverse_kl"]) >= 0.0
    best = fit.checkpoint_callback.best_model_path
    assert "best-rouge_l" in best and (tmp_path / "checkpoints" / "last.ckpt").is_file()
    saved = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    assert all(k.startswith("student.") for k in saved)


def test_minillm_refuses_bad_settings(tiny_dir):
    tok, teacher, student, _, _ = setup(tiny_dir, records=8)
    optimizer = lambda params: torch.optim.SGD(params, lr=0.1)  # noqa: E731
    for bad, match in (
        ({"teacher_mix_alpha": 1.5}, "teacher_mix_alpha"),
        ({"ppo_clip": 0.0}, "ppo_clip"),
        ({"ppo_epochs": 0}, "ppo_epochs"),
        ({"discount": 0.0}, "discount"),
        ({"pt_loss_weight": -1.0}, "pt_loss_weight"),
    ):
        with pytest.raises(ValueError, match=match):
            MiniLLMModule(student, teacher, tok, optimizer, **bad)
    with pytest.raises(ValueError, match="vocab_size"):
        MiniLLMModule(tiny_llama(len(tok) + 3), teacher, tok, optimizer)


def test_gkd_on_student_samples_uses_only_teacher_terms_and_lowers_reverse_kl(tiny_dir, tmp_path):
    tok, teacher, student, dm, prompts = setup(tiny_dir)
    before = reverse_kl(student, teacher, tok, prompts)
    terms = {"hard_ce": HardCrossEntropy(), "jsd": GeneralizedJSD("teacher", beta=0.5)}
    module = OnPolicyDistillModule(
        student,
        teacher,
        terms,
        optimizer=lambda params: torch.optim.AdamW(params, lr=5e-3),
        tokenizer=tok,
        student_data=FixedStudentData(student_data_fraction=1.0),
        max_new_tokens=12,
    )
    seen = []
    original = module.compute_terms

    def spy(logits, batch):
        values = original(logits, batch)
        seen.append(set(values))
        return values

    module.compute_terms = spy
    trainer(tmp_path, max_steps=12).fit(module, datamodule=dm)
    assert seen and all(names == {"jsd"} for names in seen)  # hard CE never sees student samples
    after = reverse_kl(module.student, teacher, tok, prompts)
    assert after < 0.9 * before, (before, after)
    assert not module.replay  # GKD keeps no replay buffer


def test_distillm_fills_its_replay_buffer_then_reuses_it(tiny_dir, tmp_path):
    tok, teacher, student, dm, _ = setup(tiny_dir)
    module = OnPolicyDistillModule(
        student,
        teacher,
        {"skew": SkewForwardKL("teacher", alpha=0.1)},
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
        tokenizer=tok,
        student_data=AdaptiveStudentData(initial_fraction=1.0, replay_capacity=3),
        max_new_tokens=8,
    )
    sources = []
    original = module.batch_source

    def spy():
        sources.append(original())
        return sources[-1]

    module.batch_source = spy
    trainer(tmp_path, max_steps=6).fit(module, datamodule=dm)
    assert sources[:3] == ["fresh"] * 3 and "replay" in sources[3:]
    assert len(module.replay) == 3  # capped at replay_capacity


def test_gkd_needs_a_teacher_term(tiny_dir):
    tok, teacher, student, _, _ = setup(tiny_dir, records=8)
    with pytest.raises(ValueError, match="online teacher"):
        OnPolicyDistillModule(
            student,
            teacher,
            {"hard_ce": HardCrossEntropy()},
            optimizer=lambda params: torch.optim.SGD(params, lr=0.1),
            tokenizer=tok,
            student_data=FixedStudentData(0.5),
        )


def test_adaptive_schedule_grows_on_rising_loss_and_replays_later():
    schedule = AdaptiveStudentData(
        initial_fraction=0.0, fraction_step=0.1, loss_tolerance=0.1, replay_capacity=2
    )
    assert schedule.choose(0, 100, draw=0.0, replay_size=0) == "teacher_text"  # φ = 0: supervised
    schedule.observe_validation_loss(2.0)
    schedule.observe_validation_loss(2.05)  # within tolerance
    assert schedule.fraction == 0.0
    schedule.observe_validation_loss(2.2)
    assert schedule.fraction == pytest.approx(0.1)
    for _ in range(20):
        schedule.observe_validation_loss(schedule.reference_loss + 1.0)
    assert schedule.fraction == 1.0  # capped
    assert schedule.choose(10, 100, draw=0.5, replay_size=0) == "fresh"  # buffer still filling
    assert schedule.choose(90, 100, draw=0.5, replay_size=2) == "replay"  # late: mostly reuse
    assert schedule.choose(10, 100, draw=0.5, replay_size=2) == "fresh"  # early: mostly fresh
    restored = AdaptiveStudentData(replay_capacity=2)
    restored.load_state_dict(schedule.state_dict())
    assert restored.fraction == 1.0 and restored.reference_loss == schedule.reference_loss
    with pytest.raises(ValueError, match="student_data_fraction"):
        FixedStudentData(1.5)


def test_pipeline_variants_seqkd_then_minillm_and_gkd_from_the_cli(kdl_env):
    """`kdl pipeline` with dict variants: MiniLLM and GKD start from the SeqKD student; the table has
    ROUGE-L, the reverse KL to the teacher and rollout/update seconds per step."""
    from tests.helpers.cli import kdl

    tiny = os.environ["KDL_TINY"]
    done = kdl(
        "pipeline",
        "experiment=tiny",
        "teacher=local",
        f"teacher.path={tiny}",
        "kd_target=teacher",
        "loss=[hard_ce,forward_kl,generalized_jsd]",
        "evaluate_students=true",
        "evaluation.generation_limit=4",
        "evaluation.max_new_tokens=8",
        "evaluation.reverse_kl_limit=4",
        "evaluation.reverse_kl_max_new_tokens=8",
        "evaluation.question_sets=[]",
        "+variants.seqkd=[hard_ce]",
        # each on-policy variant composes a module preset at its own package, as experiment files do
        "+module@variants.minillm.module=minillm",
        "++variants.minillm.module.max_new_tokens=8",
        "++variants.minillm.module.eval_generation_limit=4",
        "++variants.minillm.module.eval_max_new_tokens=8",
        "++variants.minillm.init_from=seqkd",
        "++variants.minillm.trainer={max_steps:8,val_check_interval:1,limit_val_batches:1}",
        "+module@variants.gkd.module=gkd",
        "++variants.gkd.module.max_new_tokens=8",
        "++variants.gkd.module.eval_generation_limit=4",
        "++variants.gkd.module.eval_max_new_tokens=8",
        "++variants.gkd.loss=[generalized_jsd]",
        "++variants.gkd.init_from=seqkd",
        "++variants.gkd.trainer={max_steps:2,val_check_interval:1,limit_val_batches:1}",
        env_dir=kdl_env,
    )
    assert "reverse KL to teacher" in done.stdout and "rollout s/step" in done.stdout
    result = json.loads(next((kdl_env / "outputs").rglob("pipeline_result.json")).read_text())
    rows = {row["variant"]: row for row in result["rows"]}
    assert list(rows) == ["seqkd", "minillm", "gkd"]  # no proxy rows: nothing reads the posterior
    assert (
        rows["minillm"]["module"] == "MiniLLMModule" and "best-rouge_l" in rows["minillm"]["best_checkpoint"]
    )
    assert rows["gkd"]["module"] == "OnPolicyDistillModule"
    # every generating module logs val/rouge_l the same way (GKD did not before the shared base)
    headers = {
        path.parent.parent.name: path.read_text().splitlines()[0]
        for path in (kdl_env / "outputs").rglob("metrics.csv")
    }
    for variant in ("minillm", "gkd"):
        assert any(name.endswith(variant) and "val/rouge_l" in h for name, h in headers.items()), headers
    for row in rows.values():
        assert 0.0 <= row["rouge_l"] <= 1.0 and row["reverse_kl"] >= 0.0
    assert rows["minillm"]["rollout_seconds_per_step"] > 0 and rows["minillm"]["update_seconds_per_step"] > 0
    assert not (kdl_env / "artifacts" / "align").exists()

    bad = kdl(
        "pipeline",
        "experiment=tiny",
        "+module@variants.minillm.module=minillm",
        env_dir=kdl_env,
        check=False,
    )
    assert bad.returncode == 1 and "teacher=smollm2" in bad.stderr and "Traceback" not in bad.stderr
    renamed = kdl(
        "pipeline",
        "experiment=tiny",
        "+variants.minillm={method:minillm}",
        env_dir=kdl_env,
        check=False,
    )
    assert renamed.returncode == 1 and "/module@variants.minillm.module" in renamed.stderr
    order = kdl(
        "pipeline",
        "experiment=tiny",
        f"teacher.path={tiny}",
        "teacher=local",
        "+module@variants.minillm.module=minillm",
        "++variants.minillm.init_from=seqkd",
        env_dir=kdl_env,
        check=False,
    )
    assert order.returncode == 1 and "not one of the variants" in order.stderr
