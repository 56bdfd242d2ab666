"""Talking to an OpenAI-compatible HTTP API: the official client, counted retries with backoff, and the
failures that end a run in one line. Shared by the generation backend (chat completions) and the served
teacher (prompt scoring on ``/v1/completions``)."""

from __future__ import annotations

import json
import os
import random
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit


class GenerationError(RuntimeError):
    """An error no retry can fix (authentication, unknown model, bad settings); the message says the fix."""


@dataclass
class RequestFailure:
    """A request that failed after its retries; it is not cached, so a rerun tries it again."""

    reason: str  # short category: rate_limited, server_error, timeout, connection, malformed, bad_request
    detail: str
    retries: int = 0
    """How often the request was retried before this failure."""
    waited_s: float = 0.0
    """Seconds spent waiting between its attempts."""


@dataclass
class BackendStats:
    """Retries by reason, counted across threads."""

    retries: Counter = field(default_factory=Counter)
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def retried(self, reason: str) -> None:
        with self.lock:
            self.retries[reason] += 1


def public_url(url: str) -> str:
    """The URL without credentials, query or fragment (safe to record)."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if parts.port:
        host = f"{host}:{parts.port}"
    return urlunsplit((parts.scheme, host, parts.path, "", ""))


class MalformedReply(ValueError):
    """The server answered 200 with something that is not a usable reply."""


class OpenAIClient:
    """An OpenAI-compatible HTTP API through the official ``openai`` client, with counted retries.

    The key is read from the environment variable named by ``api_key_env`` and never stored in configs,
    logs, caches or corpus records. Retries (429, 5xx, timeouts, dropped connections, malformed replies)
    use exponential backoff with jitter and honour ``Retry-After``; the client's own retries are off so
    that every retry is counted here. An answer no retry can fix (a refused key, an unknown model) sets
    ``_fatal``, which stops every request in flight.
    """

    def __init__(
        self,
        model: str,
        base_url: str | None = None,
        api_key_env: str = "OPENAI_API_KEY",
        concurrency: int = 8,
        max_retries: int = 6,
        timeout_s: float = 60.0,
        backoff_s: float = 1.0,
        max_backoff_s: float = 60.0,
        connect_budget_s: float = 15.0,
    ) -> None:
        try:
            import openai
        except ImportError:  # depends on extras
            raise GenerationError(
                "talking to an OpenAI-compatible server needs the openai client: pip install 'kd_lightning[api]'"
            ) from None
        if concurrency < 1 or max_retries < 0 or timeout_s <= 0 or connect_budget_s < 0:
            raise ValueError(
                f"max_concurrency={concurrency} must be ≥ 1, max_retries={max_retries} ≥ 0, timeout_s={timeout_s} > 0, "
                f"connect_budget_s={connect_budget_s} ≥ 0"
            )
        key = os.environ.get(api_key_env or "")
        base_url = base_url or os.environ.get("OPENAI_BASE_URL") or "https://api.openai.com/v1"
        self.openai = openai
        # without a key no Authorization header is sent (a local vLLM started without --api-key wants none)
        self.client = openai.OpenAI(
            api_key=key or "unused", base_url=base_url, timeout=timeout_s, max_retries=0
        )
        self.request_options = {} if key else {"extra_headers": {"Authorization": openai.Omit()}}
        self.has_key = bool(key)
        self.model = model
        self.api_key_env = api_key_env
        self.base_url = public_url(base_url)
        self.concurrency = concurrency
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.max_backoff_s = max_backoff_s
        self.connect_budget_s = connect_budget_s
        self.stats = BackendStats()
        self._fatal: GenerationError | None = None

    def _classify(self, err: Exception) -> tuple[str, bool]:
        """(reason, retryable) for an exception raised by one call."""
        o = self.openai
        if isinstance(err, o.RateLimitError):
            return "rate_limited", True
        if isinstance(err, o.APITimeoutError):
            return "timeout", True
        if isinstance(err, o.APIConnectionError):
            return "connection", True
        if isinstance(err, o.APIStatusError):
            if err.status_code >= 500 or err.status_code == 408:
                return "server_error", True
            if err.status_code in (401, 403):
                advice = (
                    f"check the key in ${self.api_key_env}"
                    if self.has_key
                    else f"it wants a key: export {self.api_key_env}=<key>"
                )
                self._fatal = GenerationError(
                    f"the server at {self.base_url} refused the request ({err.status_code}): {advice}"
                )
                return "auth", False
            if err.status_code == 404:
                self._fatal = GenerationError(
                    f"the API at {self.base_url} answered 404 for model {self.model!r}; check teacher.model "
                    "and teacher.base_url (it usually ends in /v1)"
                )
                return "not_found", False
            return "bad_request", False
        if isinstance(err, MalformedReply | o.APIResponseValidationError | json.JSONDecodeError):
            return "malformed", True
        raise err

    def _delay(self, attempt: int, err: Exception) -> float:
        response = getattr(err, "response", None)
        header = response.headers.get("retry-after") if response is not None else None
        if header:
            try:
                return min(float(header), self.max_backoff_s)
            except ValueError:
                pass
        return min(self.max_backoff_s, self.backoff_s * 2**attempt) * (0.5 + random.random() / 2)

    def _retrying(self, call):
        """``call()``, retried on what a retry can fix; a :class:`RequestFailure` when it still fails.

        A server that cannot be reached (refused or dropped connections, timeouts) is retried for at most
        ``connect_budget_s`` seconds of waiting; other retryable answers (429, 5xx) ``max_retries`` times.
        """
        waited = 0.0
        for attempt in range(self.max_retries + 1):
            if self._fatal is not None:
                return RequestFailure("aborted", str(self._fatal), attempt)
            try:
                return call()
            except Exception as err:  # classified below; unknown errors re-raise from _classify
                reason, retryable = self._classify(err)
                delay = self._delay(attempt, err)
                unreachable = reason in ("connection", "timeout")
                if unreachable and waited + delay > self.connect_budget_s:
                    retryable = False
                if not retryable or attempt == self.max_retries:
                    return RequestFailure(reason, _detail(err), attempt, waited)
                self.stats.retried(reason)
                time.sleep(delay)
                waited += delay
        raise AssertionError("unreachable")  # pragma: no cover


def _detail(err: Exception) -> str:
    """What a failed request said: the status and the server's own message for an HTTP answer."""
    status = getattr(err, "status_code", None)
    body = getattr(err, "body", None)
    said = body.get("message") or body.get("error") if isinstance(body, dict) else None
    if isinstance(said, dict):
        said = said.get("message")
    text = str(said or err).strip().replace("\n", " ")
    return f"{status}: {text[:200]}" if status else f"{type(err).__name__}: {text[:200]}"
