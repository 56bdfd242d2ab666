"""The OpenAI wire protocol as the loopback server speaks it: requests checked, answers built.

Every malformed request becomes a :class:`RequestError` whose message the server returns with a 400.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

from kd_lightning.models.chat import Completion
from kd_lightning.teachers.wire import WIRE_FORMS, RequestError

ROLES = ("system", "user", "assistant", "developer")
MAX_TOP_LOGPROBS = 20  # OpenAI's limit


def _number(body: Mapping[str, Any], key: str, default: float, low: float, high: float) -> float:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int | float) or not low <= value <= high:
        raise RequestError(f"{key!r} must be a number in [{low:g}, {high:g}], got {value!r}")
    return float(value)


def _integer(body: Mapping[str, Any], key: str, default: int, low: int, high: int) -> int:
    value = body.get(key)
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise RequestError(f"{key!r} must be an integer in [{low}, {high}], got {value!r}")
    return value


def parse_chat_request(body: Any) -> tuple[list[dict[str, str]], tuple[int, float, float, int], int | None]:
    """(messages, (max_tokens, temperature, top_p, top_logprobs), seed) of a valid request, else RequestError.

    Every field the batch loop relies on is checked here, so a malformed request is answered 400 and
    never reaches (or stops) generation.
    """
    if not isinstance(body, dict):
        raise RequestError(f"the body must be a JSON object, got {type(body).__name__}")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty list of {role, content} objects")
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            raise RequestError(f"messages[{i}] must be an object with 'role' and 'content'")
        if message.get("role") not in ROLES:
            raise RequestError(f"messages[{i}].role must be one of {ROLES}, got {message.get('role')!r}")
        if not isinstance(message.get("content"), str):
            raise RequestError(f"messages[{i}].content must be a string")
    if not isinstance(body.get("model"), str):
        raise RequestError("'model' must be a string naming the served model")
    key = "max_tokens" if body.get("max_tokens") is not None else "max_completion_tokens"
    max_tokens = _integer(body, key, 256, 1, 1 << 16)
    temperature = _number(body, "temperature", 1.0, 0.0, 2.0)
    top_p = _number(body, "top_p", 1.0, 0.0, 1.0)
    if top_p == 0.0:
        raise RequestError("'top_p' must be > 0")
    logprobs = body.get("logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise RequestError(f"'logprobs' must be true or false, got {logprobs!r}")
    top = _integer(body, "top_logprobs", 0, 0, MAX_TOP_LOGPROBS) if logprobs else 0
    seed = body.get("seed")
    if seed is not None and (isinstance(seed, bool) or not isinstance(seed, int)):
        raise RequestError(f"'seed' must be an integer, got {seed!r}")
    clean = [{"role": m["role"], "content": m["content"]} for m in messages]
    return clean, (max_tokens, temperature, top_p, top), seed


def completion_body(result: Completion, model_name: str, with_logprobs: bool) -> dict[str, Any]:
    """A chat.completion object as the OpenAI API returns it."""
    logprobs = None
    if with_logprobs and result.logprobs is not None:
        logprobs = {
            "content": [
                {
                    "token": t.token,
                    "logprob": t.logprob,
                    "bytes": list(t.token.encode()),
                    "top_logprobs": [{"token": a, "logprob": v, "bytes": list(a.encode())} for a, v in t.top],
                }
                for t in result.logprobs
            ]
        }
    return {
        "id": f"chatcmpl-{uuid.uuid4().hex[:12]}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model_name,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": result.text},
                "finish_reason": result.finish_reason,
                "logprobs": logprobs,
            }
        ],
        "usage": {
            "prompt_tokens": result.prompt_tokens,
            "completion_tokens": result.completion_tokens,
            "total_tokens": result.prompt_tokens + result.completion_tokens,
        },
    }


def parse_completion_request(body: Any, max_logprobs: int) -> tuple[str, list[int] | str, int]:
    """``(api, prompt, k)`` of a prompt-scoring ``/v1/completions`` request in one of the wire forms
    (:mod:`kd_lightning.teachers.wire`), or :class:`RequestError`."""
    if not isinstance(body, Mapping):
        raise RequestError("the body must be a JSON object")
    form = next((f for f in WIRE_FORMS.values() if f.accepts(body)), None)
    if form is None:
        raise RequestError(
            "this server scores prompts only: send prompt_logprobs (vLLM) or echo with logprobs"
        )
    prompt, k = form.parse(body)
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise RequestError("the number of log-probs must be a non-negative integer")
    if k > max_logprobs:
        raise RequestError(
            f"requested {k} log-probs per position, more than this server's max_logprobs={max_logprobs}"
        )
    return form.name, prompt, k


def completion_reply(
    api: str, prompt: list[int] | str, k: int, server: Any, fault: str | None
) -> dict[str, Any]:
    """The ``/v1/completions`` answer to a scoring request: ``server`` gives the tokenizer
    (``server.generator.tokenizer``), ``score(ids)`` and ``token_text(id)``. ``fault == "short"`` drops the
    last position (a reply with one position fewer than the prompt has tokens, for tests)."""
    tokenizer = server.generator.tokenizer
    form = WIRE_FORMS[api]
    ids, offsets = form.prompt_ids(prompt, tokenizer)
    if max(ids) >= len(tokenizer) or len(ids) > server.generator.max_prompt_tokens:
        raise RequestError("the prompt has ids outside the vocabulary, or more tokens than the server takes")
    log_probs = server.score(ids)
    choice = form.answer(prompt, ids, offsets, log_probs, k, server.token_text, short=fault == "short")
    choice["finish_reason"] = "length"
    return {
        "id": "cmpl-loopback",
        "object": "text_completion",
        "model": server.model_name,
        "choices": [choice],
        "usage": {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)},
    }
