"""The comparison stages: ``kdl pipeline`` (students side by side), ``kdl evaluate`` and ``kdl fidelity``."""

from __future__ import annotations

import logging
import re
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from kd_lightning.artifacts import model_identity
from kd_lightning.atomic import atomic_csv, atomic_write_text
from kd_lightning.data.corpus import Corpus, CorpusSpec, build_corpus
from kd_lightning.evaluation.comparison import (
    StudentScores,
    compare_seeds,
    comparison_markdown,
    comparison_plot,
)
from kd_lightning.evaluation.evaluate import EvaluationSpec
from kd_lightning.evaluation.results import evaluation_result, proxy_heldout
from kd_lightning.evaluation.tables import results_table, summarize_store
from kd_lightning.losses.terms import AGREEMENT_STORE
from kd_lightning.modules.alignment import ProxyAlignment
from kd_lightning.stages.context import StageContext
from kd_lightning.stages.estimate import align, posterior, prior, proxy_key
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
    stores: tuple[Mapping[str, Any], Mapping[str, str]] = ({}, {})
    """Stage-context fields this variant sets for its stores (its prior and posterior estimators,
    ``store_format``, ``teacher_targets``) and the code fingerprints of the stages they change."""
    family: str | None = None
    """The group of a search this variant belongs to (the best of each family is selected on validation)."""
    report: bool = True
    """False for a variant trained only for others to start from (GAD's discriminator warm-up): cached like
    every student, neither scored on the held-out sets nor tabulated."""

    def context(self, ctx: StageContext) -> StageContext:
        """The stage context this variant's stores come from (its proxy, alignment and store settings)."""
        ctx = ctx.with_settings(*self.stores)
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
        row = proxy_heldout(ctx.workspace, corpus, name, identity, lambda: ctx.proxy_path, code, heldout)
        rows.append({**row, "name": name})  # a cached row keeps the name it was first computed under
    aligned = f"{label} (aligned{suffix})"
    row = proxy_heldout(ctx.workspace, corpus, aligned, proxy_key(ctx), lambda: align(ctx), code, heldout)
    rows.append({**row, "name": aligned})
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
    if compare_to is not None and not any(v.report for v in variants if v.name == compare_to):
        raise ValueError(
            f"compare_to={compare_to!r} names a variant with report: false (trained only for others to start "
            "from, never scored): compare to a reported variant"
        )
    if (evaluation_sets or compare_to) and spec is None:
        raise ValueError("evaluation_sets and compare_to score students: add evaluate_students=true")
    rows = proxy_table(ctx, variants)
    proxies = proxies_over_seeds(rows)
    if proxies is not None:
        print(f"\nProxies over seeds (held-out NLL, nats/token):\n{proxies}\n", flush=True)
        if out_dir is not None:
            atomic_write_text(out_dir / "proxies.md", proxies + "\n")
    sets = heldout_sets(ctx, evaluation_sets or {})
    trained: dict[tuple[str, int | None], str] = {}
    scores: list[StudentScores] = []
    for variant in training_order(variants):
        run = started_run(variant, trained)
        if not variant.report:  # trained for others to start from
            run = replace(run, measure_heldout=False)
        row = dict(run_distill(variant.context(ctx), run))
        scored = row.pop("teacher_forced", None)  # its held-out pass after training: the evaluation reuses it
        folder = Path(row["folder"]) / "student"
        trained[(variant.name, variant.seed)] = str(folder)
        if not variant.report:
            log.info(
                "%s: trained for the variants that start from it (not scored: report=false)", row["name"]
            )
            continue
        if spec is not None:  # cached per student, held-out set and spec
            for set_name, corpus in sets.items():
                result = evaluation_result(
                    ctx.workspace,
                    corpus,
                    row["name"],
                    folder,
                    spec,
                    ctx.teacher_path,
                    ctx.code.get("eval"),
                    teacher_forced=scored if set_name == OWN_HELDOUT else None,
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


def started_run(variant: Variant, trained: Mapping[tuple[str, int | None], str]) -> StudentRun:
    """The variant's run, starting from the student folder of the variant it names in ``init_from`` (same
    seed; ``trained`` maps (variant, seed) to the folders trained so far)."""
    if not variant.init_from:
        return variant.run
    source = trained.get((variant.init_from, variant.seed))
    if source is None:
        raise KeyError(
            f"variant {variant.name!r} (seed {variant.seed}) starts from {variant.init_from!r}, which "
            "has no student of that seed; give both variants the same seeds"
        )
    return replace(variant.run, init_from=source)


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


SEED_IN_LABEL = re.compile(r", seed -?\d+")


def proxies_over_seeds(rows: Sequence[dict[str, Any]]) -> str | None:
    """The proxy rows' held-out NLL as mean ± std over the seeds their alignments ran with (a markdown
    table), or None when no alignment ran with more than one seed."""
    groups: dict[str, list[float]] = {}
    for row in rows:
        groups.setdefault(SEED_IN_LABEL.sub("", row["name"]), []).append(float(row["nll"]))
    if all(len(values) == 1 for values in groups.values()):
        return None
    lines = ["| proxy | held-out NLL (mean ± std) | seeds |", "|---|---:|---:|"]
    for name, values in groups.items():
        std = statistics.stdev(values) if len(values) > 1 else 0.0
        lines.append(f"| {name} | {statistics.fmean(values):.4f} ± {std:.4f} | {len(values)} |")
    return "\n".join(lines)


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
