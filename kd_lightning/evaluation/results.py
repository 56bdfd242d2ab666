"""The evaluation artifacts: held-out metrics of a model, and the proxy's NLL before / after alignment.

Each result is a JSON file ``eval/<key>.json`` keyed by the model's identity (weights' digest), the held-out
corpus, the evaluation settings and the code, so re-scoring an unchanged model is free.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from dataclasses import asdict
from pathlib import Path
from typing import Any

from kd_lightning.artifacts import Workspace, model_identity
from kd_lightning.atomic import atomic_json
from kd_lightning.data.corpus import Corpus
from kd_lightning.data.tokenized import TokenizedCorpus
from kd_lightning.evaluation.evaluate import EvaluationSpec, evaluate_model
from kd_lightning.evaluation.nll import heldout_nll, require_finite
from kd_lightning.models.loading import freeze, load_causal_lm


def _cached_json(workspace: Workspace, provenance: dict[str, Any], compute: Callable[[], dict[str, Any]]):
    def build(path: Path) -> dict[str, Any]:
        result = compute()
        atomic_json(path, result)
        return result

    return workspace.cached(
        "eval", provenance, build, lambda path: json.loads(path.read_text()), done=None, suffix=".json"
    )


def evaluation_result(
    workspace: Workspace,
    corpus: Corpus,
    name: str,
    model_path: str | Path,
    spec: EvaluationSpec,
    teacher_path: str | None = None,
    code: str | None = None,
    teacher_forced: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Held-out metrics of one model (NLL, ppl, token accuracy, ECE, ROUGE-L, ...), cached per model and spec.
    ``teacher_forced``: the model's teacher-forced pass over these records, kept from scoring it after
    training; reused when its settings equal the spec's (the figures are the same)."""
    provenance = {
        "model": model_identity(str(model_path)),
        "heldout": corpus.heldout.fingerprint,
        "spec": asdict(spec),
        **({"teacher": model_identity(str(teacher_path))} if spec.reverse_kl_limit and teacher_path else {}),
        "code": code,
    }
    if spec.reverse_kl_limit and teacher_path is None:
        raise ValueError(
            "evaluation.reverse_kl_limit > 0 measures the reverse KL to an open teacher: add teacher=smollm2 "
            "(or teacher=local teacher.path=<HF folder>), or set evaluation.reverse_kl_limit=0"
        )

    def compute() -> dict[str, Any]:
        model = freeze(load_causal_lm(model_path))
        corpus.check_model_vocabulary(model, str(model_path), "evaluated model")
        teacher = None
        if spec.reverse_kl_limit:
            teacher = freeze(load_causal_lm(teacher_path))
            corpus.check_model_vocabulary(teacher, str(teacher_path), "teacher")
        metrics = evaluate_model(
            model, corpus.tokenizer, corpus.heldout, spec, teacher=teacher, teacher_forced=teacher_forced
        )
        result = {"name": name, "model": str(model_path), **metrics}
        require_finite(result, f"model {model_path}", "not cached; check the model's weights")
        return result

    return _cached_json(workspace, provenance, compute)


def proxy_heldout(
    workspace: Workspace,
    corpus: Corpus,
    name: str,
    model_key: Any,
    model: Callable[[], str | Path],
    code: str | None,
    own_heldout: TokenizedCorpus | None = None,
) -> dict[str, Any]:
    """Held-out NLL of a proxy (``model_key`` identifies it: its identity, or the aligned proxy's key).

    A proxy of another tokenizer is scored on ``own_heldout``, its own tokenization of the held-out
    records (NLL per proxy token: not comparable token for token with the student's rows).
    """
    heldout = corpus.heldout if own_heldout is None else own_heldout
    pad_id = corpus.pad_id if own_heldout is None else 0
    provenance = {"proxy": model_key, "heldout": heldout.fingerprint, "code": code}

    def compute() -> dict[str, Any]:
        loaded = freeze(load_causal_lm(model()))
        result = {"name": name, **heldout_nll(loaded, heldout, pad_id, desc=f"eval {name}")}
        require_finite(result, name, "not cached; check the proxy's weights")
        return result

    return _cached_json(workspace, provenance, compute)
