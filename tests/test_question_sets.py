"""Question/answer and multiple-choice sets: loading, answer matching, log-likelihood scoring."""

from __future__ import annotations

import json

import pytest
import torch

from kd_lightning.evaluation.evaluate import EvaluationSpec, evaluate_model
from kd_lightning.evaluation.metrics import answer_match
from kd_lightning.evaluation.question_sets import (
    EVALS_SETS,
    Question,
    choice_log_likelihoods,
    load_question_set,
    prompt_ids,
    score_question_set,
)
from kd_lightning.models.loading import freeze, load_causal_lm, load_tokenizer
from tests.helpers.assets import requires_real_assets


def test_answer_match_by_hand():
    replies = ["Yes, because steel is dense.", "Yesterday it was", "no", "The Russian Federation!"]
    answers = ["Yes", "Yes", ["No", "N"], "Russian Federation"]
    # 1: starts with "yes"; 2: "yesterday" is not the word "yes"; 3: alternative; 4: articles dropped
    assert answer_match(replies, answers) == pytest.approx(3 / 4)
    with pytest.raises(ValueError, match="2 predictions but 1"):
        answer_match(["a", "b"], ["a"])


def test_loads_messages_text_and_checks_choices(tmp_path):
    path = tmp_path / "set.jsonl"
    rows = [
        {
            "input": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
            "ideal": "4",
        },
        {"input": "capital of france?", "ideal": ["Paris", "paris, france"]},
    ]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    qs = load_question_set(str(path))
    assert qs.name == "set" and len(qs.questions) == 2 and not qs.has_choices
    assert qs.questions[1].messages == ({"role": "user", "content": "capital of france?"},)
    assert qs.questions[1].answers == ("Paris", "paris, france")
    with pytest.raises(ValueError, match=r"set.jsonl:1: none of the answers \('4',\) is among the choices"):
        load_question_set(str(path), choices=["yes", "no"])
    path.write_text('{"input": "x"}\n')
    with pytest.raises(ValueError, match=r"set\.jsonl:1: a question needs 'input'"):
        load_question_set(str(path))
    with pytest.raises(FileNotFoundError, match="neither a shipped set"):
        load_question_set(str(tmp_path / "missing.jsonl"))


def test_choice_log_likelihood_equals_an_unbatched_forward(tiny_dir):
    model, tok = freeze(load_causal_lm(tiny_dir)), load_tokenizer(tiny_dir)
    qs = load_question_set(str(tiny_dir / "questions.jsonl"), limit=5)
    batched = choice_log_likelihoods(model, tok, qs.questions, batch_size=3)
    for question, scores in zip(qs.questions, batched):
        prompt = prompt_ids(question, tok)
        for choice, score in zip(question.choices, scores):
            ids = tok(choice, add_special_tokens=False)["input_ids"]
            logits = model(input_ids=torch.tensor([prompt + ids])).logits[0]
            logp = torch.log_softmax(logits, -1)
            by_hand = sum(float(logp[len(prompt) + j - 1, t]) for j, t in enumerate(ids))
            assert score == pytest.approx(by_hand, abs=1e-4)


class PrefersToken(torch.nn.Module):
    """A model whose next-token logits favour one id by a wide margin everywhere."""

    def __init__(self, model, token_id: int):
        super().__init__()
        self.model, self.token_id = model, token_id

    def forward(self, **kwargs):
        out = self.model(**kwargs)
        out.logits[..., self.token_id] += 100.0
        return out

    def generate(self, **kwargs):
        return self.model.generate(**kwargs)


def test_multiple_choice_follows_the_likelihoods(tiny_dir):
    """A model that always prefers one choice scores exactly that choice's share of the answers."""
    tok = load_tokenizer(tiny_dir)
    model = PrefersToken(freeze(load_causal_lm(tiny_dir)), tok.convert_tokens_to_ids("n"))
    qs = load_question_set(str(tiny_dir / "questions.jsonl"))
    scores = choice_log_likelihoods(model, tok, qs.questions)
    assert all(s[1] > s[0] for s in scores)  # "no" = n (favoured) + o; "yes" pays for three tokens
    result = score_question_set(model, tok, qs, max_new_tokens=4)
    share_no = sum(q.answers == ("no",) for q in qs.questions) / len(qs.questions)
    assert 0 < share_no < 1 and result["questions/mc_accuracy"] == pytest.approx(share_no)
    assert result["questions/questions"] == len(qs.questions)
    assert 0 <= result["questions/answer_match"] <= 1


def test_evaluation_spec_runs_question_sets(tiny_dir):
    from kd_lightning.data.records import read_jsonl
    from kd_lightning.data.tokenized import tokenize_records

    model, tok = freeze(load_causal_lm(tiny_dir)), load_tokenizer(tiny_dir)
    heldout = tokenize_records(read_jsonl(tiny_dir / "corpus.jsonl")[:4], tok, 96)
    spec = EvaluationSpec(
        generation_limit=0, question_sets=[str(tiny_dir / "questions.jsonl")], question_limit=6
    )
    got = evaluate_model(model, tok, heldout, spec)
    assert got["questions/questions"] == 6 and {"questions/mc_accuracy", "questions/answer_match"} <= set(got)


@requires_real_assets
def test_shipped_evals_sets_load_with_their_choices():
    sizes = {"born_first": 122, "which_is_heavier": 183}
    for name, size in sizes.items():
        qs = load_question_set(name)
        assert len(qs.questions) == size and qs.has_choices
        assert {q.choices for q in qs.questions} == {EVALS_SETS[name][1]}
        assert isinstance(qs.questions[0], Question) and qs.questions[0].messages[0]["role"] == "system"
