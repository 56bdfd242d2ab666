"""The OpenAI wire protocol as the loopback server speaks it: requests checked, answers built.

Every malformed request becomes a :class:`RequestError` whose message the server returns with a 400.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping
from typing import Any

from kd_lightning.generation.chat import Completion


class RequestError(ValueError):
    """A chat request the server refuses with 400; the message says what is wrong."""


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


PROMPT_SCORING_APIS = ("vllm", "openai_completions")
"""The two wire forms of prompt scoring on ``/v1/completions``: vLLM's ``prompt_logprobs`` on token ids, and
the OpenAI completions API's ``echo`` with ``logprobs`` on text."""


def parse_completion_request(body: Any, max_logprobs: int) -> tuple[str, list[int] | str, int]:
    """``(api, prompt, k)`` of a prompt-scoring ``/v1/completions`` request, or :class:`RequestError`.

    * vLLM: ``{"prompt": [ids], "max_tokens": 1, "prompt_logprobs": k}``;
    * OpenAI completions: ``{"prompt": text, "echo": true, "logprobs": k, "max_tokens": 0}``.
    """
    if not isinstance(body, Mapping):
        raise RequestError("the body must be a JSON object")
    prompt = body.get("prompt")
    if "prompt_logprobs" in body:
        k = body["prompt_logprobs"]
        if (
            not isinstance(prompt, list)
            or not prompt
            or not all(isinstance(i, int) and i >= 0 for i in prompt)
        ):
            raise RequestError("prompt must be a non-empty list of token ids with prompt_logprobs")
        api = "vllm"
    elif body.get("echo") is True:
        k = body.get("logprobs")
        if not isinstance(prompt, str) or not prompt:
            raise RequestError("prompt must be a non-empty string with echo")
        api = "openai_completions"
    else:
        raise RequestError(
            "this server scores prompts only: send prompt_logprobs (vLLM) or echo with logprobs"
        )
    if not isinstance(k, int) or isinstance(k, bool) or k < 0:
        raise RequestError("the number of log-probs must be a non-negative integer")
    if k > max_logprobs:
        raise RequestError(
            f"requested {k} log-probs per position, more than this server's max_logprobs={max_logprobs}"
        )
    return api, prompt, k


def vllm_prompt_logprobs(
    ids: list[int], log_probs: list[list[float]] | Any, k: int, decode: Any
) -> list[dict[str, dict[str, Any]] | None]:
    """vLLM's ``prompt_logprobs``: None for the first token, then per token a map from token id (a string)
    to ``{logprob, rank, decoded_token}`` holding the top k and the prompt's own token.

    ``log_probs`` (T, V) tensor: row t is the distribution of token t + 1 given the tokens up to t."""
    found: list[dict[str, dict[str, Any]] | None] = [None]
    values, top = log_probs.topk(k, dim=-1) if k else (None, None)
    for t in range(1, len(ids)):
        row: dict[str, dict[str, Any]] = {}
        if k:
            for rank, (i, lp) in enumerate(zip(top[t - 1].tolist(), values[t - 1].tolist()), start=1):
                row[str(i)] = {"logprob": lp, "rank": rank, "decoded_token": decode(i)}
        own = ids[t]
        if str(own) not in row:
            lp = float(log_probs[t - 1, own])
            rank = int((log_probs[t - 1] > lp).sum()) + 1
            row[str(own)] = {"logprob": lp, "rank": rank, "decoded_token": decode(own)}
        found.append(row)
    return found


def openai_echo_logprobs(
    tokens: list[str], offsets: list[int], ids: list[int], log_probs: Any, k: int, decode: Any
) -> dict[str, Any]:
    """The OpenAI completions API's ``logprobs`` of an echoed prompt: per token its text, its log-prob,
    the top k alternatives by text, and its character offset (the first token has no log-prob)."""
    token_logprobs: list[float | None] = [None]
    top_logprobs: list[dict[str, float] | None] = [None]
    values, top = log_probs.topk(k, dim=-1) if k else (None, None)
    for t in range(1, len(ids)):
        token_logprobs.append(float(log_probs[t - 1, ids[t]]))
        alternatives: dict[str, float] = {}
        if k:
            for i, lp in zip(top[t - 1].tolist(), values[t - 1].tolist()):
                alternatives.setdefault(decode(i), lp)
        top_logprobs.append(alternatives)
    return {
        "tokens": tokens,
        "token_logprobs": token_logprobs,
        "top_logprobs": top_logprobs,
        "text_offset": offsets,
    }


def completion_reply(
    api: str, prompt: list[int] | str, k: int, server: Any, fault: str | None
) -> dict[str, Any]:
    """The ``/v1/completions`` answer to a scoring request: ``server`` gives the tokenizer
    (``server.generator.tokenizer``), ``score(ids)`` and ``token_text(id)``. ``fault == "short"`` drops the
    last position (a reply with one position fewer than the prompt has tokens, for tests)."""
    tokenizer = server.generator.tokenizer
    if api == "vllm":
        ids, offsets = list(prompt), []
    else:
        encoded = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        ids, offsets = list(encoded["input_ids"]), [int(a) for a, _ in encoded["offset_mapping"]]
    if max(ids) >= len(tokenizer) or len(ids) > server.generator.max_prompt_tokens:
        raise RequestError("the prompt has ids outside the vocabulary, or more tokens than the server takes")
    log_probs = server.score(ids)
    decode = server.token_text
    if api == "vllm":
        scored = vllm_prompt_logprobs(ids, log_probs, k, decode)
        choice: dict[str, Any] = {
            "index": 0,
            "text": "",
            "prompt_logprobs": scored[:-1] if fault == "short" else scored,
        }
    else:
        scored = openai_echo_logprobs([decode(i) for i in ids], offsets, ids, log_probs, k, decode)
        if fault == "short":
            scored = {name: values[:-1] for name, values in scored.items()}
        choice = {"index": 0, "text": prompt, "logprobs": scored}
    choice["finish_reason"] = "length"
    return {
        "id": "cmpl-loopback",
        "object": "text_completion",
        "model": server.model_name,
        "choices": [choice],
        "usage": {"prompt_tokens": len(ids), "completion_tokens": 0, "total_tokens": len(ids)},
    }
