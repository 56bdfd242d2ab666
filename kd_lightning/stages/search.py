"""A search selected on the validation split, then a final comparison on the held-out sets.

``kdl pipeline`` with ``search:`` (``experiment=paper_sweep``): every variant with a ``family`` is a
candidate. Each is trained once (the search seed) and scored on the validation split only (``val_nll``;
its held-out figures are never computed, so nothing about them can steer the choice). The best candidate
of each family (lowest ``val_nll``), together with the variants named in ``finals`` (e.g. SFT), is then
trained with every final seed and compared on the held-out sets, paired with ``compare_to``, as any
pipeline compares its variants. The search's own table (family, nominal λ, settings, ``val_nll``) and the
validation curve (λ against ``val_nll``, one line per family) are written beside the final comparison.
Every student is a cached artifact, so a stopped search resumes where it stopped.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from kd_lightning.atomic import atomic_csv, atomic_write_text
from kd_lightning.data.corpus import CorpusSpec
from kd_lightning.evaluation.evaluate import EvaluationSpec
from kd_lightning.evaluation.mixture import implied_mixture, nominal_lambda
from kd_lightning.stages.compare import Variant, run_pipeline, started_run, training_order
from kd_lightning.stages.context import StageContext
from kd_lightning.stages.train import run_distill

log = logging.getLogger(__name__)


@dataclass
class SearchSpec:
    """How ``kdl pipeline`` searches (the ``search`` config node).

    Args:
        select_by: the result figure a family's best minimises (``val_nll``: the validation split's NLL).
        seed: the seed every candidate is trained with.
        finals: variants that join the final comparison whatever the search finds.
        groups: group name → the families it selects its best from (e.g. ``coupled: [prior_coupled,
            posterior_coupled]``); each group's best joins the finals. Empty: every family is a group. A
            family in no group is trained and reported, never selected. ``compare_to`` may name a group.
        final_seeds: the seeds of the final comparison.
    """

    select_by: str = "val_nll"
    seed: int = 0
    finals: list[str] = field(default_factory=list)
    groups: dict[str, list[str]] = field(default_factory=dict)
    final_seeds: list[int] = field(default_factory=lambda: [0, 1, 2])

    def __post_init__(self) -> None:
        if not self.select_by.startswith("val_"):
            raise ValueError(
                f"search.select_by={self.select_by!r}: a search selects on the validation split only (val_nll); "
                "the held-out sets are for the final report"
            )
        if not self.final_seeds:
            raise ValueError(
                "search.final_seeds is empty; list the seeds of the final comparison, e.g. [0,1,2]"
            )


def candidate_row(ctx: StageContext, variant: Variant, result: Mapping[str, Any]) -> dict[str, Any]:
    """A search table row: the variant, its family, its nominal λ and what it scored on validation."""
    context = variant.context(ctx)
    terms = variant.run.loss_terms
    hard = terms.get("hard_ce")
    posterior = context.posterior_estimator
    shares = implied_mixture(
        terms,
        hard_ce_weight=float(hard.weight) if hard is not None else 0.0,
        gamma=float(context.prior_estimator.gamma),
        concentration=float(getattr(posterior.update, "concentration", 0.0)),
        rounds=int(posterior.sampling_rounds),
    )
    return {
        "variant": variant.name,
        "family": variant.family,
        "lambda": round(nominal_lambda(shares), 6),
        "terms": "+".join(terms),
        "decoupled": any(share.decoupled for share in shares),
        "caps_observed": any(share.caps_observed for share in shares),
        "smoothing": context.prior_estimator.smoothing,
        "gamma": context.prior_estimator.gamma,
        **{key: value for key, value in result.items() if key.startswith("val_")},
        "train_seconds": result.get("train_seconds"),
    }


def run_search(
    ctx: StageContext,
    candidates: Sequence[Variant],
    search: SearchSpec,
    finals: Callable[[list[str]], list[Variant]],
    spec: EvaluationSpec | None = None,
    evaluation_sets: Mapping[str, CorpusSpec] | None = None,
    compare_to: str | None = None,
    out_dir: Path | None = None,
) -> dict[str, Any]:
    """Train and score every candidate on validation, select each family's best, and compare the finals.

    ``finals(names)`` builds the named variants with every final seed (the config layer does that).
    """
    if ctx.corpus().validation is None:
        raise ValueError(
            "a search selects on the validation split, and this corpus has none; set data.validation_size "
            "(e.g. data.validation_size=200)"
        )
    unknown = [name for name in search.finals if name not in {v.name for v in candidates}]
    if unknown:
        raise KeyError(
            f"search.finals names {unknown}, which are not variants ({sorted(v.name for v in candidates)})"
        )
    rows = []
    trained: dict[tuple[str, int | None], str] = {}
    for variant in training_order(candidates):
        run = replace(started_run(variant, trained), measure_heldout=False)
        result = run_distill(variant.context(ctx), run)
        trained[(variant.name, variant.seed)] = str(Path(result["folder"]) / "student")
        if not variant.report:
            continue
        rows.append(candidate_row(ctx, variant, result))
        log.info(
            "search: %s (%s) %s=%.4f",
            variant.name,
            variant.family,
            search.select_by,
            rows[-1][search.select_by],
        )
    groups = search.groups or {f: [f] for f in dict.fromkeys(r["family"] for r in rows if r["family"])}
    best: dict[str, dict[str, Any]] = {}
    for group, members in groups.items():
        scored = [r for r in rows if r["family"] in members]
        if scored:
            best[group] = min(scored, key=lambda r: r[search.select_by])
    chosen_names = {r["variant"] for r in best.values()}
    for row in rows:
        row["selected"] = row["variant"] in chosen_names
    table = search_markdown(rows, search.select_by)
    print(
        f"\nSearch on the validation split ({len(ctx.corpus().validation)} records):\n{table}\n", flush=True
    )
    chosen = with_starting_points(
        list(dict.fromkeys([*search.finals, *(r["variant"] for r in best.values())])), candidates
    )
    if compare_to in best:  # a group: compare with what it selected
        compare_to = best[compare_to]["variant"]
    result = run_pipeline(ctx, finals(chosen), spec, evaluation_sets, compare_to, out_dir)
    result["search"] = {"rows": rows, "table": table, "best": {g: r["variant"] for g, r in best.items()}}
    if out_dir is not None:
        atomic_csv(out_dir / "search.csv", rows)
        atomic_write_text(out_dir / "search.md", table + "\n")
        validation_curve(rows, search.select_by, out_dir / "validation_curve.png", search.finals)
    return result


def search_markdown(rows: Sequence[Mapping[str, Any]], select_by: str) -> str:
    lines = [
        f"| family | variant | nominal λ | terms | decoupled | smoothing | γ | {select_by} | selected |",
        "|---|---|---:|---|---|---|---:|---:|---|",
    ]
    for row in sorted(rows, key=lambda r: (str(r["family"]), r["lambda"])):
        lines.append(
            f"| {row['family']} | {row['variant']} | {row['lambda']:.3f} | {row['terms']} | "
            f"{'yes' if row['decoupled'] else 'no'} | {row['smoothing']} | {row['gamma']:g} | "
            f"{row[select_by]:.4f} | {'**best**' if row['selected'] else ''} |"
        )
    return "\n".join(lines)


def validation_curve(
    rows: Sequence[Mapping[str, Any]], select_by: str, path: Path, baselines: Sequence[str] = ()
) -> Path:
    """λ against ``select_by``, one line per family (log-scaled λ); the baselines' values as dashed lines."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(7, 4.2))
    for row in rows:
        if row["variant"] in baselines and row["lambda"] == 0:
            axis.axhline(row[select_by], linestyle="--", color="grey", linewidth=1)
            axis.annotate(
                row["variant"], (0.0, row[select_by]), xycoords=("axes fraction", "data"), fontsize=8
            )
    families = [f for f in dict.fromkeys(r["family"] for r in rows) if f]
    for family in families:
        points = sorted(
            (r["lambda"], r[select_by]) for r in rows if r["family"] == family and r["lambda"] > 0
        )
        if points:
            axis.plot(*zip(*points), marker="o", label=family)
    axis.set_xscale("log")
    axis.set_xlabel("nominal λ (the estimates' share of the loss's optimum)")
    axis.set_ylabel(f"{select_by} (nats/token)")
    axis.legend(fontsize=7, ncol=2)
    figure.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def with_starting_points(names: list[str], candidates: Sequence[Variant]) -> list[str]:
    """``names`` and, before each, the variants it starts from (``init_from``, transitively): a final that
    starts from another is trained from that one's student of the same final seed."""
    starts = {v.name: v.init_from for v in candidates}
    ordered: list[str] = []

    def add(name: str) -> None:
        if starts.get(name):
            add(str(starts[name]))
        if name not in ordered:
            ordered.append(name)

    for name in names:
        add(name)
    return ordered
