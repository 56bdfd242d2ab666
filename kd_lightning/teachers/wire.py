"""The two wire forms a served teacher scores a prompt in, each one small strategy, both sides of the wire.

* ``vllm``: the prompt as token ids, ``max_tokens: 1, prompt_logprobs: k``; the answer's
  ``choices[0].prompt_logprobs`` is None for the first token, then per token a map from token id to
  ``{logprob, rank, decoded_token}`` (the top k, and the prompt's own token even outside them);
* ``openai_completions``: the prompt as text, ``echo: true, logprobs: k, max_tokens: 0``; the answer's
  ``logprobs`` holds ``tokens``, ``token_logprobs``, ``top_logprobs`` (token text → log-prob) and
  ``text_offset``. Token texts become the student's ids through its tokenizer (:meth:`WireForm.id_map`).

A :class:`WireForm` says what a client sends (a probe and a scoring request), how it reads the answer (per
token a ``{key: logprob}`` map, keys token ids or token texts), how token texts map to ids, and, for the
loopback server, how a request of its form is recognised and answered. This module is the only place that
branches on the form (``tests/test_architecture.py``); everything else asks ``WIRE_FORMS[api]``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from kd_lightning.models.vocabulary import token_text_ids
from kd_lightning.teachers.openai_client import MalformedReply


class RequestError(ValueError):
    """A request the loopback server refuses with 400; the message says what is wrong."""


def first_choice(reply: Any) -> Any:
    choices = getattr(reply, "choices", None)
    if not choices:
        raise MalformedReply("the reply has no choices")
    return choices[0]


def text_of(tokenizer: Any):
    """Token ids → their text as the openai_completions form sends it (special tokens written out). A
    tokenizer without a decoder (WordLevel) would join tokens with spaces: its text is its tokens side by side."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None and backend.decoder is None:
        return lambda ids: "".join(tokenizer.convert_ids_to_tokens(list(ids)))
    return lambda ids: tokenizer.decode(list(ids), skip_special_tokens=False)


class WireForm:
    """One wire form; see the module docstring. Subclasses fill every method."""

    name: str = ""

    # ---- client side
    def scoring_request(self, ids: Sequence[int], text: str, k: int) -> dict[str, Any]:
        """Keyword arguments of ``client.completions.create`` (besides ``model``) scoring one prompt."""
        raise NotImplementedError

    def read_scores(self, reply: Any, k: int) -> list[dict[str, float] | None]:
        """The answer as, per prompt token, ``{key: logprob}`` of its top k (None for the first token)."""
        raise NotImplementedError

    def probe_request(self, ids: Sequence[int], text: str) -> dict[str, Any]:
        """Keyword arguments of the probe that checks the server tokenizes as the student does."""
        raise NotImplementedError

    def read_probe(self, reply: Any, ids: Sequence[int]) -> list[str]:
        """The token texts the probe's answer shows."""
        raise NotImplementedError

    def expected_probe(self, ours: list[str]) -> list[str]:
        """What :meth:`read_probe` shows when the server tokenizes as the student (``ours``: its token texts)."""
        raise NotImplementedError

    def id_map(self, tokenizer: Any) -> Mapping[str, int] | None:
        """Answer key → student id; None when the keys are ids already."""
        raise NotImplementedError

    # ---- server side (the loopback server)
    def accepts(self, body: Mapping[str, Any]) -> bool:
        """Whether a ``/v1/completions`` body asks for this form."""
        raise NotImplementedError

    def parse(self, body: Mapping[str, Any]) -> tuple[list[int] | str, Any]:
        """``(prompt, k)`` of a request of this form (``k`` checked by the caller), or RequestError."""
        raise NotImplementedError

    def prompt_ids(self, prompt: list[int] | str, tokenizer: Any) -> tuple[list[int], list[int]]:
        """The prompt's ids and (for text) each token's character offset."""
        raise NotImplementedError

    def answer(
        self, prompt: list[int] | str, ids: list[int], offsets: list[int], log_probs: Any, k: int, decode: Any,
        short: bool = False,
    ) -> dict[str, Any]:  # fmt: skip
        """The answer's ``choices[0]`` (``log_probs`` (T, V): row t scores token t + 1; ``short`` drops the
        last position, for tests of a reply that does not fit its prompt)."""
        raise NotImplementedError


class VllmPromptLogprobs(WireForm):
    name = "vllm"

    def scoring_request(self, ids: Sequence[int], text: str, k: int) -> dict[str, Any]:
        return {
            "prompt": list(ids),
            "max_tokens": 1,
            "temperature": 0.0,
            "extra_body": {"prompt_logprobs": k},
        }

    def _rows(self, reply: Any) -> list[Any]:
        choice = first_choice(reply)
        extra = getattr(choice, "model_extra", None) or {}
        rows = extra.get("prompt_logprobs", getattr(choice, "prompt_logprobs", None))
        if not isinstance(rows, list):
            raise MalformedReply("the reply has no choices[0].prompt_logprobs (is the server vLLM?)")
        return rows

    def read_scores(self, reply: Any, k: int) -> list[dict[str, float] | None]:
        return [None if row is None else _top_of_vllm_row(row, k) for row in self._rows(reply)]

    def probe_request(self, ids: Sequence[int], text: str) -> dict[str, Any]:
        return self.scoring_request(ids, text, 1)

    def read_probe(self, reply: Any, ids: Sequence[int]) -> list[str]:
        rows = self._rows(reply)
        if len(rows) != len(ids):
            raise MalformedReply("the probe's reply has no prompt_logprobs for every prompt token")
        return [str(rows[t][str(ids[t])]["decoded_token"]) for t in range(1, len(ids))]

    def expected_probe(self, ours: list[str]) -> list[str]:
        return ours[1:]  # the first token has no entry

    def id_map(self, tokenizer: Any) -> Mapping[str, int] | None:
        return None

    def accepts(self, body: Mapping[str, Any]) -> bool:
        return "prompt_logprobs" in body

    def parse(self, body: Mapping[str, Any]) -> tuple[list[int] | str, Any]:
        prompt = body.get("prompt")
        if (
            not isinstance(prompt, list)
            or not prompt
            or not all(isinstance(i, int) and i >= 0 for i in prompt)
        ):
            raise RequestError("prompt must be a non-empty list of token ids with prompt_logprobs")
        return prompt, body["prompt_logprobs"]

    def prompt_ids(self, prompt: list[int] | str, tokenizer: Any) -> tuple[list[int], list[int]]:
        return list(prompt), []

    def answer(
        self, prompt: list[int] | str, ids: list[int], offsets: list[int], log_probs: Any, k: int, decode: Any,
        short: bool = False,
    ) -> dict[str, Any]:  # fmt: skip
        scored = vllm_prompt_logprobs(ids, log_probs, k, decode)
        return {"index": 0, "text": "", "prompt_logprobs": scored[:-1] if short else scored}


class OpenAIEcho(WireForm):
    name = "openai_completions"

    def scoring_request(self, ids: Sequence[int], text: str, k: int) -> dict[str, Any]:
        return {"prompt": text, "max_tokens": 0, "echo": True, "logprobs": k, "temperature": 0.0}

    def read_scores(self, reply: Any, k: int) -> list[dict[str, float] | None]:
        top = getattr(getattr(first_choice(reply), "logprobs", None), "top_logprobs", None)
        if not isinstance(top, list):
            raise MalformedReply("the reply has no choices[0].logprobs.top_logprobs")
        return [None if row is None else {str(t): float(v) for t, v in dict(row).items()} for row in top]

    def probe_request(self, ids: Sequence[int], text: str) -> dict[str, Any]:
        return self.scoring_request(ids, text, 1)

    def read_probe(self, reply: Any, ids: Sequence[int]) -> list[str]:
        tokens = getattr(getattr(first_choice(reply), "logprobs", None), "tokens", None)
        if not isinstance(tokens, list):
            raise MalformedReply("the probe's reply has no logprobs.tokens")
        return [str(t) for t in tokens]

    def expected_probe(self, ours: list[str]) -> list[str]:
        return ours

    def id_map(self, tokenizer: Any) -> Mapping[str, int] | None:
        return token_text_ids(tokenizer)

    def accepts(self, body: Mapping[str, Any]) -> bool:
        return body.get("echo") is True

    def parse(self, body: Mapping[str, Any]) -> tuple[list[int] | str, Any]:
        prompt = body.get("prompt")
        if not isinstance(prompt, str) or not prompt:
            raise RequestError("prompt must be a non-empty string with echo")
        return prompt, body.get("logprobs")

    def prompt_ids(self, prompt: list[int] | str, tokenizer: Any) -> tuple[list[int], list[int]]:
        encoded = tokenizer(prompt, add_special_tokens=False, return_offsets_mapping=True)
        return list(encoded["input_ids"]), [int(a) for a, _ in encoded["offset_mapping"]]

    def answer(
        self, prompt: list[int] | str, ids: list[int], offsets: list[int], log_probs: Any, k: int, decode: Any,
        short: bool = False,
    ) -> dict[str, Any]:  # fmt: skip
        scored = openai_echo_logprobs([decode(i) for i in ids], offsets, ids, log_probs, k, decode)
        if short:
            scored = {name: values[:-1] for name, values in scored.items()}
        return {"index": 0, "text": prompt, "logprobs": scored}


WIRE_FORMS: dict[str, WireForm] = {form.name: form for form in (VllmPromptLogprobs(), OpenAIEcho())}
"""``teacher.api`` → its wire form."""


def wire_form(api: str) -> WireForm:
    """The wire form ``teacher.api`` names, or one line listing them."""
    if api not in WIRE_FORMS:
        raise ValueError(f"teacher.api={api!r} must be one of {', '.join(WIRE_FORMS)}")
    return WIRE_FORMS[api]


def _top_of_vllm_row(row: Mapping[str, Any], k: int) -> dict[str, float]:
    """vLLM's entry for one position → ``{str(id): logprob}`` of its top k (rank ≤ k)."""
    entries = []
    for token, value in row.items():
        if not isinstance(value, Mapping) or "logprob" not in value:
            raise MalformedReply("a prompt_logprobs entry has no logprob")
        entries.append((int(value.get("rank", 0) or 0), str(token), float(value["logprob"])))
    entries.sort(key=lambda e: (e[0] if e[0] > 0 else math.inf, -e[2]))
    return {token: lp for rank, token, lp in entries[:k] if rank <= k or rank == 0}


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
