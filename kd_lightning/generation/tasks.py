"""What to generate: answers to self-instructed instructions, to a given list, or labelled augmentations.

Every task returns :class:`GenerationResult`: corpus records in the core pipeline's format (with the
teacher's identity and sampling settings in each record's metadata), drop counts by reason, token usage,
and the teacher's top-k log-probabilities per record when they were requested and returned.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kd_lightning.data.records import Record, jsonl_objects
from kd_lightning.generation.backends import ChatRequest, SamplingSettings, TeacherBackend
from kd_lightning.generation.runner import ReplyCache, UsageReport, answer_all
from kd_lightning.generation.self_instruct import SelfInstruct, load_seed_tasks


@dataclass(frozen=True)
class Prompt:
    """An instruction for the teacher to answer, with where it came from."""

    instruction: str
    input: str = ""
    system: str = ""
    meta: dict[str, str] = field(default_factory=dict)

    def user_text(self) -> str:
        return self.instruction if not self.input else f"{self.instruction}\n\n{self.input}"


@dataclass
class GenerationResult:
    records: list[Record]
    dropped: Counter
    usage: UsageReport
    logprobs: dict[str, list[dict[str, Any]]] = field(default_factory=dict)  # record key → per-token top-k
    stages: dict[str, int] = field(default_factory=dict)  # counts along the way, for the summary


def teacher_meta(backend: TeacherBackend, sampling: SamplingSettings) -> dict[str, str]:
    """Record metadata naming the teacher and how it sampled."""
    identity = backend.identity()
    return {
        "teacher": identity.get("model", ""),
        "teacher_backend": identity.get("backend", ""),
        **{k: str(v) for k, v in asdict(sampling).items() if k != "top_logprobs"},
    }


def answer_prompts(
    backend: TeacherBackend,
    cache: ReplyCache,
    prompts: Sequence[Prompt],
    sampling: SamplingSettings,
    progress: bool = True,
) -> GenerationResult:
    """The teacher's answer to each prompt as a record; failed and empty answers are counted, not kept."""
    requests = [ChatRequest.user(p.user_text(), sampling, system=p.system) for p in prompts]
    replies, usage = answer_all(backend, requests, cache, desc="answer", progress=progress)
    meta = teacher_meta(backend, sampling)
    records, dropped, logprobs = [], Counter(), {}
    seen: set[str] = set()
    for prompt, reply in zip(prompts, replies):
        if reply is None:
            dropped["teacher_failed"] += 1
            continue
        if not reply.text.strip():
            dropped["empty_answer"] += 1
            continue
        record = Record(
            instruction=prompt.instruction,
            input=prompt.input,
            system=prompt.system,
            response=reply.text,
            meta={**prompt.meta, **meta, "finish_reason": reply.finish_reason},
        )
        if record.key in seen:
            dropped["duplicate_prompt"] += 1
            continue
        seen.add(record.key)
        records.append(record)
        if reply.logprobs:
            logprobs[record.key] = reply.logprobs
    return GenerationResult(
        records, dropped, usage, logprobs, {"prompts": len(prompts), "answered": len(records)}
    )


class GenerationTask(ABC):
    """A way of producing a teacher corpus."""

    @abstractmethod
    def run(
        self, backend: TeacherBackend, cache: ReplyCache, sampling: SamplingSettings, progress: bool = True
    ) -> GenerationResult:
        """Generate; ``sampling`` is how the teacher answers."""


@dataclass
class SelfInstructTask(GenerationTask):
    """Self-instruct from seed tasks (``seed_tasks``: a JSONL path; None: the 63 shipped ones)."""

    self_instruct: SelfInstruct = field(default_factory=SelfInstruct)
    seed_tasks: str | None = None

    def run(self, backend, cache, sampling, progress=True) -> GenerationResult:
        seeds = load_seed_tasks(self.seed_tasks)
        grown, dropped, usage = self.self_instruct.grow(backend, cache, seeds, progress)
        prompts = [Prompt(text, meta={"source": "self_instruct", "round": str(r)}) for text, r in grown]
        if self.self_instruct.answer_seed_tasks:
            prompts = [
                Prompt(t.instruction, t.input, meta={"source": "seed", "category": t.category}) for t in seeds
            ] + prompts
        result = answer_prompts(backend, cache, prompts, sampling, progress)
        result.usage.add(usage)
        result.dropped.update({f"instruction_{k}": v for k, v in dropped.items()})
        result.stages = {"seed_tasks": len(seeds), "instructions_kept": len(grown), **result.stages}
        return result


@dataclass
class InstructionFileTask(GenerationTask):
    """Answer instructions from a file: JSONL rows with ``instruction`` (optional ``input``, ``system``),
    or a text file with one instruction per line."""

    path: str

    def prompts(self) -> list[Prompt]:
        path = Path(self.path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(
                f"instruction file {path} does not exist; set task.path to a .jsonl or .txt file"
            )
        if path.suffix != ".jsonl":
            lines = path.read_text(encoding="utf-8").splitlines()
            prompts = [Prompt(line.strip(), meta={"source": path.name}) for line in lines if line.strip()]
        else:
            prompts = []
            for where, row in jsonl_objects(path):
                if not isinstance(row.get("instruction"), str) or not row["instruction"].strip():
                    raise ValueError(f"{where}: each row needs a non-empty string 'instruction'")
                meta = {"source": path.name}
                prompts.append(
                    Prompt(row["instruction"], row.get("input") or "", row.get("system") or "", meta)
                )
        if not prompts:
            raise ValueError(f"{path} holds no instructions")
        return prompts

    def run(self, backend, cache, sampling, progress=True) -> GenerationResult:
        return answer_prompts(backend, cache, self.prompts(), sampling, progress)
