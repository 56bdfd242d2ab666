"""Labelled data augmentation in the style of GPTMix (Yoo et al. 2021).

Each prompt shows real examples of a few labels and asks the teacher for a new example that blends
them, with a soft label (``positive (70%), negative (30%)``). The teacher's soft label becomes the
record's metadata (``label_probs``, JSON) and its most likely label the response, so the corpus trains a
classifier-style student with the teacher's own label distribution as extra evidence.
"""

from __future__ import annotations

import json
import random
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from kd_lightning.data.records import Record, jsonl_objects
from kd_lightning.generation.backends import ChatRequest, SamplingSettings, TeacherBackend
from kd_lightning.generation.runner import ReplyCache, answer_all
from kd_lightning.generation.self_instruct import rouge_l_f1, words
from kd_lightning.generation.tasks import GenerationResult, GenerationTask, teacher_meta

_SHARE = re.compile(r"([^,;()]+?)\s*\(\s*(\d+(?:\.\d+)?)\s*%\s*\)")


def parse_soft_label(line: str, labels: list[str]) -> dict[str, float] | None:
    """``"pos (70%), neg (30%)"`` → normalised shares; a bare known label → that label at 1. None if
    unparseable; raises KeyError naming an unknown label."""
    by_lower = {label.lower(): label for label in labels}
    shares = _SHARE.findall(line)
    if not shares:
        bare = line.strip().strip(".").strip()
        if bare.lower() in by_lower:
            return {by_lower[bare.lower()]: 1.0}
        if bare:
            raise KeyError(bare)
        return None
    total: dict[str, float] = {}
    for name, percent in shares:
        key = name.strip().strip("'\"").lower()
        if key not in by_lower:
            raise KeyError(name.strip())
        total[by_lower[key]] = total.get(by_lower[key], 0.0) + float(percent)
    mass = sum(total.values())
    if mass <= 0:
        return None
    return {label: share / mass for label, share in total.items()}


@dataclass
class LabelledAugmentationTask(GenerationTask):
    """New labelled examples from a small labelled JSONL set (``text_field``, ``label_field``)."""

    path: str
    task_instruction: str  # the record's instruction, e.g. "Classify the sentiment of this review."
    text_field: str = "text"
    label_field: str = "label"
    text_type: str = "text"  # what an example is, e.g. "movie review"
    label_type: str = "label"  # what its label is, e.g. "sentiment"
    num_examples: int = 100
    examples_per_label: int = 1
    labels_per_prompt: int = 2
    max_rouge_l: float = 0.7
    min_words: int = 3
    seed: int = 0

    def examples(self) -> dict[str, list[str]]:
        path = Path(self.path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"labelled file {path} does not exist; set task.path to a JSONL file")
        by_label: dict[str, list[str]] = {}
        for where, row in jsonl_objects(path):
            if self.text_field not in row or self.label_field not in row:
                raise ValueError(
                    f"{where}: needs fields {self.text_field!r} and {self.label_field!r}; "
                    "map yours with task.text_field=... task.label_field=..."
                )
            by_label.setdefault(str(row[self.label_field]), []).append(str(row[self.text_field]))
        if len(by_label) < 2:
            raise ValueError(f"{path} has {len(by_label)} label(s); augmentation needs at least 2")
        return by_label

    def prompt(self, shown: list[tuple[str, str]], labels: list[str]) -> str:
        text_name, label_name = self.text_type.capitalize(), self.label_type.capitalize()
        items = "\n\n".join(f"{text_name}: {text}\n{label_name}: {label} (100%)" for text, label in shown)
        return (
            f"Each item below is a {self.text_type} and its {self.label_type}.\n\n{items}\n\n"
            f"Write one new {self.text_type} that blends the items above, then its {self.label_type} as a "
            f"mix of {', '.join(labels)} with percentages that sum to 100. Use exactly this format:\n"
            f"{text_name}: <the new {self.text_type}>\n"
            f"{label_name}: <label> (<percent>%), <label> (<percent>%)"
        )

    def parse(self, reply: str, labels: list[str]) -> tuple[str, dict[str, float]] | str:
        """(text, soft label), or the reason it cannot be used."""
        text_tag = re.compile(rf"^\s*\**{re.escape(self.text_type)}\**\s*:\s*(.*)$", re.IGNORECASE)
        label_tag = re.compile(rf"^\s*\**{re.escape(self.label_type)}\**\s*:\s*(.*)$", re.IGNORECASE)
        text_lines: list[str] | None = None
        for line in reply.splitlines():
            label_match = label_tag.match(line)
            if label_match and text_lines is not None:
                try:
                    shares = parse_soft_label(label_match.group(1), labels)
                except KeyError:
                    return "unknown_label"
                if shares is None:
                    return "unparseable"
                return " ".join(t for t in text_lines if t).strip(), shares
            text_match = text_tag.match(line)
            if text_match and text_lines is None:
                text_lines = [text_match.group(1).strip()]
            elif text_lines is not None:
                text_lines.append(line.strip())
        return "unparseable"

    def run(
        self, backend: TeacherBackend, cache: ReplyCache, sampling: SamplingSettings, progress=True
    ) -> GenerationResult:
        by_label = self.examples()
        labels = sorted(by_label)
        requests, mixes = [], []
        for i in range(self.num_examples):
            rng = random.Random(f"{self.seed}/{i}")
            mix = sorted(rng.sample(labels, min(self.labels_per_prompt, len(labels))))
            shown = [
                (t, label)
                for label in mix
                for t in rng.sample(by_label[label], min(self.examples_per_label, len(by_label[label])))
            ]
            rng.shuffle(shown)
            requests.append(ChatRequest.user(self.prompt(shown, mix), sampling, sample_index=i))
            mixes.append(mix)
        replies, usage = answer_all(backend, requests, cache, desc="augment", progress=progress)
        kept_tokens = [words(t) for texts in by_label.values() for t in texts]
        seen = {" ".join(t) for t in kept_tokens}
        meta = teacher_meta(backend, sampling)
        records, dropped = [], Counter()
        for reply, mix in zip(replies, mixes):
            if reply is None:
                dropped["teacher_failed"] += 1
                continue
            parsed = self.parse(reply.text, labels)
            if isinstance(parsed, str):
                dropped[parsed] += 1
                continue
            text, shares = parsed
            tokens = words(text)
            if len(tokens) < self.min_words:
                dropped["too_short"] += 1
            elif " ".join(tokens) in seen:
                dropped["duplicate"] += 1
            elif any(rouge_l_f1(tokens, other) >= self.max_rouge_l for other in kept_tokens):
                dropped["too_similar"] += 1
            else:
                seen.add(" ".join(tokens))
                kept_tokens.append(tokens)
                top = max(shares, key=shares.get)
                records.append(
                    Record(
                        instruction=self.task_instruction,
                        input=text,
                        response=top,
                        meta={
                            "source": "augment",
                            "label_probs": json.dumps(shares, sort_keys=True),
                            "mixed_from": ",".join(mix),
                            **meta,
                        },
                    )
                )
        return GenerationResult(records, dropped, usage, {}, {"prompts": len(requests), "kept": len(records)})
