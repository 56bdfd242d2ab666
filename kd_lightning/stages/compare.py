"""The comparison stages: ``kdl pipeline`` (students side by side), ``kdl evaluate`` and ``kdl fidelity``."""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np

from kd_lightning.artifacts import model_identity
from kd_lightning.atomic import atomic_csv, atomic_json, atomic_write_text
from kd_lightning.data.corpus import Corpus, CorpusSpec, build_corpus
from kd_lightning.evaluation.comparison import (
    StudentScores,
    compare_seeds,
    comparison_markdown,
    comparison_plot,
)
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
from kd_lightning.evaluation.results import evaluation_result, proxy_heldout
from kd_lightning.evaluation.tables import evaluation_table, results_table, summarize_store
from kd_lightning.losses.terms import AGREEMENT_STORE
from kd_lightning.models.loading import freeze, load_causal_lm
from kd_lightning.modules.alignment import ProxyAlignment
from kd_lightning.modules.training import trained_students
from kd_lightning.stages.context import StageContext
from kd_lightning.stages.estimate import align, posterior, prior, proxy_key, teacher_logprobs
from kd_lightning.stages.train import StudentRun, run_distill

log = logging.getLogger(__name__)


@dataclass
class Variant:
    """One student of ``kdl pipeline``: its run, the earlier variant whose student it starts from, the seed
    it was built with (``seeds``), its own proxy ``(path, own_tokenizer)`` and its own alignment of the proxy
    ``(ProxyAlignment, code fingerprint)`` if it has them."""

    name: str
    run: StudentRun
    init_from: str | None = None
    seed: int | None = None
    proxy: tuple[str, bool] | None = None
    alignment: tuple[ProxyAlignment, str | None] | None = None

    def context(self, ctx: StageContext) -> StageContext:
        """The stage context this variant's stores come from (its proxy and alignment, if it has its own)."""
        if self.proxy is not None:
            ctx = ctx.with_proxy(*self.proxy)
        if self.alignment is not None:
            ctx = ctx.with_alignment(*self.alignment)
        return ctx

    @property
    def own_proxy(self) -> bool:
        return self.proxy is not None or self.alignment is not None


def reads_proxy(variant: Variant) -> bool:
    """Whether the variant's terms read a store the aligned proxy builds (posterior, proxy agreement)."""
    labels = {label for term in variant.run.loss_terms.values() for label in term.soft_labels}
    return bool(labels & {"posterior", AGREEMENT_STORE})


def alignment_label(alignment: ProxyAlignment) -> str:
    return "SFT + DPO" if alignment.preference is not None else "SFT"


def evaluate(ctx: StageContext, name: str, model_path: str | Path, spec: EvaluationSpec) -> dict[str, Any]:
    """Held-out metrics of one model (cached per model, held-out text, settings and code); the per-record
    figures stay in the cached result."""
    result = evaluation_result(
        ctx.workspace, ctx.corpus(), name, model_path, spec, ctx.teacher_path, ctx.code.get("eval")
    )
    return {key: value for key, value in result.items() if key != "per_record"}


def proxy_rows(ctx: StageContext, label: str = "proxy", before: str | None = "proxy") -> list[dict[str, Any]]:
    """Held-out NLL of the proxy before alignment (named ``before``; None: no such row) and after it
    (named ``label``), cached."""
    code = ctx.code.get("eval")
    corpus = ctx.corpus()
    own = ctx.proxy_tokenizer()
    heldout = None if own is None else own.view(corpus.heldout, corpus.tokenizer).corpus
    suffix = "" if own is None else ", its own tokens"
    rows = []
    if before is not None:
        identity = model_identity(ctx.proxy_path)
        name = f"{before} (before alignment{suffix})"
        rows.append(
            proxy_heldout(ctx.workspace, corpus, name, identity, lambda: ctx.proxy_path, code, heldout)
        )
    aligned = f"{label} (aligned{suffix})"
    rows.append(
        proxy_heldout(ctx.workspace, corpus, aligned, proxy_key(ctx), lambda: align(ctx), code, heldout)
    )
    return rows


def run_pipeline(
    ctx: StageContext,
    variants: Sequence[Variant],
    spec: EvaluationSpec | None = None,
    evaluation_sets: Mapping[str, CorpusSpec] | None = None,
    compare_to: str | None = None,
    out_dir: Path | None = None,
) -> dict[str, Any]:
    """Train every variant in order (an ``init_from`` starts from an earlier one's student of the same seed)
    and tabulate.

    The proxy rows appear (and cost an alignment) only when some student learns from the posterior, one
    pair per proxy; ``spec`` adds token accuracy, ECE, ROUGE-L ... per student, on the corpus's held-out
    records and on each of ``evaluation_sets`` (other corpora's held-out records). With several seeds, more
    than one held-out set or ``compare_to``, the students are also compared over seeds and prompt by prompt
    (:mod:`kd_lightning.evaluation.comparison`); the comparison is written to ``out_dir``.
    """
    if not variants:
        raise ValueError("variants is empty: list at least one, e.g. variants.sft_only=[hard_ce]")
    names = {v.name for v in variants}
    if compare_to is not None and compare_to not in names:
        raise KeyError(f"compare_to={compare_to!r} is not one of the variants ({sorted(names)})")
    if (evaluation_sets or compare_to) and spec is None:
        raise ValueError("evaluation_sets and compare_to score students: add evaluate_students=true")
    rows = proxy_table(ctx, variants)
    sets = heldout_sets(ctx, evaluation_sets or {})
    trained: dict[tuple[str, int | None], str] = {}
    scores: list[StudentScores] = []
    for variant in training_order(variants):
        run, context = variant.run, variant.context(ctx)
        if variant.init_from:
            source = trained.get((variant.init_from, variant.seed))
            if source is None:
                raise KeyError(
                    f"variant {variant.name!r} (seed {variant.seed}) starts from {variant.init_from!r}, which "
                    "has no student of that seed; give both variants the same seeds"
                )
            run = replace(run, init_from=source)
        row = run_distill(context, run)
        folder = Path(row["folder"]) / "student"
        trained[(variant.name, variant.seed)] = str(folder)
        if spec is not None:  # cached per student, held-out set and spec
            for set_name, corpus in sets.items():
                result = evaluation_result(
                    ctx.workspace, corpus, row["name"], folder, spec, ctx.teacher_path, ctx.code.get("eval")
                )
                figures = {k: v for k, v in result.items() if k not in ("name", "model", "per_record")}
                if set_name == OWN_HELDOUT:
                    row = {**row, **figures}
                else:
                    row = {**row, **{f"{set_name}/{k}": v for k, v in figures.items()}}
                scores.append(
                    StudentScores(variant.name, variant.seed, set_name, figures, result.get("per_record", {}))
                )
        rows.append(
            {"variant": variant.name, **({"seed": variant.seed} if variant.seed is not None else {}), **row}
        )
    table = results_table(rows)
    print(f"\nHeld-out teacher responses ({len(ctx.corpus().heldout)} records):\n{table}\n", flush=True)
    result: dict[str, Any] = {
        "rows": rows,
        "table": table,
        **({"prior": summarize_store(prior(ctx))} if "prior" in reads_any(variants) else {}),
        **({"posterior": summarize_store(posterior(ctx))} if ctx_reads_posterior(ctx, variants) else {}),
    }
    seeded = len({v.seed for v in variants}) > 1
    if scores and (seeded or len(sets) > 1 or compare_to):
        comparison = compare_seeds(scores, compare_to)
        markdown = comparison_markdown(comparison, compare_to)
        print(f"\nStudents over seeds (mean ± std), paired against {compare_to}:\n{markdown}\n", flush=True)
        result.update({"comparison": comparison, "comparison_table": markdown})
        if out_dir is not None:
            atomic_csv(out_dir / "comparison.csv", comparison)
            atomic_write_text(out_dir / "comparison.md", markdown + "\n")
            comparison_plot(comparison, out_dir / "comparison.png")
            atomic_csv(out_dir / "per_prompt.csv", per_prompt_rows(scores))
    return result


def proxy_table(ctx: StageContext, variants: Sequence[Variant]) -> list[dict[str, Any]]:
    """The held-out NLL rows of each proxy the students read: once before alignment, then once per
    alignment of it (v1's SFT, Proxy-KD's SFT + DPO, per seed where they differ by seed), named by the kind
    of alignment and, where two are of one kind, by the first variant that reads it."""
    contexts: dict[tuple, tuple[StageContext, str, str]] = {}
    seeded = len({v.seed for v in variants}) > 1
    for variant in variants:
        if not reads_proxy(variant):
            continue
        context = variant.context(ctx)
        key = (context.proxy_path, context.proxy_own_tokenizer, repr(context.alignment))
        label = f"proxy {Path(context.proxy_path).name}"
        if variant.alignment is not None:
            seed = f", seed {context.alignment.seed}" if seeded else ""
            label += f" [{alignment_label(context.alignment)}{seed}]"
        contexts.setdefault(key, (context, label, variant.name))
    if len(contexts) == 1:
        ((context, _, _),) = contexts.values()
        return proxy_rows(context)
    labels = [label for _, label, _ in contexts.values()]
    rows: list[dict[str, Any]] = []
    seen: set[tuple] = set()
    for key, (context, label, first_reader) in contexts.items():
        name = f"proxy {Path(context.proxy_path).name}"
        if labels.count(label) > 1:
            label = f"{label[:-1]}, {first_reader}]" if label.endswith("]") else f"{label} [{first_reader}]"
        rows += proxy_rows(context, label, before=None if key[:2] in seen else name)
        seen.add(key[:2])
    return rows


OWN_HELDOUT = "heldout"
"""The name of the corpus's own held-out records among the sets a pipeline scores students on."""


def heldout_sets(ctx: StageContext, extra: Mapping[str, CorpusSpec]) -> dict[str, Corpus]:
    """The corpus's own held-out records, then each of ``extra``'s (another corpus under the student's
    tokenizer; its training split is never read)."""
    sets = {OWN_HELDOUT: ctx.corpus()}
    for name, spec in extra.items():
        if name == OWN_HELDOUT:
            raise ValueError(
                f"evaluation_sets.{OWN_HELDOUT} names the corpus's own held-out set; use another name"
            )
        sets[name] = build_corpus(ctx.workspace, spec, ctx.tokenizer_path, ctx.code.get("corpus"))
    return sets


def reads_any(variants: Sequence[Variant]) -> set[str]:
    return {label for v in variants for term in v.run.loss_terms.values() for label in term.soft_labels}


def ctx_reads_posterior(ctx: StageContext, variants: Sequence[Variant]) -> bool:
    """Whether a variant reads the posterior of the context's own proxy (its store is then summarised)."""
    return any(
        not v.own_proxy
        and "posterior" in {label for t in v.run.loss_terms.values() for label in t.soft_labels}
        for v in variants
    )


def per_prompt_rows(scores: Sequence[StudentScores]) -> list[dict[str, Any]]:
    """One row per (student, held-out set, record): the per-record figures, for analyses of one's own."""
    rows = []
    for score in scores:
        count = max((len(v) for v in score.per_record.values()), default=0)
        for index in range(count):
            row: dict[str, Any] = {
                "variant": score.variant,
                "seed": score.seed,
                "heldout": score.heldout,
                "record": index,
            }
            for key, values in score.per_record.items():
                if index < len(values):
                    row[key] = values[index]
            rows.append(row)
    return rows


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
