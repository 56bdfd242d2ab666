"""Prompt scoring in batches: concurrent requests share one right-padded forward, as vLLM batches them.

The loopback server (:mod:`kd_lightning.teachers.server`) scores ``/v1/completions`` prompts through a
:class:`ScoringBatcher`, so a served teacher's ``max_concurrency`` buys what it buys against vLLM: requests
that arrive within ``batch_wait_s`` of each other run as one forward of up to ``max_batch_size`` sequences.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from torch import nn


def next_batch(jobs: queue.Queue, max_size: int, wait_s: float) -> list | None:
    """The next micro-batch: the first job (waiting for it), then those that arrive within ``wait_s`` of it,
    up to ``max_size``. None once the queue holds the stop signal (None), which stays for the next reader."""
    first = jobs.get()
    if first is None:
        return None
    batch = [first]
    deadline = time.monotonic() + wait_s
    while len(batch) < max_size:
        try:
            job = jobs.get(timeout=max(deadline - time.monotonic(), 0))
        except queue.Empty:
            break
        if job is None:
            jobs.put(None)
            break
        batch.append(job)
    return batch


@dataclass
class _ScoreJob:
    ids: list[int]
    done: threading.Event = field(default_factory=threading.Event)
    result: Any = None
    error: BaseException | None = None


class ScoringBatcher:
    """Scores token sequences with ``model``; run :meth:`loop` in a thread, call :meth:`score` from many."""

    def __init__(self, model: nn.Module, max_batch_size: int = 8, batch_wait_s: float = 0.02) -> None:
        self.model = model
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.jobs: queue.Queue[_ScoreJob | None] = queue.Queue()
        self.lock = threading.Lock()  # one forward at a time
        self.batches: list[int] = []  # sequences per forward, in order

    def score(self, ids: list[int]) -> Any:
        """(T − 1, V) log-probabilities of each next token of ``ids``, once its batch has run."""
        job = _ScoreJob(list(ids))
        self.jobs.put(job)
        job.done.wait()
        if job.error is not None:
            raise job.error
        return job.result

    def stop(self) -> None:
        self.jobs.put(None)

    def loop(self) -> None:
        """Collect the jobs that arrive within ``batch_wait_s`` of the first (up to ``max_batch_size``)."""
        while True:
            batch = next_batch(self.jobs, self.max_batch_size, self.batch_wait_s)
            if batch is None:
                return
            try:
                for job, result in zip(batch, self.forward([job.ids for job in batch])):
                    job.result = result
            except Exception as err:  # the callers raise it (the server answers 500); the loop keeps serving
                for job in batch:
                    job.error = err
            finally:
                for job in batch:
                    job.done.set()

    def forward(self, sequences: list[list[int]]) -> list[Any]:
        """Log-probabilities of each sequence from one right-padded forward (a causal model's real
        positions are unchanged by padding after them)."""
        import torch  # the server module stays importable without torch until it scores

        longest = max(len(ids) for ids in sequences)
        input_ids = torch.zeros((len(sequences), longest), dtype=torch.long)
        mask = torch.zeros_like(input_ids)
        for row, ids in enumerate(sequences):
            input_ids[row, : len(ids)] = torch.tensor(ids)
            mask[row, : len(ids)] = 1
        with self.lock, torch.inference_mode():
            logits = self.model(input_ids=input_ids, attention_mask=mask).logits
        self.batches.append(len(sequences))
        return [
            torch.log_softmax(logits[row, : len(ids) - 1].float(), dim=-1)
            for row, ids in enumerate(sequences)
        ]
