"""``kdl evaluate`` and its library: teacher-forced metrics, greedy generations, CLI files and errors."""

from __future__ import annotations

import csv
import json

import pytest

from kd_lightning.data.records import read_jsonl
from kd_lightning.data.tokenized import tokenize_records
from kd_lightning.evaluation.evaluate import EvaluationSpec, evaluate_model, greedy_generations
from kd_lightning.evaluation.nll import heldout_nll
from kd_lightning.models.loading import freeze, load_causal_lm, load_tokenizer
from tests.helpers.cli import kdl


def tiny(tiny_dir):
    tok = load_tokenizer(tiny_dir)
    corpus = tokenize_records(read_jsonl(tiny_dir / "corpus.jsonl")[:6], tok, 96)
    return freeze(load_causal_lm(tiny_dir)), tok, corpus


def test_metrics_agree_with_heldout_nll_and_are_in_range(tiny_dir):
    model, tok, corpus = tiny(tiny_dir)
    got = evaluate_model(
        model, tok, corpus, EvaluationSpec(generation_limit=3, max_new_tokens=8, batch_size=2)
    )
    ref = heldout_nll(model, corpus, tok.pad_token_id)
    assert got["nll"] == pytest.approx(ref["nll"], rel=1e-5) and got["tokens"] == ref["tokens"]
    assert 0 <= got["token_accuracy"] <= 1 and 0 <= got["ece"] <= 1 and 0 <= got["rouge_l"] <= 1
    assert got["generated"] == 3 and not model.training


def test_greedy_generation_is_deterministic_and_independent_of_batching(tiny_dir):
    model, tok, corpus = tiny(tiny_dir)
    one, refs = greedy_generations(model, tok, corpus, limit=4, max_new_tokens=6, batch_size=1)
    four, _ = greedy_generations(model, tok, corpus, limit=4, max_new_tokens=6, batch_size=4)
    assert one == four and len(refs) == 4 and all(refs)  # left padding does not change a greedy continuation


def test_bad_settings_are_clear_errors():
    with pytest.raises(ValueError, match="max_new_tokens"):
        EvaluationSpec(max_new_tokens=0)


def test_cli_evaluates_every_trained_student_into_json_and_csv(kdl_env):
    kdl("distill", "experiment=tiny", "loss=[hard_ce]", "run_name=sft", env_dir=kdl_env)
    done = kdl(
        "evaluate",
        "experiment=tiny",
        "evaluation.generation_limit=2",
        "evaluation.max_new_tokens=8",
        env_dir=kdl_env,
    )
    assert "| sft |" in done.stdout and "ROUGE-L" in done.stdout
    assert "questions/mc_accuracy" in done.stdout  # the tiny experiment's question set
    result = json.loads(next((kdl_env / "outputs").rglob("evaluate_result.json")).read_text())
    (row,) = result["rows"]
    assert row["name"] == "sft" and {"nll", "ppl", "ece", "token_accuracy", "rouge_l"} <= set(row)
    with next((kdl_env / "outputs").rglob("evaluate.csv")).open() as handle:
        (csv_row,) = list(csv.DictReader(handle))
    assert float(csv_row["nll"]) == pytest.approx(row["nll"])
    # the CSV logger received the row too (wandb gets the same call when it is configured)
    assert any("eval/nll" in f.read_text() for f in kdl_env.rglob("metrics.csv"))


def test_cli_with_nothing_to_evaluate_is_a_one_line_error(kdl_env):
    done = kdl("evaluate", "experiment=tiny", env_dir=kdl_env, check=False)
    assert done.returncode == 1 and "nothing to evaluate" in done.stderr and "Traceback" not in done.stderr


def test_an_evaluation_reuses_the_teacher_forced_pass_kept_from_training_only_when_its_settings_match(
    tiny_dir,
):
    model, tok, corpus = tiny(tiny_dir)
    spec = EvaluationSpec(generation_limit=0)
    kept = heldout_nll(model, corpus, tok.pad_token_id, keep_pass=True)["teacher_forced"]
    fresh = evaluate_model(model, tok, corpus, spec)
    reused = evaluate_model(model, tok, corpus, spec, teacher_forced=kept)
    assert reused == fresh  # every figure and the per-record NLL, exactly
    marked = {**kept, "nll": 123.0}  # the kept pass is what the evaluation reports ...
    assert evaluate_model(model, tok, corpus, spec, teacher_forced=marked)["nll"] == 123.0
    asked = [
        EvaluationSpec(generation_limit=0, batch_size=2),
        EvaluationSpec(generation_limit=0, ece_bins=10),
    ]
    for spec_of, kept_of in [*((a, marked) for a in asked), *((spec, {**marked, "records": "other"}),),
                             (spec, {**marked, "device": "meta"})]:  # fmt: skip
        got = evaluate_model(model, tok, corpus, spec_of, teacher_forced=kept_of)
        assert got["nll"] == pytest.approx(fresh["nll"], rel=1e-6)  # ... unless it was made otherwise


def test_a_pipeline_scores_a_students_held_out_records_once(kdl_env, monkeypatch):
    from collections import Counter

    from kd_lightning.evaluation import evaluate, nll

    passes: list[str] = []

    def counted(original):
        def run(model, corpus, *args, **kwargs):
            passes.append(corpus.fingerprint)
            return original(model, corpus, *args, **kwargs)

        return run

    for module in (evaluate, nll):
        monkeypatch.setattr(module, "teacher_forced_metrics", counted(module.teacher_forced_metrics))
    kdl(
        "pipeline", "experiment=tiny", "loss=[hard_ce]", "evaluate_students=true", "evaluation.generation_limit=2",
        "evaluation.max_new_tokens=4", "evaluation.question_sets=[]", "variants={sft:[hard_ce]}",
        env_dir=kdl_env,
    )  # fmt: skip
    assert passes and Counter(passes).most_common(1)[0][1] == 1, Counter(
        passes
    )  # was 2: training, evaluation
    result = json.loads(next((kdl_env / "outputs").rglob("pipeline_result.json")).read_text())
    (row,) = result["rows"]
    trained = json.loads((kdl_env / "artifacts" / "distill").glob("*/result.json").__next__().read_text())
    assert row["nll"] == trained["nll"] and {"ece", "token_accuracy"} <= set(row)
    assert "teacher_forced" not in row  # kept in the student's result, not in the table's rows
