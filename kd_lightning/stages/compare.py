"""The comparison stages: ``kdl pipeline`` (students side by side), ``kdl evaluate`` and ``kdl fidelity``."""

from __future__ import annotations

import copy
import csv
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from kd_lightning.artifacts import model_identity
from kd_lightning.atomic import atomic_write_text
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
from kd_lightning.evaluation.results import evaluation_result, proxy_heldout
from kd_lightning.evaluation.tables import results_table, summarize_store
from kd_lightning.models.loading import freeze, load_causal_lm
from kd_lightning.stages.context import StageContext
from kd_lightning.stages.estimate import align, posterior, prior, proxy_key
from kd_lightning.stages.train import StudentRun, run_distill

log = logging.getLogger(__name__)


@dataclass
class Variant:
    """One student of ``kdl pipeline``: its run, and the earlier variant whose student it starts from."""

    name: str
    run: StudentRun
    init_from: str | None = None


def evaluate(ctx: StageContext, name: str, model_path: str | Path, spec: EvaluationSpec) -> dict[str, Any]:
    """Held-out metrics of one model (cached per model, held-out text, settings and code)."""
    return evaluation_result(
        ctx.workspace, ctx.corpus(), name, model_path, spec, ctx.teacher_path, ctx.code.get("eval")
    )


def proxy_rows(ctx: StageContext) -> list[dict[str, Any]]:
    """Held-out NLL of the proxy before and after alignment (cached)."""
    code = ctx.code.get("eval")
    corpus = ctx.corpus()
    own = ctx.proxy_tokenizer()
    heldout = None if own is None else own.view(corpus.heldout, corpus.tokenizer).corpus
    suffix = "" if own is None else ", its own tokens"
    before = proxy_heldout(
        ctx.workspace,
        corpus,
        f"proxy (before alignment{suffix})",
        model_identity(ctx.proxy_path),
        lambda: ctx.proxy_path,
        code,
        heldout,
    )
    after = proxy_heldout(
        ctx.workspace, corpus, f"proxy (aligned{suffix})", proxy_key(ctx), lambda: align(ctx), code, heldout
    )
    return [before, after]


def run_pipeline(
    ctx: StageContext, variants: Sequence[Variant], spec: EvaluationSpec | None = None
) -> dict[str, Any]:
    """Train every variant in order (an ``init_from`` starts from an earlier one's student) and tabulate.

    The proxy rows appear (and cost an alignment) only when some student learns from the posterior;
    ``spec`` adds token accuracy, ECE, ROUGE-L ... per student.
    """
    if not variants:
        raise ValueError("variants is empty: list at least one, e.g. variants.sft_only=[hard_ce]")
    reads = {label for v in variants for term in v.run.loss_terms.values() for label in term.soft_labels}
    rows = proxy_rows(ctx) if "posterior" in reads else []
    trained: dict[str, str] = {}
    for variant in training_order(variants):
        run = variant.run
        if variant.init_from:
            run = replace(run, init_from=trained[variant.init_from])
        row = run_distill(ctx, run)
        trained[variant.name] = str(Path(row["folder"]) / "student")
        if spec is not None:  # cached per student and spec
            extra = evaluate(ctx, row["name"], Path(row["folder"]) / "student", spec)
            row = {**row, **{k: v for k, v in extra.items() if k not in ("name", "model")}}
        rows.append({"variant": variant.name, **row})
    table = results_table(rows)
    print(f"\nHeld-out teacher responses ({len(ctx.corpus().heldout)} records):\n{table}\n", flush=True)
    return {
        "rows": rows,
        "table": table,
        **({"prior": summarize_store(prior(ctx))} if "prior" in reads else {}),
        **({"posterior": summarize_store(posterior(ctx))} if "posterior" in reads else {}),
    }


def training_order(variants: Sequence[Variant]) -> list[Variant]:
    """The variants in their listed order, except that one starting from another (``init_from``) comes after
    it. (Composed config does not keep a listed order: an experiment's defaults entries come first.)"""
    names = [v.name for v in variants]
    for variant in variants:
        if variant.init_from and variant.init_from not in names:
            raise KeyError(
                f"variant {variant.name!r} starts from {variant.init_from!r}, which is not one of the variants "
                f"({names}); add it, or fix init_from"
            )
    ordered: list[Variant] = []
    pending = list(variants)
    while pending:
        done = {o.name for o in ordered}
        ready = [v for v in pending if not v.init_from or v.init_from in done]
        if not ready:
            raise KeyError(
                f"variants {[v.name for v in pending]} start from each other in a cycle (init_from)"
            )
        ordered += ready
        pending = [v for v in pending if v.name not in {r.name for r in ready}]
    return ordered


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
            estimator = copy.copy(ctx.prior_estimator)
            estimator.ngram_order, estimator.gamma = n, gamma
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
        estimator = copy.copy(ctx.posterior_estimator)
        estimator.sampling_rounds = rounds
        estimates.append(
            Estimate(
                f"posterior R={rounds} (prior n={base.ngram_order} γ={base.gamma:g})",
                {"ngram_order": base.ngram_order, "gamma": base.gamma, "sampling_rounds": rounds},
                store_estimate(posterior(ctx, estimator), vocab),
                f"posterior (prior n={base.ngram_order} γ={base.gamma:g})",
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
    write_csv(out_dir / "fidelity.csv", rows)
    table = fidelity_table(rows, spec.top_k)
    print(
        f"\nEstimate fidelity on {rows[0]['positions']} positions of {len(corpus.train)} records:\n{table}\n",
        flush=True,
    )
    return {"rows": rows, "table": table, "teacher": str(ctx.teacher_path)}


def write_csv(path: Path, rows: list[dict[str, Any]]) -> None:
    """One row per line, every column any row has (written atomically)."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())
