"""Teacher backends behind one interface: a local Hugging Face model or an OpenAI-compatible HTTP API.

A backend turns :class:`ChatRequest` s into :class:`TeacherReply` s and streams them back as they finish,
so the runner can cache each one on disk the moment it exists (a kill loses at most the requests in
flight). Failures come back as :class:`RequestFailure` values, not exceptions, so one bad request does
not end a run of thousands; only errors that no retry can fix (bad key, unknown model) stop the run.
"""

from __future__ import annotations

import hashlib
import json
import logging
import warnings
from abc import ABC, abstractmethod
from collections.abc import Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor, as_completed
from dataclasses import asdict, dataclass
from typing import Any

from kd_lightning.teachers.openai_client import (
    BackendStats,
    GenerationError,
    MalformedReply,
    OpenAIClient,
    RequestFailure,
    public_url,
)

log = logging.getLogger(__name__)

__all__ = [
    "BackendStats",
    "GenerationError",
    "MalformedReply",
    "OpenAIClient",
    "RequestFailure",
    "public_url",
]


@dataclass(frozen=True)
class SamplingSettings:
    """How the teacher samples. ``generation_temperature`` 0 is greedy; ``top_logprobs`` > 0 asks for
    the top alternatives at each generated token (stored as extra soft-label evidence)."""

    max_new_tokens: int = 256
    generation_temperature: float = 0.7
    top_p: float = 1.0
    top_logprobs: int = 0

    def __post_init__(self) -> None:
        if self.max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={self.max_new_tokens} must be at least 1")
        if self.generation_temperature < 0:
            raise ValueError(f"generation_temperature={self.generation_temperature} must be ≥ 0 (0: greedy)")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"top_p={self.top_p} must be in (0, 1]")
        if not 0 <= self.top_logprobs <= 20:
            raise ValueError(f"top_logprobs={self.top_logprobs} must be in [0, 20] (the OpenAI API's limit)")


@dataclass(frozen=True)
class ChatRequest:
    """One conversation to answer. ``sample_index`` tells repeated draws of the same prompt apart."""

    messages: tuple[tuple[str, str], ...]  # (role, content)
    sampling: SamplingSettings
    sample_index: int = 0

    @classmethod
    def user(
        cls, text: str, sampling: SamplingSettings, system: str = "", sample_index: int = 0
    ) -> ChatRequest:
        messages = ((("system", system),) if system else ()) + (("user", text),)
        return cls(messages, sampling, sample_index)

    def message_dicts(self) -> list[dict[str, str]]:
        return [{"role": role, "content": content} for role, content in self.messages]

    def key(self, teacher: Mapping[str, Any]) -> str:
        """Cache key: the teacher's identity, the conversation, the sampling settings and the draw index."""
        payload = {
            "teacher": dict(teacher),
            "messages": self.messages,
            "sampling": asdict(self.sampling),
            "sample_index": self.sample_index,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()

    def seed(self, teacher: Mapping[str, Any]) -> int:
        """A per-request sampling seed derived from the key (reproducible where the backend honours it)."""
        return int(self.key(teacher)[:8], 16)


@dataclass
class TeacherReply:
    """The teacher's answer and what it cost. ``logprobs``: per generated token
    ``{"token", "logprob", "top": [[token, logprob], ...]}`` when requested and returned."""

    text: str
    prompt_tokens: int = 0
    completion_tokens: int = 0
    finish_reason: str = "stop"
    logprobs: list[dict[str, Any]] | None = None

    @classmethod
    def from_json(cls, row: Mapping[str, Any]) -> TeacherReply:
        return cls(
            **{k: row[k] for k in ("text", "prompt_tokens", "completion_tokens", "finish_reason", "logprobs")}
        )


class TeacherBackend(ABC):
    """A teacher that answers conversations."""

    stats: BackendStats
    price_per_million_prompt_tokens: float | None = None
    price_per_million_completion_tokens: float | None = None

    @abstractmethod
    def identity(self) -> dict[str, str]:
        """What identifies this teacher in cache keys and corpus records (never a secret)."""

    @abstractmethod
    def stream(self, requests: Sequence[ChatRequest]) -> Iterator[tuple[int, TeacherReply | RequestFailure]]:
        """Answer ``requests``; yields ``(index, reply or failure)`` in completion order."""

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float | None:
        """Dollars for these tokens, or None when no price is configured."""
        if self.price_per_million_prompt_tokens is None or self.price_per_million_completion_tokens is None:
            return None
        return (
            prompt_tokens * self.price_per_million_prompt_tokens
            + completion_tokens * self.price_per_million_completion_tokens
        ) / 1e6


class LocalTeacher(TeacherBackend):
    """A local Hugging Face chat model (a folder, or ``smollm2``), answering in batches."""

    def __init__(
        self,
        model_path: str,
        batch_size: int = 8,
        dtype: str = "float32",
        max_prompt_tokens: int = 2048,
        device: str | None = None,
    ) -> None:
        from kd_lightning.artifacts import model_identity  # deferred like torch: API-only users skip both
        from kd_lightning.models.chat import ChatGenerator
        from kd_lightning.models.loading import load_causal_lm, load_tokenizer

        if batch_size < 1:
            raise ValueError(f"teacher.batch_size={batch_size} must be at least 1")
        self.model_path = model_path
        self.batch_size = batch_size
        self._identity = {"backend": "local", "model": str(model_path), **model_identity(model_path)}
        model = load_causal_lm(model_path, dtype=dtype)
        if device:
            model = model.to(device)
        self.generator = ChatGenerator(model, load_tokenizer(model_path), max_prompt_tokens)
        self.stats = BackendStats()

    def identity(self) -> dict[str, str]:
        return dict(self._identity)

    def stream(self, requests: Sequence[ChatRequest]) -> Iterator[tuple[int, TeacherReply | RequestFailure]]:
        by_settings: dict[SamplingSettings, list[int]] = {}
        for index, request in enumerate(requests):
            by_settings.setdefault(request.sampling, []).append(index)
        for sampling, indices in by_settings.items():
            for start in range(0, len(indices), self.batch_size):
                batch = indices[start : start + self.batch_size]
                completions = self.generator.generate(
                    [requests[i].message_dicts() for i in batch],
                    max_new_tokens=sampling.max_new_tokens,
                    generation_temperature=sampling.generation_temperature,
                    top_p=sampling.top_p,
                    seed=requests[batch[0]].seed(self._identity),
                    top_logprobs=sampling.top_logprobs,
                )
                for index, completion in zip(batch, completions):
                    yield (
                        index,
                        TeacherReply(
                            text=completion.text,
                            prompt_tokens=completion.prompt_tokens,
                            completion_tokens=completion.completion_tokens,
                            finish_reason=completion.finish_reason,
                            logprobs=None
                            if completion.logprobs is None
                            else [
                                {"token": t.token, "logprob": t.logprob, "top": [list(a) for a in t.top]}
                                for t in completion.logprobs
                            ],
                        ),
                    )


class OpenAITeacher(OpenAIClient, TeacherBackend):
    """Any OpenAI-compatible chat-completions API as the teacher (see :class:`OpenAIClient` for the key,
    the retries and the failures that stop a run); ``max_concurrency`` requests in flight (``concurrency``:
    its name before 0.2.0, removed in v0.3.0)."""

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        max_concurrency: int = 8,
        max_retries: int = 6,
        timeout_s: float = 60.0,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        price_per_million_prompt_tokens: float | None = None,
        price_per_million_completion_tokens: float | None = None,
        concurrency: int | None = None,
    ) -> None:
        if concurrency is not None:  # the name a served teacher's client does not use
            warnings.warn(
                "teacher_backend.concurrency is now teacher_backend.max_concurrency (as teacher.max_concurrency); "
                "the old name will be removed in v0.3.0",
                FutureWarning,
                stacklevel=2,
            )
            max_concurrency = concurrency
        super().__init__(
            model, base_url, api_key_env, max_concurrency, max_retries, timeout_s, backoff_s, max_backoff_s
        )
        self.price_per_million_prompt_tokens = price_per_million_prompt_tokens
        self.price_per_million_completion_tokens = price_per_million_completion_tokens

    def identity(self) -> dict[str, str]:
        return {"backend": "openai", "model": self.model, "base_url": self.base_url}

    def _call(self, request: ChatRequest) -> TeacherReply:
        s = request.sampling
        extra: dict[str, Any] = {}
        if s.top_logprobs:
            extra = {"logprobs": True, "top_logprobs": s.top_logprobs}
        response = self.client.chat.completions.create(
            model=self.model,
            messages=request.message_dicts(),
            max_tokens=s.max_new_tokens,
            temperature=s.generation_temperature,
            top_p=s.top_p,
            seed=request.seed(self.identity()),
            **extra,
            **self.request_options,
        )
        choices = getattr(response, "choices", None)
        if not choices:
            raise MalformedReply("the reply has no choices")
        message = getattr(choices[0], "message", None)
        content = getattr(message, "content", None)
        if not isinstance(content, str):
            raise MalformedReply("the reply's first choice has no text content")
        usage = getattr(response, "usage", None)
        logprobs = None
        lp = getattr(choices[0], "logprobs", None)
        if s.top_logprobs and lp is not None and getattr(lp, "content", None):
            logprobs = [
                {
                    "token": t.token,
                    "logprob": float(t.logprob),
                    "top": [[a.token, float(a.logprob)] for a in (t.top_logprobs or [])],
                }
                for t in lp.content
            ]
        return TeacherReply(
            text=content.strip(),
            prompt_tokens=int(getattr(usage, "prompt_tokens", 0) or 0),
            completion_tokens=int(getattr(usage, "completion_tokens", 0) or 0),
            finish_reason=str(choices[0].finish_reason or "stop"),
            logprobs=logprobs,
        )

    def _answer(self, request: ChatRequest) -> TeacherReply | RequestFailure:
        return self._retrying(lambda: self._call(request))

    def stream(self, requests: Sequence[ChatRequest]) -> Iterator[tuple[int, TeacherReply | RequestFailure]]:
        with ThreadPoolExecutor(max_workers=self.concurrency) as pool:
            futures = {pool.submit(self._answer, r): i for i, r in enumerate(requests)}
            try:
                for future in as_completed(futures):
                    yield futures[future], future.result()
                    if self._fatal is not None:
                        raise self._fatal
            finally:
                for future in futures:
                    future.cancel()
