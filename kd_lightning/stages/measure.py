"""The measuring stages: ``kdl fidelity`` (estimates against an open teacher's truth), ``kdl evaluate`` and
``kdl prior-quality``."""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np

from kd_lightning.atomic import atomic_csv, atomic_json
from kd_lightning.evaluation.evaluate import EvaluationSpec
from kd_lightning.evaluation.fidelity import (
    Estimate,
    FidelitySpec,
    fidelity_table,
    label_smoothing_estimate,
    one_hot_estimate,
    score_estimates,
    store_estimate,
)
from kd_lightning.evaluation.prior_quality import PriorQualitySpec, prior_quality, prior_quality_table
from kd_lightning.evaluation.results import evaluation_result
from kd_lightning.evaluation.tables import evaluation_table
from kd_lightning.models.loading import freeze, load_causal_lm
from kd_lightning.modules.training import trained_students
from kd_lightning.stages.context import StageContext
from kd_lightning.stages.estimate import posterior, prior, teacher_logprobs

log = logging.getLogger(__name__)


def evaluate(ctx: StageContext, name: str, model_path: str | Path, spec: EvaluationSpec) -> dict[str, Any]:
    """Held-out metrics of one model (cached per model, held-out text, settings and code); the per-record
    figures stay in the cached result."""
    result = evaluation_result(
        ctx.workspace, ctx.corpus(), name, model_path, spec, ctx.teacher_path, ctx.code.get("eval")
    )
    return {key: value for key, value in result.items() if key != "per_record"}


def fidelity_estimates(ctx: StageContext, spec: FidelitySpec) -> list[Estimate]:
    """Every estimate ``kdl fidelity`` scores, building (or reusing) the prior and posterior stores.

    One-hot labels and label smoothing need nothing; the prior is built per (n, γ) and the posterior per R
    with estimators that differ from the context's only in that setting, so every store is cached as usual
    and a later ``kdl distill`` with the same settings reuses it.
    """
    vocab = ctx.corpus().vocab_size
    estimates = [Estimate("one-hot", {}, lambda observed: one_hot_estimate(observed, vocab), "one-hot")]
    for eps in spec.label_smoothing:
        estimates.append(
            Estimate(
                f"label smoothing ε={eps:g}",
                {"label_smoothing": eps},
                lambda observed, e=eps: label_smoothing_estimate(observed, vocab, e),
                "label smoothing",
            )
        )
    for n in spec.ngram_orders:
        for gamma in spec.gammas:
            estimator = ctx.prior_estimator.with_changes(ngram_order=n, gamma=gamma)
            estimates.append(
                Estimate(
                    f"prior n={n} γ={gamma:g}",
                    {"ngram_order": n, "gamma": gamma},
                    store_estimate(prior(ctx, estimator), vocab),
                    f"prior γ={gamma:g}",
                )
            )
    base = ctx.prior_estimator
    for rounds in spec.sampling_rounds:
        estimator = ctx.posterior_estimator.with_changes(sampling_rounds=rounds)
        estimates.append(
            Estimate(
                f"posterior R={rounds} (prior n={base.ngram_order} γ={base.gamma:g})",
                {"ngram_order": base.ngram_order, "gamma": base.gamma, "sampling_rounds": rounds},
                store_estimate(posterior(ctx, estimator), vocab),
                f"posterior (prior n={base.ngram_order} γ={base.gamma:g})",
            )
        )
    if spec.api_evidence_weights and not ctx.corpus_spec.logprobs:
        raise ValueError(
            "fidelity.api_evidence_weights needs the API's log-probs: set data.logprobs=<logprobs.jsonl from "
            "kdl generate sampling.top_logprobs=K>"
        )
    if ctx.corpus_spec.logprobs:  # the API's top-K alone, and the posterior that counts it at each λ
        estimates.append(Estimate("API top-K alone", {}, store_estimate(teacher_logprobs(ctx), vocab), "API"))
        rounds = ctx.posterior_estimator.sampling_rounds
        for weight in spec.api_evidence_weights:
            estimator = ctx.posterior_estimator.with_changes(api_evidence_weight=weight)
            estimates.append(
                Estimate(
                    f"posterior R={rounds} + API λ={weight:g}",
                    {"sampling_rounds": rounds, "api_evidence_weight": weight},
                    store_estimate(posterior(ctx, estimator), vocab),
                    f"posterior R={rounds} + API",
                )
            )
    return estimates


def run_fidelity(ctx: StageContext, spec: FidelitySpec, out_dir: Path) -> dict[str, Any]:
    """``kdl fidelity``: an open teacher treated as closed; how close does each estimate come to it?

    Writes ``fidelity.csv`` and ``fidelity_positions.npz`` (per-position figures) to ``out_dir``.
    """
    if ctx.teacher_path is None:
        raise ValueError(
            "kdl fidelity needs the open teacher that wrote the corpus: add teacher=smollm2 "
            "(with data=smollm2_self_instruct), or teacher=local teacher.path=<HF folder>"
        )
    corpus = ctx.corpus()
    if len(corpus.train) < spec.records:
        log.warning(
            "fidelity: the training split has %d records, fewer than fidelity.records", len(corpus.train)
        )
    estimates = fidelity_estimates(ctx, spec)
    teacher = freeze(load_causal_lm(ctx.teacher_path))
    corpus.check_model_vocabulary(teacher, str(ctx.teacher_path), "teacher")
    rows, arrays = score_estimates(
        teacher, corpus.train, corpus.pad_id, corpus.vocab_size, estimates, spec.top_k, spec.batch_size
    )
    out_dir.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(out_dir / "fidelity_positions.npz", **arrays)
    atomic_csv(out_dir / "fidelity.csv", rows)
    table = fidelity_table(rows, spec.top_k)
    print(
        f"\nEstimate fidelity on {rows[0]['positions']} positions of {len(corpus.train)} records:\n{table}\n",
        flush=True,
    )
    return {"rows": rows, "table": table, "teacher": str(ctx.teacher_path)}


def run_evaluate(
    ctx: StageContext, spec: EvaluationSpec, models: Sequence[str], out_dir: Path
) -> dict[str, Any]:
    """``kdl evaluate``: every metric of ``spec`` for ``models`` (HF folders or model names; by default
    every student this workspace has trained), one row each; writes ``evaluate.csv``."""
    named = [(model_label(path), path) for path in models]
    named = named or [(name, str(folder)) for name, folder in trained_students(ctx.workspace)]
    if not named:
        raise ValueError(
            "nothing to evaluate: train students first (kdl distill / kdl pipeline) or set "
            "models_to_evaluate=[<HF folder>,...]"
        )
    rows = [evaluate(ctx, name, path, spec) for name, path in named]
    atomic_csv(out_dir / "evaluate.csv", rows)
    table = evaluation_table(rows)
    print(f"\nHeld-out teacher responses ({len(ctx.corpus().heldout)} records):\n{table}\n", flush=True)
    return {"rows": rows, "table": table}


def model_label(path: str) -> str:
    """A table label for a model folder: a trained student's run name, else the folder's name."""
    folder = Path(path)
    result = folder.parent / "result.json"
    if folder.name == "student" and result.is_file():
        return f"{json.loads(result.read_text()).get('name', 'student')} ({folder.parent.name})"
    return folder.name or path


def run_prior_quality(ctx: StageContext, spec: PriorQualitySpec, out_dir: Path) -> dict[str, Any]:
    """``kdl prior-quality``: the n-gram prior on held-out teacher text, per order and amount counted
    (cached as an evaluation); writes ``prior_quality.csv``."""
    corpus = ctx.corpus()
    provenance = {
        "kind": "prior_quality",
        "counted": corpus.counts.fingerprint,
        "heldout": corpus.heldout.fingerprint,
        "spec": asdict(spec),
        "code": ctx.code.get("eval"),
    }

    def build(path: Path) -> dict[str, Any]:
        result = {"rows": prior_quality(corpus.counts, corpus.heldout, corpus.vocab_size, spec)}
        atomic_json(path, result)
        return result

    result = ctx.workspace.cached(
        "eval", provenance, build, lambda path: json.loads(path.read_text()), done=None, suffix=".json"
    )
    rows = result["rows"]
    atomic_csv(out_dir / "prior_quality.csv", rows)
    table = prior_quality_table(rows)
    print(
        f"\nThe n-gram prior on {rows[0]['heldout_tokens']:,} held-out teacher tokens:\n{table}\n", flush=True
    )
    return {"rows": rows, "table": table}
