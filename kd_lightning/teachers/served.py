"""A white-box teacher that lives in its own server: any OpenAI-compatible server that scores prompts.

``teacher=served`` reads the teacher's distributions over the student's corpus from ``/v1/completions``
instead of running the teacher in the training process, so the teacher need not fit beside the student
(vLLM, TGI or the loopback server on one machine; the student on another). ``teacher.api`` names the wire
form (``vllm``: ``prompt_logprobs`` on token ids; ``openai_completions``: ``echo`` with ``logprobs`` on text), one
strategy each in :mod:`kd_lightning.teachers.wire`.

Rows are the store's: the top k and a tail of ``1 − Σp``. The server must tokenize as the student does:
one probe request per run checks that, and a mismatch is refused in one line (a teacher of another
tokenizer runs in process: ``module=foreign_teacher``). Requests run ``max_concurrency`` at a time with the
retries, backoff and one-line failures of :class:`~kd_lightning.teachers.openai_client.OpenAIClient`.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from kd_lightning.teachers.openai_client import (
    GenerationError,
    MalformedReply,
    OpenAIClient,
    RequestFailure,
)
from kd_lightning.teachers.wire import wire_form


class ServedTeacherError(GenerationError):
    """The served teacher cannot be used as configured; the message names the setting and the fix."""


class ServedTeacher(OpenAIClient):
    """A teacher reached over HTTP (``conf/teacher/served.yaml``); see the module docstring.

    Args:
        base_url: the server's OpenAI-compatible root, ending in ``/v1``.
        model: the model name the server serves.
        api: ``vllm`` or ``openai_completions`` (the wire form).
        api_key_env: the environment variable holding the key; unset, no Authorization header is sent (a
            local server started without a key).
        max_logprobs: the most log-probs per position the server returns (vLLM's and OpenAI's cap: 20).
        max_concurrency: requests in flight at once.
        timeout_s, max_retries, backoff_s: per request (retries on 408, 429, 5xx and malformed replies; other
            4xx answers are not retried).
        connect_budget_s: the most seconds spent waiting to retry a server that cannot be reached.
    """

    def __init__(
        self,
        base_url: str,
        model: str,
        api: str = "vllm",
        api_key_env: str = "KDL_TEACHER_API_KEY",
        max_logprobs: int = 20,
        max_concurrency: int = 8,
        timeout_s: float = 120.0,
        max_retries: int = 6,
        backoff_s: float = 1.0,
        connect_budget_s: float = 15.0,
    ) -> None:
        self.wire = wire_form(api)
        if max_logprobs < 1:
            raise ValueError(f"teacher.max_logprobs={max_logprobs} must be >= 1")
        super().__init__(
            model,
            base_url,
            api_key_env,
            max_concurrency,
            max_retries,
            timeout_s,
            backoff_s,
            connect_budget_s=connect_budget_s,
        )
        self.api = api
        self.resumable = False
        """Whether a failure leaves finished shards a rerun resumes from (an offline store's build)."""
        self.max_logprobs = max_logprobs
        self.requests = 0
        self.prompt_tokens = 0
        self._count = threading.Lock()

    def identity(self) -> dict[str, Any]:
        """What identifies the teacher in a store's key: server, model and wire form (never the key)."""
        return {"served": self.base_url, "model": self.model, "api": self.api}

    def report(self) -> dict[str, Any]:
        """Requests, prompt tokens and retries so far (for the run's stats)."""
        return {
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "retries": dict(self.stats.retries),
        }

    def check_tokenizer(self, ids: Sequence[int], text_of: Any, tokenizer: Any) -> None:
        """One probe request on the first 32 tokens of ``ids`` (``text_of(ids)``: their text): the server must
        tokenize as the student does (its ids, or its token texts), else the run is refused in one line
        before anything is scored."""
        probe = list(ids)[:32]
        result = self._retrying(lambda: self._ask_probe(probe, text_of(probe)))
        if isinstance(result, RequestFailure):
            raise ServedTeacherError(self._explain(result))
        theirs = result
        ours = [tokenizer.decode([i], skip_special_tokens=False) for i in probe]
        if theirs != self.wire.expected_probe(ours):
            raise ServedTeacherError(
                f"the served teacher at {self.base_url} ({self.model}) tokenizes differently from the student "
                f"({theirs[:6]} vs {ours[:6]}); serve a model with the student's tokenizer, or run a teacher of "
                "another tokenizer in process (module=foreign_teacher, teacher=local teacher.path=...)"
            )

    def _ask_probe(self, ids: list[int], text: str) -> list[str]:
        request = self.wire.probe_request(ids, text)
        return self.wire.read_probe(
            self.client.completions.create(model=self.model, **request, **self.request_options), ids
        )

    # ------------------------------------------------------------------------------------ requests
    def _request(self, ids: Sequence[int], text: str, k: int) -> list[dict[str, float] | None]:
        """One prompt scored: per token, ``{key: logprob}`` (None for the first; keys as the wire form gives
        them, :meth:`~kd_lightning.teachers.wire.WireForm.id_map`)."""
        request = self.wire.scoring_request(ids, text, k)
        reply = self.client.completions.create(model=self.model, **request, **self.request_options)
        found = self.wire.read_scores(reply, k)
        with self._count:
            self.requests += 1
            self.prompt_tokens += len(ids)
        return found

    def score(
        self, sequences: Sequence[Sequence[int]], texts: Sequence[str], k: int
    ) -> list[list[dict | None]]:
        """Each sequence scored (``texts``: the same sequences as text, for ``openai_completions``), in
        order, ``max_concurrency`` at a time. A failure after the retries is one :class:`ServedTeacherError`."""
        self.check_k(k)

        def one(i: int):
            return self._retrying(lambda: self._request(sequences[i], texts[i], k))

        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            results = list(pool.map(one, range(len(sequences))))
        for i, result in enumerate(results):
            if isinstance(result, RequestFailure):
                raise ServedTeacherError(self._explain(result))
            if len(result) != len(sequences[i]):
                raise ServedTeacherError(
                    f"the served teacher at {self.base_url} scored {len(result)} positions of a prompt of "
                    f"{len(sequences[i])} tokens; it must tokenize as the student does (teacher.api={self.api})"
                )
        return results

    def check_k(self, k: int) -> None:
        """Refuse, before any request, a k above what the server returns per position."""
        if k > self.max_logprobs:
            raise ServedTeacherError(
                f"estimator.teacher_targets.k={k} is above teacher.max_logprobs={self.max_logprobs}, the most a "
                f"server returns per position; set estimator.teacher_targets.k={self.max_logprobs} or lower"
            )

    def _explain(self, failure: RequestFailure) -> str:
        if self._fatal is not None:
            return str(self._fatal)
        what = {
            "connection": "cannot be reached",
            "timeout": "did not answer in time",
            "malformed": "answered with something that is not a scoring reply",
            "bad_request": "refused the request",
            "server_error": "kept failing (5xx)",
            "rate_limited": "kept refusing (429)",
        }.get(failure.reason, failure.reason)
        if failure.reason in ("connection", "timeout"):
            tried = (
                f"after {failure.retries} retries over {failure.waited_s:.0f} s (teacher.connect_budget_s="
                f"{self.connect_budget_s:g} raises the wait)"
            )
        elif failure.retries:
            tried = f"after {failure.retries} retries"
        else:
            tried = "(not retried: the server's answer does not change on a retry)"
        resume = "; a rerun resumes from the finished shards" if self.resumable else ""
        return (
            f"the served teacher at {self.base_url} {what} {tried}; it said {failure.detail}; check "
            f"teacher.base_url, teacher.model and that the server scores prompts (teacher.api){resume}"
        )


def rows_of_sequence(
    scored: list[dict[str, float] | None], prompt_len: int, k: int, to_id: Mapping[str, int] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The store rows of one sequence's target positions (``prompt_len − 1`` … ``len − 2``), from its
    scored tokens: position t is described by the scores of token t + 1."""
    return rows_of_entries(scored[prompt_len:], k, to_id)


def rows_of_entries(
    entries: Sequence[Mapping[str, float] | None], k: int, to_id: Mapping[str, int] | None
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Sparse rows of scored tokens' log-probs (``{token: logprob}`` each): the top k, and the tail 1 − Σp.
    ``to_id`` maps token texts to ids (``openai_completions``); vLLM's keys are ids already. Returns ids
    (n, k) int64, probs (n, k) float16 and tail (n,) float32: the dtypes an offline store keeps, so a step
    reading a served teacher online sees the very values its offline store would hold."""
    ids = np.zeros((len(entries), k), dtype=np.int64)
    probs = np.zeros((len(entries), k), dtype=np.float64)
    for row, entry in enumerate(entries):
        if entry is None:
            raise MalformedReply("a scored target position has no log-probs")
        items = sorted(entry.items(), key=lambda e: -e[1])[:k]
        for slot, (token, lp) in enumerate(items):
            ids[row, slot] = int(token) if to_id is None else to_id[token]
            probs[row, slot] = math.exp(lp)
    tail = np.clip(1.0 - probs.sum(1), 0.0, 1.0)
    return ids, probs.astype(np.float16), tail.astype(np.float32)
