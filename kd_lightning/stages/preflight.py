"""``kdl preflight``: before training, whether the configured loss terms can help this student.

On the validation split (``data.validation_size``; never the held-out sets): the untrained student's NLL and
top-1 accuracy, each estimate's (the prior's smoothing distribution, counted on the training split; the
aligned proxy, or the plain one when no alignment is cached yet), the share λ of each in the loss's optimum,
and one verdict line per term (:mod:`kd_lightning.evaluation.preflight`). Forward passes only: minutes on a
CPU. ``kdl pipeline`` prints it first when the corpus has a validation split.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from kd_lightning.atomic import atomic_json
from kd_lightning.data.collate import collate
from kd_lightning.data.datamodule import SoftLabelDataset
from kd_lightning.data.tokenized import TokenizedCorpus
from kd_lightning.estimation.ngram_model import NGramModel
from kd_lightning.evaluation.mixture import implied_mixture
from kd_lightning.evaluation.preflight import check_estimate, nll, verdict
from kd_lightning.models.forward import target_position_logits
from kd_lightning.models.loading import freeze, load_causal_lm
from kd_lightning.stages.context import StageContext
from kd_lightning.stages.estimate import proxy_key

log = logging.getLogger(__name__)


@torch.no_grad()
def observed_probabilities(
    model: nn.Module, corpus: TokenizedCorpus, pad_id: int, batch_size: int = 8
) -> tuple[np.ndarray, np.ndarray]:
    """(P,) the model's probability of each observed response token and (P,) whether it is its top-1, in the
    corpus's target order."""
    was_training = model.training
    model.eval()
    dataset = SoftLabelDataset(corpus)
    probs, top1 = [], []
    try:
        for start in range(0, len(dataset), batch_size):
            batch = collate([dataset[i] for i in range(start, min(start + batch_size, len(dataset)))], pad_id)
            mask = batch.target_mask
            logits = target_position_logits(model, batch.input_ids, batch.attention_mask, mask).float()
            target = batch.target_ids[mask]
            log_p = torch.log_softmax(logits, -1)
            probs.append(log_p.gather(-1, target[:, None])[:, 0].exp().numpy())
            top1.append((logits.argmax(-1) == target).numpy())
    finally:
        model.train(was_training)
    return np.concatenate(probs), np.concatenate(top1)


def smoothing_probabilities(
    ctx: StageContext, validation: TokenizedCorpus, vocab_size: int
) -> tuple[np.ndarray, np.ndarray]:
    """(P,) the prior's smoothing distribution's probability of each observed validation token (counted on
    the training split), and (P,) whether it is its top-1."""
    estimator = ctx.prior_estimator
    events = np.flatnonzero(validation.target_mask()) + 1
    observed = validation.tokens[events].astype(np.int64)
    if estimator.smoothing == "uniform":
        return np.full(len(events), 1.0 / vocab_size), np.zeros(len(events), dtype=bool)
    counted = ctx.corpus().counts
    order = estimator.ngram_order if estimator.smoothing == "ngram" else 1
    model = NGramModel(order, vocab_size, estimator.min_context_count, estimator.memory_budget)
    try:
        model.fit(counted.tokens, counted.offsets, np.roll(counted.target_mask(), 1))
        rows, _, _ = model.distributions(validation.tokens, validation.offsets, events, estimator.top_k)
    finally:
        model.close()
    ids, probs = np.asarray(rows.ids).astype(np.int64), np.asarray(rows.probs, dtype=np.float64)
    on_observed = np.where(ids == observed[:, None], probs, 0.0).sum(1)
    return on_observed, ids[np.arange(len(ids)), probs.argmax(1)] == observed


def run_preflight(
    ctx: StageContext,
    student: Callable[[], nn.Module],
    terms: Mapping[str, Any],
    out_dir: Path | None = None,
) -> dict[str, Any]:
    """The preflight table and verdicts for ``terms`` (name → loss term) on the student ``student()``."""
    corpus = ctx.corpus()
    if corpus.validation is None:
        raise ValueError(
            "kdl preflight measures on the validation split, and this corpus has none; set data.validation_size "
            "(e.g. data.validation_size=200)"
        )
    validation, vocab = corpus.validation, corpus.vocab_size
    p_student, top1_student = observed_probabilities(student(), validation, corpus.pad_id)
    student_nll = nll(p_student)
    estimator, posterior = ctx.prior_estimator, ctx.posterior_estimator
    hard = terms.get("hard_ce")
    shares = implied_mixture(
        terms,
        hard_ce_weight=float(hard.weight) if hard is not None else 0.0,
        gamma=float(estimator.gamma),
        concentration=float(getattr(posterior.update, "concentration", 0.0)),
        rounds=int(posterior.sampling_rounds),
    )
    rows: dict[str, Any] = {"student": {"nll": student_nll, "top1": float(top1_student.mean())}}
    checks, probabilities = {}, {}
    if shares:
        p, top1 = smoothing_probabilities(ctx, validation, vocab)
        name = {"ngram": f"{estimator.ngram_order}-gram", "unigram": "unigram"}.get(
            estimator.smoothing, "uniform"
        )
        checks["ngram"], probabilities["ngram"] = check_estimate(name, p_student, p, top1), p
    if any(share.kd_target == "posterior" for share in shares):
        if ctx.proxy_tokenizer() is not None:
            log.warning("preflight: the proxy has its own tokenizer; its probabilities are not measured here")
        else:
            aligned = ctx.workspace.path("align", proxy_key(ctx)) / "model"
            which = aligned if (aligned / "config.json").is_file() else ctx.proxy_path
            name = "aligned proxy" if which == aligned else "proxy (not aligned yet)"
            proxy = freeze(load_causal_lm(which))
            p, top1 = observed_probabilities(proxy, validation, corpus.pad_id)
            checks["proxy"], probabilities["proxy"] = check_estimate(name, p_student, p, top1), p
    lines = []
    for share in shares:
        parts = {"ngram": share.ngram, "proxy": share.proxy if "proxy" in probabilities else 0.0}
        mixed = (1.0 - sum(parts.values())) * p_student + sum(
            weight * probabilities[key] for key, weight in parts.items() if weight > 0
        )
        main = "proxy" if share.kd_target == "posterior" and "proxy" in checks else "ngram"
        settings = f"{share.name}_weight {share.weight:g}, gamma={estimator.gamma:g}"
        lines.append(
            verdict(
                share.name, checks[main], student_nll, share.share, nll(mixed), share.caps_observed, settings
            )
        )
        rows[share.name] = {"lambda": share.share, "lambda_ngram": share.ngram, "lambda_proxy": share.proxy}
    for key, check in checks.items():
        rows[key] = {
            "nll": check.nll,
            "top1": check.top1,
            "best_share": check.best_share,
            "best_nll": check.best_nll,
        }
        rows[key]["mixture_nll"] = {str(s): v for s, v in check.curve.items()}
    text = preflight_text(len(validation), student_nll, float(top1_student.mean()), checks, lines)
    print(f"\n{text}\n", flush=True)
    result = {"rows": rows, "verdicts": lines, "validation_records": len(validation)}
    if out_dir is not None:
        atomic_json(Path(out_dir) / "preflight.json", result)
    return result


def preflight_text(
    records: int, student_nll: float, student_top1: float, checks: dict, lines: list[str]
) -> str:
    table = [
        f"Preflight on the validation split ({records} records), before training:",
        "| model | NLL (nats/token) | top-1 | best share λ | NLL at it |",
        "|---|---:|---:|---:|---:|",
        f"| student | {student_nll:.3f} | {student_top1:.1%} | | |",
        *(
            f"| {c.name} | {c.nll:.3f} | {c.top1:.1%} | {c.best_share:.1%} | {c.best_nll:.3f} |"
            for c in checks.values()
        ),
        "",
        *lines,
    ]
    return "\n".join(table) if lines else "\n".join([*table, "no prior or posterior term: nothing to check"])
