"""The kdl CLI end to end on tiny in-process models: pipeline, caching, multirun, resume, errors."""

from __future__ import annotations

import json

import pytest
import torch

from kd_lightning.artifacts import build_events
from kd_lightning.data.datamodule import collate
from tests.helpers.cli import artifacts, build_counts, kdl


def test_tiny_pipeline_end_to_end_then_served_from_the_cache(kdl_env):
    done = kdl("pipeline", "experiment=tiny", env_dir=kdl_env)
    assert "| proxy (before alignment) |" in done.stdout and "| student plus_prior_posterior |" in done.stdout
    result = json.loads(next((kdl_env / "outputs").rglob("pipeline_result.json")).read_text())
    names = [row["name"] for row in result["rows"]]
    assert names == [
        "proxy (before alignment)",
        "proxy (aligned)",
        "student sft_only",
        "student plus_prior",
        "student plus_prior_posterior",
    ]
    rows = {row["name"]: row for row in result["rows"]}
    assert (
        rows["proxy (aligned)"]["nll"] < rows["proxy (before alignment)"]["nll"]
    )  # alignment fits the teacher text
    for stage in ("prior", "posterior", "align", "corpus"):
        assert len(artifacts(kdl_env, stage)) == 1
    built = build_counts(kdl_env)
    assert built and all(builds == 1 for builds, _ in built.values()), built
    assert sum(trains for _, trains in built.values()) == 3  # one training per student
    # a second run is served from the cache: nothing built or trained again
    kdl("pipeline", "experiment=tiny", env_dir=kdl_env)
    assert build_counts(kdl_env) == built


def test_stage_by_stage_and_multirun_reuses_prior_and_proxy(kdl_env):
    kdl("prior", "experiment=tiny", env_dir=kdl_env)
    assert len(artifacts(kdl_env, "prior")) == 1 and not artifacts(kdl_env, "align")
    kdl("posterior", "-m", "experiment=tiny", "estimator.posterior.sampling_rounds=1,2", env_dir=kdl_env)
    assert len(artifacts(kdl_env, "posterior")) == 2
    assert len(artifacts(kdl_env, "prior")) == 1 and len(artifacts(kdl_env, "align")) == 1
    kdl("distill", "experiment=tiny", "loss=[hard_ce,prior_kl]", env_dir=kdl_env)
    assert len(artifacts(kdl_env, "distill")) == 1
    assert len(list((kdl_env / "multirun").rglob("posterior_result.json"))) == 2


@pytest.mark.parametrize("where", ["mid_epoch", "at_an_epoch_end"])
def test_killed_distill_resumes_from_its_last_checkpoint_to_the_uninterrupted_result(
    kdl_env, monkeypatch, where
):
    """A kill after a checkpoint resumes to the uninterrupted student, wherever the checkpoint fell: mid-epoch
    (its remaining batches, not the first ones again) or at an epoch's last batch (the next epoch, all of it:
    this case once skipped a whole epoch)."""
    from lightning import Callback

    from kd_lightning.cli.build import build_context, student_run
    from kd_lightning.data.datamodule import EpochBatchSampler
    from kd_lightning.stages.train import run_distill
    from tests.helpers.configs import compose_cfg

    overrides = ["experiment=tiny", "loss=[hard_ce,prior_kl]", "trainer.max_epochs=3"]
    cfg = compose_cfg(overrides, "distill")
    dm = TeacherTextDataModule_for(cfg)
    steps_per_epoch = len(EpochBatchSampler(len(dm.train_set), dm.batch_size, dm.shuffle_seed))
    every = cfg.callbacks.model_checkpoint.every_n_train_steps
    if where == "mid_epoch":
        saved = every * 2
        assert saved % steps_per_epoch, "the tiny corpus must put this checkpoint inside an epoch"
    else:  # the first epoch end that is also a checkpoint step
        saved = next(e * steps_per_epoch for e in (1, 2, 3, 4) if e * steps_per_epoch % every == 0)
        assert saved < 3 * steps_per_epoch, "the tiny run must go on past that epoch"
    seen: dict[str, object] = {}

    class Kill(Callback):
        def on_train_batch_end(self, trainer, *args):
            if trainer.global_step > saved:
                raise RuntimeError(f"killed after step {saved}")

    class Record(Callback):
        def __init__(self, into: dict) -> None:
            self.into = into

        def on_train_start(self, trainer, *args):
            self.into["start_step"] = trainer.global_step

        def on_train_batch_start(self, trainer, module, batch, batch_idx):
            self.into.setdefault("first_batch", batch.input_ids.clone())
            self.into.setdefault("epoch_starts", {}).setdefault(
                trainer.current_epoch, batch.input_ids.clone()
            )

        def on_train_end(self, trainer, *args):
            self.into["end_step"] = trainer.global_step

    def with_callback(ctx, callback):
        build = ctx.trainer_factory

        def factory(folder, name, **kwargs):
            trainer = build(folder, name, **kwargs)
            trainer.callbacks.append(callback)
            return trainer

        ctx.trainer_factory = factory
        return ctx

    def run(cfg):
        return student_run(cfg, "student", ["hard_ce", "prior_kl"])

    def batch_at(epoch: int, index: int):
        sampler = EpochBatchSampler(len(dm.train_set), dm.batch_size, dm.shuffle_seed)
        sampler.set_epoch(epoch)
        rows = list(sampler)[index]
        return collate([dm.train_set[i] for i in rows], dm.pad_id, dm.store_names).input_ids

    with pytest.raises(RuntimeError, match="killed"):
        run_distill(with_callback(build_context(cfg), Kill()), run(cfg))
    (folder,) = artifacts(kdl_env, "distill")
    assert (folder / "checkpoints" / "last.ckpt").is_file() and not (folder / "result.json").exists()
    result = run_distill(with_callback(build_context(cfg), Record(seen)), run(cfg))
    assert seen["start_step"] == saved  # resumed from the checkpoint, not from 0
    # the first batch trained after the resume is the next one of the seeded order of its epoch
    assert torch.equal(seen["first_batch"], batch_at(*divmod(saved, steps_per_epoch)))
    assert (folder / "result.json").is_file() and result["tokens"] > 0
    (trained,) = build_events(folder, "train")  # the killed fit raised before it could finish
    assert trained["start_step"] == saved and trained["end_step"] == seen["end_step"] == 3 * steps_per_epoch
    # the resumed student is the one an uninterrupted run trains
    monkeypatch.setenv("KDL_ARTIFACTS", str(kdl_env / "clean"))
    clean_cfg = compose_cfg(overrides, "distill")
    clean_seen: dict[str, object] = {}
    clean = run_distill(with_callback(build_context(clean_cfg), Record(clean_seen)), run(clean_cfg))
    assert result["nll"] == pytest.approx(clean["nll"], abs=1e-6) and result["tokens"] == clean["tokens"]
    # and every epoch is drawn in its own order (Lightning sets the epoch where it looks for it)
    starts = clean_seen["epoch_starts"]
    assert sorted(starts) == [0, 1, 2]
    assert all(torch.equal(starts[e], batch_at(e, 0)) for e in starts)
    assert not torch.equal(starts[0], starts[1])


def TeacherTextDataModule_for(cfg):
    from hydra.utils import instantiate

    from kd_lightning.cli.build import build_context
    from kd_lightning.stages.registry import stores_for

    ctx = build_context(cfg)
    corpus = ctx.corpus()
    dm = instantiate(cfg.datamodule)
    return dm.connect(corpus.pad_id, corpus.train, corpus.heldout, stores_for(ctx, ("prior",)))


def test_bad_corpus_is_a_one_line_error(kdl_env):
    bad = kdl_env / "bad.jsonl"
    bad.write_text('{"instruction": "a", "response": "b"}\nnot json\n')
    done = kdl("prior", "experiment=tiny", f"data.path={bad}", env_dir=kdl_env, check=False)
    assert done.returncode == 1
    assert f"{bad}:2: malformed JSON" in done.stderr
    assert "Traceback" not in done.stderr


def test_unknown_stage_is_an_error_that_points_at_help(kdl_env):
    done = kdl("train", env_dir=kdl_env, check=False)
    assert done.returncode == 2 and "unknown stage 'train'" in done.stderr and "kdl --help" in done.stderr


def test_lora_alignment_with_warmup_merges_into_a_plain_model(kdl_env):
    pytest.importorskip("peft")
    kdl(
        "align",
        "experiment=tiny",
        "alignment=lora",
        "alignment.batch_size=8",
        "alignment.warmup_steps=3",
        "alignment.learning_rate=1e-3",
        env_dir=kdl_env,
    )
    (folder,) = artifacts(kdl_env, "align")
    from kd_lightning.models.loading import load_causal_lm

    model = load_causal_lm(folder / "model")  # merged: loads as an ordinary HF model
    assert not any("lora" in name for name, _ in model.named_parameters())


def test_hf_datasets_corpus(kdl_env, tiny_dir):
    datasets = pytest.importorskip("datasets")
    rows = [json.loads(line) for line in (tiny_dir / "corpus.jsonl").read_text().splitlines()]
    folder = kdl_env / "ds"
    datasets.Dataset.from_list(
        [{"question": r["instruction"], "answer": r["response"]} for r in rows]
    ).save_to_disk(str(folder))
    kdl(
        "prior",
        "experiment=tiny",
        "data=hf_dataset",
        f"data.path={folder}",
        "data.heldout_size=8",
        "data.max_seq_len=96",
        "+data.fields={instruction: question, response: answer}",
        env_dir=kdl_env,
    )
    assert len(artifacts(kdl_env, "prior")) == 1


def test_proxy_with_another_tokenizer_is_refused_at_start_up(kdl_env, tmp_path_factory):
    from kd_lightning.models.tiny_assets import build_tiny_assets

    other = build_tiny_assets(tmp_path_factory.mktemp("other"))
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(other)
    tok.add_tokens(["<extra>"])
    tok.save_pretrained(other)
    done = kdl("align", "experiment=tiny", f"proxy.path={other}", env_dir=kdl_env, check=False)
    assert done.returncode == 1 and "uses a different tokenizer" in done.stderr


def test_bad_setting_is_a_one_line_error_naming_it(kdl_env):
    done = kdl("prior", "experiment=tiny", "estimator.prior.gamma=0.5", env_dir=kdl_env, check=False)
    assert done.returncode == 1
    assert "gamma must be >= 1" in done.stderr and "estimator.prior" in done.stderr
    assert "Traceback" not in done.stderr


def test_student_with_too_small_vocabulary_is_refused_at_start_up(kdl_env):
    done = kdl(
        "distill",
        "experiment=tiny",
        "loss=[hard_ce]",
        "student._target_=kd_lightning.models.builders.tiny_llama",
        "~student.tokenizer_path",
        "+student.vocab_size=10",
        env_dir=kdl_env,
        check=False,
    )
    assert done.returncode == 1 and "config.vocab_size=10" in done.stderr and "Traceback" not in done.stderr


def test_any_divergence_distils_against_an_estimated_target(kdl_env):
    done = kdl(
        "distill", "experiment=tiny", "loss=[hard_ce,generalized_jsd]", "kd_target=prior", env_dir=kdl_env
    )
    result = json.loads(next((kdl_env / "outputs").rglob("distill_result.json")).read_text())
    assert set(result["terms"]) == {"hard_ce", "generalized_jsd"} and result["nll"] > 0
    assert not artifacts(kdl_env, "posterior"), done.stdout[-500:]  # only the prior was needed


def test_white_box_distillation_from_an_online_teacher(kdl_env, tiny_dir):
    kdl(
        "distill",
        "experiment=tiny",
        "teacher=local",
        f"teacher.path={tiny_dir}",
        "loss=[hard_ce,reverse_kl]",
        "kd_target=teacher",
        env_dir=kdl_env,
    )
    result = json.loads(next((kdl_env / "outputs").rglob("distill_result.json")).read_text())
    assert set(result["terms"]) == {"hard_ce", "reverse_kl"}
    assert not artifacts(kdl_env, "prior") and not artifacts(kdl_env, "posterior")  # no estimates needed


def test_teacher_terms_without_a_teacher_are_a_start_up_error(kdl_env):
    done = kdl(
        "distill", "experiment=tiny", "loss=[forward_kl]", "kd_target=teacher", env_dir=kdl_env, check=False
    )
    assert (
        done.returncode == 1 and "no teacher is configured" in done.stderr and "Traceback" not in done.stderr
    )


def test_distill_with_loss_chunks_from_the_cli_matches_the_plain_path(kdl_env):
    results = []
    for extra in ([], ["loss_chunk_size=16"]):
        kdl("distill", "experiment=tiny", "loss=[hard_ce,prior_kl]", *extra, env_dir=kdl_env)
        newest = max((kdl_env / "outputs").rglob("distill_result.json"), key=lambda p: p.stat().st_mtime)
        results.append(json.loads(newest.read_text()))
    plain, chunked = results
    assert plain["loss_chunk_size"] is None and chunked["loss_chunk_size"] == 16
    assert chunked["nll"] == pytest.approx(plain["nll"], abs=2e-3)  # same training, up to float reordering
