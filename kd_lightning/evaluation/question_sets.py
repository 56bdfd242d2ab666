"""Question/answer and multiple-choice sets for ``kdl evaluate``: real ones from OpenAI's ``evals`` wheel.

The ``evals==3.0.1.post1`` wheel on PyPI (MIT) ships small JSONL sets of ``{"input": [chat messages],
"ideal": answer}``. :func:`fetch_evals_sets` copies the ones named in :data:`EVALS_SETS` out of the wheel
(read with ``zipfile``: the package declares ~40 heavy dependencies we never install) into the assets dir at
set-up. A user's own set is a JSONL file of the same shape, optionally with ``"choices"``.

Two ways to score a set, as the issue and the literature do:

* **answer match** (every set): greedy generation, scored as OpenAI evals' ``Match`` does: the reply, after
  SQuAD normalisation, starts with the ideal answer (a 135M model writes "Yes, because ..." rather than
  "Yes"). Exact equality is reported too.
* **multiple choice by log-likelihood** (sets with choices): the summed log-probability of each choice's
  tokens after the chat-templated prompt; the argmax is the model's answer. Choices of different lengths
  are compared by their total log-probability, as lm-evaluation-harness's ``acc`` does.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from kd_lightning.atomic import atomic_write_bytes
from kd_lightning.data.records import Record, jsonl_objects
from kd_lightning.data.tokenized import prompt_and_response_ids
from kd_lightning.evaluation.greedy import generate_greedy
from kd_lightning.evaluation.metrics import answer_match, exact_match, multiple_choice_accuracy
from kd_lightning.models.shipped import AssetError, assets_dir

EVALS_VERSION = "3.0.1.post1"
EVALS_SETS: dict[str, tuple[str, tuple[str, ...]]] = {
    # name: (member under evals/registry/data/, choices for log-likelihood scoring; () = answer match only)
    "born_first": ("born_first/born_first.jsonl", ("Y", "N")),
    "which_is_heavier": ("which_is_heavier/which_is_heavier.jsonl", ("Yes", "No")),
    "food": ("food/samples.jsonl", ("Yes", "No")),
    "largest_country": ("largest_country/samples.jsonl", ()),
}


@dataclass(frozen=True)
class Question:
    """One question: chat messages, the ideal answer(s), and the choices when it is multiple choice."""

    messages: tuple[dict[str, str], ...]
    answers: tuple[str, ...]
    choices: tuple[str, ...] = ()

    @property
    def correct_choice(self) -> int:
        """Index of the ideal answer among the choices."""
        for answer in self.answers:
            if answer in self.choices:
                return self.choices.index(answer)
        raise ValueError(f"none of the answers {self.answers} is among the choices {self.choices}")


@dataclass
class QuestionSet:
    name: str
    questions: list[Question] = field(default_factory=list)

    @property
    def has_choices(self) -> bool:
        return bool(self.questions) and all(q.choices for q in self.questions)


def evals_dir() -> Path:
    return assets_dir() / "evals"


def fetch_evals_sets(force: bool = False) -> Path:
    """Copy :data:`EVALS_SETS` out of the ``evals`` wheel on PyPI into ``<assets>/evals/<name>.jsonl``."""
    target = evals_dir()
    if not force and all((target / f"{name}.jsonl").is_file() for name in EVALS_SETS):
        return target
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "-d", tmp]
        done = subprocess.run([*cmd, f"evals=={EVALS_VERSION}"], capture_output=True, text=True)
        wheels = list(Path(tmp).glob("evals-*.whl"))
        if done.returncode != 0 or not wheels:
            raise AssetError(f"could not download the evals wheel from PyPI: {done.stderr.strip()[-500:]}")
        target.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as wheel:
            for name, (member, _) in EVALS_SETS.items():
                data = wheel.read(f"evals/registry/data/{member}")
                atomic_write_bytes(target / f"{name}.jsonl", data)
    return target


def load_question_set(
    name_or_path: str, choices: Sequence[str] | None = None, limit: int | None = None
) -> QuestionSet:
    """A shipped set by name (:data:`EVALS_SETS`) or a JSONL file of ``{"input", "ideal"[, "choices"]}``.

    ``input`` is a list of chat messages or a plain string (one user turn); ``ideal`` a string or a list of
    acceptable strings. ``choices`` (argument or per-line field) turns on log-likelihood scoring.
    """
    if name_or_path in EVALS_SETS:
        path = evals_dir() / f"{name_or_path}.jsonl"
        if not path.is_file():
            raise FileNotFoundError(
                f"question set {name_or_path!r} is not fetched yet ({path}); run `python -m kd_lightning.assets`"
            )
        name, default_choices = name_or_path, EVALS_SETS[name_or_path][1]
    else:
        path = Path(name_or_path)
        if not path.is_file():
            raise FileNotFoundError(
                f"question set {name_or_path!r} is neither a shipped set ({', '.join(EVALS_SETS)}) nor a JSONL file"
            )
        name, default_choices = path.stem, ()
    set_choices = tuple(choices) if choices else default_choices
    questions = []
    for where, row in jsonl_objects(path):
        if "input" not in row or "ideal" not in row:
            raise ValueError(f"{where}: a question needs 'input' (messages or text) and 'ideal' (the answer)")
        raw = row["input"]
        messages = [{"role": "user", "content": raw}] if isinstance(raw, str) else raw
        if not messages or not all(isinstance(m, dict) and "role" in m and "content" in m for m in messages):
            raise ValueError(f"{where}: 'input' must be a string or a list of {{role, content}} messages")
        ideal = row["ideal"]
        answers = (ideal,) if isinstance(ideal, str) else tuple(str(a) for a in ideal)
        question = Question(
            tuple({"role": m["role"], "content": m["content"]} for m in messages),
            answers,
            tuple(row.get("choices") or set_choices),
        )
        if question.choices:
            try:
                question.correct_choice  # noqa: B018 - validates the line
            except ValueError as err:
                raise ValueError(f"{where}: {err}") from None
        questions.append(question)
        if limit is not None and len(questions) >= limit:
            break
    if not questions:
        raise ValueError(f"question set {path} is empty")
    return QuestionSet(name, questions)


def prompt_ids(question: Question, tokenizer) -> list[int]:
    """The chat-templated prompt (system turns folded in, generation prompt added), as the corpora build it."""
    system = "\n".join(m["content"] for m in question.messages if m["role"] == "system")
    user = "\n\n".join(m["content"] for m in question.messages if m["role"] != "system")
    prompt, _ = prompt_and_response_ids(Record(instruction=user, response="", system=system), tokenizer)
    return prompt


@torch.inference_mode()
def choice_log_likelihoods(
    model: nn.Module, tokenizer, questions: Sequence[Question], batch_size: int = 8
) -> list[list[float]]:
    """Summed log-probability of each choice's tokens after each question's prompt."""
    device = next(model.parameters()).device
    pad_id = int(tokenizer.pad_token_id)
    pairs: list[tuple[list[int], int]] = []  # (prompt + choice ids, number of choice tokens)
    for question in questions:
        prompt = prompt_ids(question, tokenizer)
        for choice in question.choices:
            ids = tokenizer(choice, add_special_tokens=False)["input_ids"]
            if not ids:
                raise ValueError(f"choice {choice!r} tokenizes to nothing")
            pairs.append((prompt + ids, len(ids)))
    scores: list[float] = []
    for start in tqdm(range(0, len(pairs), batch_size), desc="choices", unit="batch", leave=False):
        chunk = pairs[start : start + batch_size]
        width = max(len(ids) for ids, _ in chunk)
        input_ids = torch.full((len(chunk), width), pad_id, dtype=torch.long)
        attention = torch.zeros_like(input_ids)
        for row, (ids, _) in enumerate(chunk):  # right padding: positions keep their usual ids
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention[row, : len(ids)] = 1
        logits = model(input_ids=input_ids.to(device), attention_mask=attention.to(device)).logits.float()
        log_probs = torch.log_softmax(logits, -1).cpu()
        for row, (ids, n_choice) in enumerate(chunk):
            positions = torch.arange(len(ids) - n_choice, len(ids))
            targets = torch.tensor(ids[len(ids) - n_choice :])
            scores.append(float(log_probs[row, positions - 1, targets].sum()))
    out, i = [], 0
    for question in questions:
        out.append(scores[i : i + len(question.choices)])
        i += len(question.choices)
    return out


def score_question_set(
    model: nn.Module, tokenizer, questions: QuestionSet, max_new_tokens: int = 8, batch_size: int = 8
) -> dict[str, float]:
    """``<set>/answer_match``, ``<set>/exact_match`` and, with choices, ``<set>/mc_accuracy``."""
    prompts = [prompt_ids(q, tokenizer) for q in questions.questions]
    replies = generate_greedy(model, tokenizer, prompts, max_new_tokens, batch_size, desc=questions.name)
    answers = [q.answers for q in questions.questions]
    result = {
        f"{questions.name}/answer_match": answer_match(replies, answers),
        f"{questions.name}/exact_match": exact_match(replies, answers),
        f"{questions.name}/questions": len(questions.questions),
    }
    if questions.has_choices:
        scores = choice_log_likelihoods(model, tokenizer, questions.questions, batch_size)
        correct = [q.correct_choice for q in questions.questions]
        result[f"{questions.name}/mc_accuracy"] = multiple_choice_accuracy(scores, correct)
    return result
