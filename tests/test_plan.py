"""``kdl plan``: its estimates against what the stages then build."""

from __future__ import annotations

import json
import shutil

from tests.helpers.cli import artifacts, kdl


def folder_bytes(folder) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def test_plan_predicts_corpus_and_store_sizes_before_anything_heavy_runs(kdl_env):
    done = kdl("plan", "experiment=tiny", "estimator.posterior.top_k=16", env_dir=kdl_env)
    assert "| posterior store (K=16) |" in done.stdout and "2·P·T" in done.stdout
    plan = json.loads(next((kdl_env / "outputs").rglob("plan_result.json")).read_text())
    assert not artifacts(kdl_env, "align") and not artifacts(kdl_env, "prior")  # nothing heavy ran
    assert plan["flops"]["posterior"] > 0 and plan["loss_peak_bytes"] > 0

    kdl("posterior", "experiment=tiny", "estimator.posterior.top_k=16", env_dir=kdl_env)
    (corpus,) = artifacts(kdl_env, "corpus")
    meta = json.loads((corpus / "train" / "report.json").read_text())
    assert plan["corpus"]["records"] == meta["kept"]
    for store in ("prior", "posterior"):
        (folder,) = artifacts(kdl_env, store)
        actual = folder_bytes(folder)
        assert abs(plan["store_bytes"][store] - actual) / actual < 0.05, (
            store,
            plan["store_bytes"][store],
            actual,
        )
        rows = json.loads((folder / "meta.json").read_text())["rows"]
        assert rows == plan["corpus"]["target_positions"]


def test_plan_with_loss_chunk_size_bounds_the_loss_memory(kdl_env):
    plain = kdl("plan", "experiment=tiny", env_dir=kdl_env)
    chunked = kdl("plan", "experiment=tiny", "loss_chunk_size=16", env_dir=kdl_env)
    assert "3·c·V·4, c = loss_chunk_size = 16" in chunked.stdout and "3·n·V·4" in plain.stdout
    results = sorted((kdl_env / "outputs").rglob("plan_result.json"), key=lambda p: p.stat().st_mtime)
    first, second = (json.loads(p.read_text())["loss_peak_bytes"] for p in results)
    assert second < first


def test_what_ifs_scale_the_corpus_and_stand_for_absent_models(kdl_env):
    kdl("plan", "experiment=tiny", env_dir=kdl_env)
    kdl(
        "plan",
        "experiment=tiny",
        "plan.records=50000",
        "plan.proxy_parameters=7.6e9",
        env_dir=kdl_env,
    )
    results = sorted((kdl_env / "outputs").rglob("plan_result.json"), key=lambda p: p.stat().st_mtime)
    base, big = (json.loads(p.read_text()) for p in results)
    scale = 50000 / base["corpus"]["records"]
    assert big["corpus"]["records"] == 50000
    assert abs(big["corpus"]["target_positions"] / base["corpus"]["target_positions"] - scale) < 1e-3 * scale
    assert big["flops"]["posterior"] == 2 * 7.6e9 * big["corpus"]["tokens"]
    assert big["store_bytes"]["prior"] > 100 * base["store_bytes"]["prior"]


def test_parameter_count_from_config_alone_equals_the_weights(tmp_path):
    from kd_lightning.models.builders import tiny_llama
    from kd_lightning.models.size import parameter_count

    model = tiny_llama(300, hidden_size=32, num_layers=2, num_heads=2, intermediate_size=64)
    model.save_pretrained(tmp_path / "full")
    model.config.save_pretrained(tmp_path / "config_only")  # what `hf download <id> config.json` leaves
    expected = sum(p.numel() for p in model.parameters())
    assert parameter_count(str(tmp_path / "config_only")) == expected
    assert parameter_count(str(tmp_path / "full")) == expected


def test_store_formats_are_planned_written_and_trained_from(kdl_env):
    """store_format=log8: the plan's size is exact within 5%; topk_floor (ragged): the plan is an upper bound
    and the store is smaller than log8's; a student trains from each (the distill stage reads format 2)."""
    sizes = {}
    for fmt in ("log8", "topk_floor"):
        settings = ["experiment=tiny", f"store_format={fmt}"]
        kdl("plan", *settings, env_dir=kdl_env)
        plan = json.loads(sorted((kdl_env / "outputs").rglob("plan_result.json"))[-1].read_text())
        kdl("prior", *settings, env_dir=kdl_env)
        (folder,) = artifacts(kdl_env, "prior")
        meta = json.loads((folder / "meta.json").read_text())
        assert meta["format_version"] == 2 and meta["provenance"]["format"]["ragged"] == (fmt == "topk_floor")
        sizes[fmt] = actual = folder_bytes(folder)
        if fmt == "log8":
            assert abs(plan["store_bytes"]["prior"] - actual) / actual < 0.05, (plan["store_bytes"], actual)
            shutil.rmtree(folder)  # the next format's store is the only prior
        else:
            assert actual <= plan["store_bytes"]["prior"]
    assert sizes["topk_floor"] < sizes["log8"]
    kdl("distill", *settings, "loss=[hard_ce,prior_kl]", "trainer.max_steps=2", env_dir=kdl_env)
    (student,) = artifacts(kdl_env, "distill")
    result = json.loads((student / "result.json").read_text())
    assert result["nll"] > 0 and result["nll"] < 20


def test_plan_of_a_recipe_without_hard_ce_plans_its_one_student(kdl_env, tiny_dir):
    """recipe=gkd selects generalized_jsd alone; planning once failed on the pipeline's default variants
    (which need hard_ce), though `kdl distill recipe=gkd` runs."""
    done = kdl(
        "plan", "experiment=tiny", "recipe=gkd", "teacher=local", f"teacher.path={tiny_dir}", env_dir=kdl_env
    )
    assert "KD loss memory per step" in done.stdout and "posterior store" not in done.stdout


def test_plan_counts_proxy_kd_preference_step(kdl_env):
    """alignment=proxy_kd adds the SFT proxy's sampling and DPO, as upper bounds that scale with the samples
    drawn per prompt and are absent without a preference step."""
    plans = {}
    for samples in (1, 2):
        kdl(
            "plan", "experiment=tiny", "alignment=proxy_kd", f"alignment.preference.samples={samples}",
            "alignment.preference.max_new_tokens=16", env_dir=kdl_env,
        )  # fmt: skip
        plans[samples] = json.loads(
            max((kdl_env / "outputs").rglob("plan_result.json"), key=lambda p: p.stat().st_mtime).read_text()
        )
    one, two = plans[1]["flops"], plans[2]["flops"]
    proxy = next(r["value"] for r in plans[1]["rows"] if r["item"] == "proxy parameters (P)")
    records = plans[1]["corpus"]["records"]  # experiment=tiny aligns on every training record
    assert one["preference_sampling"] >= 2 * proxy * records * 16  # at least the answers' new tokens
    assert one["preference_dpo"] > one["align"] * 8 / 6  # pairs hold the teacher's answer and a sample
    assert two["preference_sampling"] == 2 * one["preference_sampling"]
    assert two["preference_dpo"] == 2 * one["preference_dpo"] and two["align"] == one["align"]
    kdl("plan", "experiment=tiny", env_dir=kdl_env)
    plain = json.loads(
        max((kdl_env / "outputs").rglob("plan_result.json"), key=lambda p: p.stat().st_mtime).read_text()
    )
    assert "preference_dpo" not in plain["flops"] and plain["flops"]["align"] == one["align"]


def test_a_variant_with_its_own_store_format_gets_its_own_planned_sizes(kdl_env):
    """experiment=store_formats' shape: one variant reads the run's fp16 prior, another a log8 one; each size
    is planned and is the written size within 5% (the log8 one from the variant's own plan)."""
    done = kdl(
        "plan", "experiment=tiny", "+variants.fp16=[hard_ce,prior_kl]", "+variants.log8.loss=[hard_ce,prior_kl]",
        "+store_format@variants.log8.store_format=log8", env_dir=kdl_env,
    )  # fmt: skip
    assert "Plan of variant log8" in done.stdout
    plan = json.loads(sorted((kdl_env / "outputs").rglob("plan_result.json"))[-1].read_text())
    assert set(plan["variants"]) == {"log8"}
    planned = {"fp16": plan["store_bytes"]["prior"], "log8": plan["variants"]["log8"]["store_bytes"]["prior"]}
    for fmt in ("fp16", "log8"):
        kdl("prior", "experiment=tiny", f"store_format={fmt}", env_dir=kdl_env)
    written = {
        json.loads((f / "meta.json").read_text())
        .get("encoding", {})
        .get("probabilities", "fp16"): folder_bytes(f)
        for f in artifacts(kdl_env, "prior")
    }
    assert written.keys() == planned.keys()
    for fmt, actual in written.items():
        assert abs(planned[fmt] - actual) / actual < 0.05, (fmt, planned[fmt], actual)
    assert planned["log8"] < planned["fp16"]


def test_plan_has_a_size_row_for_every_store_any_shipped_experiment_reads(kdl_env):
    """Every experiment's terms (its loss, each variant's own loss and overrides, and the kd_target forms a
    run may pick): kdl plan sizes each store they read, named teachers and a mixture's parts included."""
    from types import SimpleNamespace

    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from kd_lightning.cli.build import loss_terms
    from kd_lightning.cli.variants import variant_config
    from kd_lightning.data.store_format import StoreFormat
    from kd_lightning.environment import conf_dir
    from kd_lightning.losses.terms import soft_label_names
    from kd_lightning.stages.plan import size_rows
    from tests.helpers.configs import compose_cfg

    seen: set[str] = set()
    experiments = sorted(
        p.stem for p in (conf_dir() / "experiment").glob("*.yaml") if "generate" not in p.stem
    )
    for experiment in experiments:
        cfg = compose_cfg([f"experiment={experiment}"])
        names = set(soft_label_names(loss_terms(cfg).values()))
        for spec in (cfg.get("variants") or {}).values():
            if spec is None:
                continue
            if OmegaConf.is_list(spec):
                local, terms = cfg, list(spec)
            else:
                local, terms = variant_config(cfg, spec), list(spec.get("loss") or ["hard_ce"])
            names |= set(soft_label_names(loss_terms(local, terms).values()))
        ctx = SimpleNamespace(
            store_format=StoreFormat(),
            prior_estimator=SimpleNamespace(top_k=int(cfg.estimator.prior.top_k)),
            posterior_estimator=SimpleNamespace(top_k=int(cfg.estimator.posterior.top_k)),
            teacher_targets=instantiate(cfg.estimator.teacher_targets),
            teachers={"a": None, "b": None},
        )
        rows, sizes = size_rows(ctx, sorted(names), 1000, 10, 49152)
        assert all(any(n in r.item for r in rows) for n in names), (experiment, names)
        seen |= names
    every = [
        "prior",
        "posterior",
        "offline_teacher",
        "proxy_agreement",
        "teacher_logprobs",
        "teacher:a",
        "teacher_mixture",
    ]
    rows, sizes = size_rows(ctx, every, 1000, 10, 49152)
    assert {"teacher:a", "teacher:b", "teacher_logprobs", "proxy_agreement"} <= set(sizes)
    assert {"prior", "posterior"} <= seen
