"""Self-instruct (Wang et al. 2023; Alpaca): a few seed tasks grow into many instructions, each answered.

Each round builds few-shot prompts from seed and already-kept instructions and asks the teacher for
new ones; candidates pass a filter (length bounds, banned keywords, duplicates, ROUGE-L similarity to
every kept instruction below a threshold), then the teacher answers the kept ones. Rounds are seeded
and replies come from the cache on a rerun, so a resumed run replays the same rounds and asks only
for what is missing.
"""

from __future__ import annotations

import logging
import random
import re
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from kd_lightning.data.records import jsonl_objects
from kd_lightning.generation.backends import ChatRequest, SamplingSettings, TeacherBackend
from kd_lightning.generation.runner import ReplyCache, UsageReport, answer_all

log = logging.getLogger(__name__)

SEED_TASKS_FILE = Path(__file__).with_name("seed_tasks.jsonl")

# Alpaca's list: tasks a text-only model cannot do (or answer only by pretending).
DEFAULT_BANNED_KEYWORDS = (
    "image", "images", "graph", "graphs", "picture", "pictures", "file", "files", "map", "maps",
    "draw", "plot", "go to", "video", "audio", "music", "flowchart", "diagram",
)  # fmt: skip

_WORD = re.compile(r"[a-z0-9]+")


def words(text: str) -> list[str]:
    """Lower-cased alphanumeric tokens (ROUGE's default tokenisation, without stemming)."""
    return _WORD.findall(text.lower())


def rouge_l_f1(candidate: Sequence[str], reference: Sequence[str]) -> float:
    """ROUGE-L F1 of two token lists (longest common subsequence; O(len·len) dynamic programme)."""
    if not candidate or not reference:
        return 0.0
    previous = [0] * (len(reference) + 1)
    for token in candidate:
        current = [0]
        for j, other in enumerate(reference, start=1):
            current.append(previous[j - 1] + 1 if token == other else max(previous[j], current[j - 1]))
        previous = current
    lcs = previous[-1]
    if lcs == 0:
        return 0.0
    precision, recall = lcs / len(candidate), lcs / len(reference)
    return 2 * precision * recall / (precision + recall)


@dataclass(frozen=True)
class SeedTask:
    instruction: str
    input: str = ""
    output: str = ""
    category: str = ""


def load_seed_tasks(path: str | Path | None = None) -> list[SeedTask]:
    """Seed tasks from JSONL (``instruction``, optional ``input``/``output``/``category``); default: ours."""
    path = Path(path).expanduser() if path else SEED_TASKS_FILE
    if not path.is_file():
        raise FileNotFoundError(f"seed task file {path} does not exist; set task.seed_tasks to a JSONL file")
    tasks = []
    for where, row in jsonl_objects(path):
        if not str(row.get("instruction", "")).strip():
            raise ValueError(f"{where}: each seed task needs a non-empty 'instruction' field")
        tasks.append(
            SeedTask(
                row["instruction"].strip(),
                row.get("input", ""),
                row.get("output", ""),
                row.get("category", ""),
            )
        )
    if len(tasks) < 2:
        raise ValueError(
            f"{path} holds {len(tasks)} seed task(s); self-instruct needs at least 2 to vary its prompts"
        )
    return tasks


@dataclass
class InstructionFilter:
    """Keeps a candidate instruction only if it is new, well-formed and unlike every kept one."""

    max_rouge_l: float = 0.7
    min_words: int = 3
    max_words: int = 150
    banned_keywords: Sequence[str] = DEFAULT_BANNED_KEYWORDS
    kept: list[list[str]] = field(default_factory=list)
    seen: set[str] = field(default_factory=set)

    def add(self, instruction: str) -> None:
        self.kept.append(words(instruction))
        self.seen.add(" ".join(words(instruction)))

    def reason_to_drop(self, instruction: str) -> str | None:
        """None if the instruction should be kept, else the reason (a summary key)."""
        tokens = words(instruction)
        if len(tokens) < self.min_words:
            return "too_short"
        if len(tokens) > self.max_words:
            return "too_long"
        if not instruction[0].isalnum():
            return "starts_with_punctuation"
        text = " " + " ".join(tokens) + " "
        if any(f" {kw} " in text for kw in self.banned_keywords):
            return "banned_keyword"
        if " ".join(tokens) in self.seen:
            return "duplicate"
        if any(rouge_l_f1(tokens, other) >= self.max_rouge_l for other in self.kept):
            return "too_similar"
        return None


_NUMBERED = re.compile(r"^\s*(?:\d+\s*[.):]|[-*•])\s*(?:instruction\s*:\s*)?(.+?)\s*$", re.IGNORECASE)
_MARKER = re.compile(r"^(?:\d+(?:\.\d+)*\s*[.):]\s*|[-*•]\s*|instruction\s*:\s*)", re.IGNORECASE)


def parse_instructions(text: str) -> list[str]:
    """Instructions from a numbered or bulleted list in the teacher's reply (other lines are ignored)."""
    found = []
    for line in text.splitlines():
        match = _NUMBERED.match(line)
        if match:
            instruction = match.group(1)
            while (marker := _MARKER.match(instruction)) and marker.end() < len(instruction):
                instruction = instruction[marker.end() :]  # nested markers: "1. 1. Do x", "2.1.3: Do y"
            instruction = instruction.strip().strip('"').strip()
            if instruction:
                found.append(instruction)
    return found


def propose_prompt(examples: Sequence[str], num_new: int) -> str:
    """The few-shot request for new instructions (Alpaca-style requirements, chat phrasing)."""
    shown = "\n".join(f"- {e}" for e in examples)
    return (
        "Here are some example tasks that a helpful AI assistant can do:\n"
        f"{shown}\n\n"
        f"Write {num_new} new tasks on other topics, different from these and from each other. Vary the kind "
        "of task (questions, explanations, writing, classification, extraction, maths, reasoning, advice) "
        "and the verb. Each task must be doable with text alone and be one or two sentences; if it needs an "
        "input (a sentence, a list, a number), include it in the task. "
        f"Do not repeat the examples. Write only the {num_new} new tasks, numbered 1 to {num_new}, one per line."
    )


@dataclass
class SelfInstruct:
    """Grows ``seed_tasks`` into ``num_instructions`` new instructions, then has the teacher answer them."""

    num_instructions: int = 200
    proposals_per_round: int = 8
    seed_examples: int = 6
    generated_examples: int = 2
    new_per_proposal: int = 8
    max_rounds: int = 100
    patience: int = 5  # stop after this many rounds in a row that keep nothing
    answer_seed_tasks: bool = True
    seed: int = 0
    filter: InstructionFilter = field(default_factory=InstructionFilter)
    propose_sampling: SamplingSettings = field(
        default_factory=lambda: SamplingSettings(max_new_tokens=320, generation_temperature=1.0, top_p=1.0)
    )

    def __post_init__(self) -> None:
        if self.num_instructions < 1 or self.proposals_per_round < 1 or self.new_per_proposal < 1:
            raise ValueError("num_instructions, proposals_per_round and new_per_proposal must be at least 1")

    def grow(
        self, backend: TeacherBackend, cache: ReplyCache, seeds: Sequence[SeedTask], progress: bool = True
    ) -> tuple[list[tuple[str, int]], Counter, UsageReport]:
        """(instruction, round) pairs kept, drop counts by reason, and the usage of the proposal requests."""
        for task in seeds:
            self.filter.add(task.instruction)
        seed_texts = [t.instruction if not t.input else f"{t.instruction} {t.input}" for t in seeds]
        kept: list[tuple[str, int]] = []
        dropped: Counter = Counter()
        usage = UsageReport()
        idle = 0
        for round_index in range(self.max_rounds):
            if len(kept) >= self.num_instructions:
                break
            requests = []
            for b in range(self.proposals_per_round):
                rng = random.Random(f"{self.seed}/{round_index}/{b}")
                examples = rng.sample(seed_texts, min(self.seed_examples, len(seed_texts)))
                machine = [k for k, _ in kept]
                examples += rng.sample(machine, min(self.generated_examples, len(machine)))
                rng.shuffle(examples)
                requests.append(
                    ChatRequest.user(propose_prompt(examples, self.new_per_proposal), self.propose_sampling)
                )
            replies, report = answer_all(
                backend, requests, cache, desc=f"propose round {round_index + 1}", progress=progress
            )
            usage.add(report)
            before = len(kept)
            for reply in replies:
                if reply is None:
                    continue
                candidates = parse_instructions(reply.text)
                if not candidates:
                    dropped["unparseable_reply"] += 1
                for candidate in candidates:
                    if len(kept) >= self.num_instructions:
                        break
                    reason = self.filter.reason_to_drop(candidate)
                    if reason:
                        dropped[reason] += 1
                        continue
                    self.filter.add(candidate)
                    kept.append((candidate, round_index))
            idle = 0 if len(kept) > before else idle + 1
            log.info("round %d: %d instructions kept in all", round_index + 1, len(kept))
            if idle >= self.patience:
                log.warning(
                    "no new instruction kept in %d rounds in a row; stopping at %d of %d "
                    "(the teacher may not follow the list format; see the drop reasons)",
                    idle, len(kept), self.num_instructions,
                )  # fmt: skip
                break
        return kept, dropped, usage
