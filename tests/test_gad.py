"""GAD (recipe=gad): its losses against their definitions, a discriminator that learns to tell the teacher's
answers from the student's, a student whose reward rises against it, and the command line (a kill resumes
to the uninterrupted student; packing and FSDP refused in one line)."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from lightning import Callback, Trainer

from kd_lightning.data.batch import IGNORE_INDEX, TextBatch
from kd_lightning.data.datamodule import TeacherTextDataModule
from kd_lightning.data.records import read_jsonl
from kd_lightning.data.tokenized import tokenize_records
from kd_lightning.losses.adversarial import bradley_terry_loss, group_advantages, k3_kl, pair_accuracy
from kd_lightning.models.discriminator import SequenceScorer
from kd_lightning.models.loading import load_causal_lm, load_tokenizer
from kd_lightning.modules.gad import GADModule, teacher_answers_within
from kd_lightning.rollout import prompts_from_batch
from tests.helpers.cli import artifacts, kdl


def test_the_bradley_terry_loss_and_pair_accuracy_are_their_definitions():
    teacher = torch.tensor([1.0, -0.5])
    student = torch.tensor([[0.0, 2.0, 1.0], [-1.0, -0.5, 0.5]])
    expected = [
        -math.log(1.0 / (1.0 + math.exp(-(float(t) - float(s)))))
        for t, row in zip(teacher, student)
        for s in row
    ]
    assert float(bradley_terry_loss(teacher, student)) == pytest.approx(sum(expected) / 6, rel=1e-6)
    assert float(pair_accuracy(teacher, student)) == pytest.approx((1 + 0 + 0.5 + 1 + 0.5 + 0) / 6)


def test_group_advantages_are_normalised_within_each_prompt():
    rewards = torch.tensor([[1.0, 2.0, 3.0, 6.0], [5.0, 5.0, 5.0, 5.0]])
    advantages = group_advantages(rewards)
    row = rewards[0]
    expected = (row - row.mean()) / (row.std(unbiased=False) + 1e-6)
    torch.testing.assert_close(advantages[0], expected)
    assert float(advantages[1].abs().max()) == 0.0  # equal rewards: no signal
    assert float(group_advantages(torch.tensor([[3.0]])).abs().max()) == 0.0
    logprobs, reference = torch.tensor([[-1.0, -2.0]]), torch.tensor([[-1.5, -2.0]])
    r = reference - logprobs
    torch.testing.assert_close(k3_kl(logprobs, reference), r.exp() - r - 1)


def tiny_gad(tiny_dir, **settings):
    tok = load_tokenizer(tiny_dir)
    rows = read_jsonl(tiny_dir / "corpus.jsonl")
    train, held = tokenize_records(rows[:64], tok, 96), tokenize_records(rows[64:80], tok, 96)
    torch.manual_seed(0)
    module = GADModule(
        load_causal_lm(tiny_dir),
        optimizer=lambda params: torch.optim.AdamW(params, lr=1e-3),
        tokenizer=tok,
        **{
            "discriminator_lr": 1e-3,
            "group_size": 4,
            "max_new_tokens": 16,
            "eval_generation_limit": 0,
            **settings,
        },
    )
    return module, TeacherTextDataModule(batch_size=4).connect(tok.pad_token_id, train, held)


class Metrics(Callback):
    def __init__(self) -> None:
        self.rows: list[dict[str, float]] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx) -> None:
        self.rows.append({k: float(v) for k, v in trainer.callback_metrics.items() if k.startswith("train/")})


def fit(module, data, steps: int, validate: bool = False) -> Metrics:
    metrics = Metrics()
    trainer = Trainer(
        accelerator="cpu", max_steps=steps, logger=False, enable_checkpointing=False, enable_progress_bar=False,
        enable_model_summary=False, callbacks=[metrics], limit_val_batches=2 if validate else 0,
        val_check_interval=steps if validate else None, check_val_every_n_epoch=None if validate else 1,
    )  # fmt: skip
    trainer.fit(module, datamodule=data)
    module.final_metrics = {k: float(v) for k, v in trainer.callback_metrics.items()}
    return metrics


def test_the_teachers_answers_are_cut_to_the_students_budget():
    """Row 0: prompt of 3 (its last token is the first target position), answer of 5; row 1: prompt of 2,
    answer of 2 (within the budget: kept whole). Right-padded with 0."""
    ids = torch.tensor([[5, 6, 7, 11, 12, 13, 14, 15], [8, 9, 21, 22, 0, 0, 0, 0]])
    mask = torch.tensor([[1] * 8, [1, 1, 1, 1, 0, 0, 0, 0]])
    targets = torch.full_like(ids, IGNORE_INDEX)
    targets[0, 2:7], targets[1, 1:3] = ids[0, 3:8], ids[1, 2:4]
    kept_ids, kept_mask = teacher_answers_within(TextBatch(ids, mask, targets), 3)
    assert kept_ids.tolist() == [[5, 6, 7, 11, 12, 13], [8, 9, 21, 22, 0, 0]]
    assert kept_mask.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]
    whole_ids, whole_mask = teacher_answers_within(TextBatch(ids, mask, targets), 5)
    assert torch.equal(whole_ids, ids) and torch.equal(whole_mask, mask)
    # with an end token (13 in row 0's answer, then a template newline 14 15): kept through it, as sampling
    # stops there; an end token inside a prompt (row 1's 8) does not end the answer
    ended_ids, ended_mask = teacher_answers_within(TextBatch(ids, mask, targets), 5, end_token_id=13)
    assert ended_ids.tolist() == [[5, 6, 7, 11, 12, 13], [8, 9, 21, 22, 0, 0]]
    assert ended_mask.tolist() == [[1, 1, 1, 1, 1, 1], [1, 1, 1, 1, 0, 0]]
    prompt_end = teacher_answers_within(TextBatch(ids, mask, targets), 5, end_token_id=8)[1]
    assert torch.equal(prompt_end, mask)


def test_the_discriminator_compares_answers_within_one_budget(tiny_dir):
    """The teacher's answers D scores in training and validation are no longer than the student's samples
    (max_new_tokens), though the corpus's answers are: D cannot tell them apart by length alone."""
    module, data = tiny_gad(tiny_dir, warmup_steps=100, max_new_tokens=4)
    scored: list[int] = []
    score = module.discriminator.forward

    def recording(input_ids, attention_mask):
        scored.append(int(attention_mask.sum(-1).max()))
        return score(input_ids, attention_mask)

    module.discriminator.forward = recording
    data.setup("fit")
    longest = max(int(b.attention_mask.sum(-1).max()) for b in data.train_dataloader())
    fit(module, data, 2, validate=True)
    assert scored and longest > max(scored)
    prompt_widths = [len(p) for b in data.train_dataloader() for p in prompts_from_batch(b)]
    assert max(scored) <= max(prompt_widths) + 4
    # the module cuts at its sampling end token (SmolLM2's answers go on "<|im_end|>", "\n"; samples stop)
    rows = next(iter(data.train_dataloader()))
    start = len(prompts_from_batch(rows)[0])
    rows.input_ids[0, start + 1] = module.eos_token_id
    assert int(module.teacher_answers(rows)[1][0].sum()) == start + 2


def test_passes_of_fewer_prompts_give_the_steps_of_the_whole_batch(tiny_dir):
    """prompts_per_pass bounds memory only: one warm-up step and two adversarial steps, four prompts at once or
    one prompt's group per pass (each weighed by its share of the tokens or pairs), take the same steps."""
    states, logged = [], []
    for per_pass in (None, 1):
        module, data = tiny_gad(tiny_dir, warmup_steps=1, prompts_per_pass=per_pass, max_grad_norm=None)
        module.configure_optimizers = (  # SGD, unclipped: an update is its gradient (Adam, a clip hide a scale)
            lambda m=module: [torch.optim.SGD(m.student.parameters(), lr=0.5),
                              torch.optim.SGD(m.discriminator.parameters(), lr=0.5)]
        )  # fmt: skip
        logged.append(fit(module, data, 1 + 2 * 2).rows)
        states.append({k: v.detach().double() for k, v in module.state_dict().items()})
    start, _ = tiny_gad(tiny_dir)
    for key, value in start.state_dict().items():
        if key.startswith("discriminator.head"):
            continue  # zero at the start: a relative difference has no scale there
        whole, parts = states[0][key] - value.double(), states[1][key] - value.double()
        assert float(whole.norm()) > 0, key
        assert float((whole - parts).norm() / whole.norm()) < 1e-4, key
    for whole, parts in zip(*logged):
        for name in ("train/discriminator_loss", "train/policy_loss", "train/pair_accuracy"):
            if name in whole:
                assert parts[name] == pytest.approx(whole[name], rel=1e-4, abs=1e-6), name


def test_the_discriminator_learns_the_teacher_from_the_student_during_warm_up(tiny_dir):
    module, data = tiny_gad(tiny_dir, warmup_steps=100)
    metrics = fit(module, data, 12, validate=True)
    assert all(row["train/adversarial"] == 0.0 for row in metrics.rows)  # only D trained
    assert metrics.rows[0]["train/pair_accuracy"] == 0.5  # a zero head scores every answer alike
    assert module.final_metrics["val/pair_accuracy"] > 0.75  # on held-out prompts: far above chance


def test_the_students_reward_rises_against_a_fixed_discriminator(tiny_dir):
    warm, data = tiny_gad(tiny_dir, warmup_steps=100)
    fit(warm, data, 8)  # a discriminator that tells them apart
    module, data = tiny_gad(
        tiny_dir, warmup_steps=0, discriminator=warm.discriminator, discriminator_lr=1e-12
    )
    rewards = [row["train/reward"] for row in fit(module, data, 24).rows]
    first, last = sum(rewards[:4]) / 4, sum(rewards[-4:]) / 4
    assert last > first, rewards


def test_kdl_distill_recipe_gad_trains_and_resumes_after_a_kill(kdl_env):
    from kd_lightning.cli.build import build_context, student_run
    from kd_lightning.stages.train import run_distill
    from tests.helpers.configs import compose_cfg

    overrides = [
        "experiment=tiny", "recipe=gad", "trainer.max_steps=8", "module.warmup_steps=2",
        "module.max_new_tokens=8", "module.group_size=2", "trainer.limit_val_batches=0",
        "callbacks.model_checkpoint.every_n_train_steps=2",
    ]  # fmt: skip

    class Kill(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step >= 5:  # after the checkpoint of step 4
                raise RuntimeError("killed")

    def context(cfg, callback=None):
        ctx = build_context(cfg)
        if callback is not None:
            build = ctx.trainer_factory

            def factory(folder, name, **kwargs):
                trainer = build(folder, name, **kwargs)
                trainer.callbacks.append(callback)
                return trainer

            ctx.trainer_factory = factory
        return ctx

    cfg = compose_cfg(overrides, "distill")
    with pytest.raises(RuntimeError, match="killed"):
        run_distill(context(cfg, Kill()), student_run(cfg, "gad", ["hard_ce"]))
    (folder,) = artifacts(kdl_env, "distill")
    assert (folder / "checkpoints" / "last.ckpt").is_file()
    resumed = run_distill(context(cfg), student_run(cfg, "gad", ["hard_ce"]))
    clean = kdl("distill", *overrides, "rebuild=[distill]", env_dir=kdl_env)
    assert clean.returncode == 0
    (result,) = list(folder.parent.glob("*/result.json"))
    assert json.loads(result.read_text())["nll"] == pytest.approx(resumed["nll"], abs=1e-6)
    refused = kdl("distill", *overrides, "datamodule.packing=true", env_dir=kdl_env, check=False)
    assert refused.returncode == 1 and "set datamodule.packing=false" in refused.stderr


def test_a_discriminator_scores_left_and_right_padded_sequences_alike(tiny_dir):
    scorer = SequenceScorer(load_causal_lm(tiny_dir))
    torch.nn.init.normal_(scorer.head.weight)
    ids = torch.tensor([[5, 6, 7, 8]])
    right = scorer(torch.tensor([[5, 6, 7, 8, 0, 0]]), torch.tensor([[1, 1, 1, 1, 0, 0]]))
    left = scorer(torch.tensor([[0, 0, 5, 6, 7, 8]]), torch.tensor([[0, 0, 1, 1, 1, 1]]))
    alone = scorer(ids, torch.ones_like(ids))
    torch.testing.assert_close(right, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(left, alone, atol=1e-5, rtol=1e-5)


def test_a_saved_discriminator_scores_as_it_did_and_a_run_starting_beside_it_continues_it(tiny_dir, tmp_path):
    warm, data = tiny_gad(tiny_dir, warmup_steps=100)
    fit(warm, data, 4)  # D trained: its head is no longer zero
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    before = warm.discriminator(ids, torch.ones_like(ids))
    student_folder = tmp_path / "student"
    warm.save_companions(student_folder)
    loaded = SequenceScorer.load(student_folder / "discriminator")
    torch.testing.assert_close(loaded(ids, torch.ones_like(ids)), before)
    assert float(before.detach().abs()) > 0

    continued, _ = tiny_gad(tiny_dir, warmup_steps=0)
    continued.load_companions(student_folder)  # a pipeline variant's init_from
    torch.testing.assert_close(continued.discriminator(ids, torch.ones_like(ids)), before)
    named, _ = tiny_gad(tiny_dir, warmup_steps=0, discriminator_from=str(student_folder / "discriminator"))
    torch.testing.assert_close(named.discriminator(ids, torch.ones_like(ids)), before)
    own, _ = tiny_gad(
        tiny_dir, warmup_steps=0, discriminator=SequenceScorer.copy_of(load_causal_lm(tiny_dir))
    )
    own.load_companions(student_folder)  # a named D is kept
    assert float(own.discriminator(ids, torch.ones_like(ids)).abs()) == 0.0
    with pytest.raises(ValueError, match="keep one"):
        tiny_gad(tiny_dir, discriminator=own.discriminator, discriminator_from=str(student_folder))
    with pytest.raises(FileNotFoundError, match=r"score_head\.safetensors is missing"):
        SequenceScorer.load(tiny_dir)


def test_a_pipeline_compares_gad_from_its_sft_student_with_sft_as_blackbox_compare_does(kdl_env):
    """experiment=blackbox_compare's shape on the tiny models: the GAD variants compose their module preset and
    turn packing off for themselves alone; the discriminator's warm-up is a variant of its own (from the SFT
    student, not scored), trained once and continued by two adversarial variants; each paired with SFT."""
    gad = "++variants.{}.module.{}"
    done = kdl(
        "pipeline",
        "experiment=tiny",
        "loss=[hard_ce]",
        "datamodule.packing=true",
        "evaluate_students=true",
        "evaluation.generation_limit=4",
        "evaluation.max_new_tokens=8",
        "evaluation.question_sets=[]",
        "compare_to=sft",
        "+variants.sft=[hard_ce]",
        *(
            entry
            for name in ("gad_warmup", "gad", "gad_kl")
            for entry in (
                f"+module@variants.{name}.module=gad",
                f"++variants.{name}.loss=[hard_ce]",
                gad.format(name, "group_size=2"),
                gad.format(name, "max_new_tokens=8"),
                gad.format(name, "eval_generation_limit=0"),
                f"++variants.{name}.overrides={{datamodule.packing:false}}",
            )
        ),
        "++variants.gad_warmup.init_from=sft",
        "++variants.gad_warmup.report=false",
        "++variants.gad_warmup.module.warmup_steps=2",
        "++variants.gad_warmup.trainer={max_steps:2,limit_val_batches:2,val_check_interval:2,"
        "check_val_every_n_epoch:null}",
        *(f"++variants.{name}.init_from=gad_warmup" for name in ("gad", "gad_kl")),
        *(f"++variants.{name}.module.warmup_steps=0" for name in ("gad", "gad_kl")),
        "++variants.gad_kl.module.kl_weight=0.1",
        *(
            f"++variants.{name}.trainer={{max_steps:2,limit_val_batches:0,log_every_n_steps:1}}"
            for name in ("gad", "gad_kl")
        ),
        env_dir=kdl_env,
    )
    assert done.returncode == 0
    result = json.loads(next((kdl_env / "outputs").rglob("pipeline_result.json")).read_text())
    rows = {row["variant"]: row for row in result["rows"]}
    assert list(rows) == ["sft", "gad", "gad_kl"] and rows["gad"]["module"] == "GADModule"  # no warm-up row
    assert rows["gad"]["nll"] > 0 and 0.0 <= rows["gad"]["rouge_l"] <= 1.0
    assert rows["gad"]["nll"] != rows["sft"]["nll"]  # it trained on from the SFT student
    warmups = [
        json.loads(r.read_text())
        for r in (kdl_env / "artifacts" / "distill").glob("*/result.json")
        if json.loads(r.read_text())["name"].endswith("gad_warmup")
    ]
    assert len(warmups) == 1  # trained once, shared by both adversarial variants
    assert "nll" not in warmups[0]  # not scored on the held-out set
    assert 0.0 <= warmups[0]["last_validation"]["val/pair_accuracy"] <= 1.0
    warm_d = Path(warmups[0]["folder"]) / "student" / "discriminator"
    assert (warm_d / "score_head.safetensors").is_file()
    log = next((kdl_env / "outputs").rglob("main.log")).read_text()
    assert log.count(f"the discriminator continues from {warm_d}") == 2
    for name in ("gad", "gad_kl"):  # each saved its own discriminator beside its student
        assert (Path(rows[name]["folder"]) / "student" / "discriminator" / "config.json").is_file()
    gad_metrics = [
        p for p in (kdl_env / "outputs").rglob("metrics.csv") if p.parent.parent.name.endswith("gad")
    ]
    assert gad_metrics and "train/pair_accuracy" in gad_metrics[0].read_text().splitlines()[0]
