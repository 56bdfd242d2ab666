"""Answering many requests: an on-disk reply cache, progress with rate and ETA, and token/cost accounting.

Every reply is written to the cache (one small file per request, written atomically) the moment it
arrives. A rerun, or a run resumed after a kill, asks the teacher only for what is not cached, so it
costs nothing for work already done and cannot produce duplicates: the corpus is assembled from the
cache in request order at the end.
"""

from __future__ import annotations

import json
import logging
import os
from collections import Counter
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from kd_lightning.atomic import atomic_write_text
from kd_lightning.generation.backends import ChatRequest, RequestFailure, TeacherBackend, TeacherReply

log = logging.getLogger(__name__)


class ReplyCache:
    """Replies by request key under ``folder/<k[:2]>/<key>.json``."""

    def __init__(self, folder: str | os.PathLike) -> None:
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.json"

    def get(self, key: str) -> TeacherReply | None:
        path = self._path(key)
        if not path.exists():
            return None
        try:
            return TeacherReply.from_json(json.loads(path.read_text(encoding="utf-8"))["reply"])
        except (json.JSONDecodeError, KeyError, TypeError):
            log.warning("ignoring an unreadable cache entry %s (it will be asked again)", path)
            return None

    def put(self, key: str, request: ChatRequest, reply: TeacherReply) -> None:
        path = self._path(key)
        path.parent.mkdir(exist_ok=True)
        payload = {
            "request": {"messages": request.messages, "sample_index": request.sample_index},
            "reply": asdict(reply),
        }
        atomic_write_text(path, json.dumps(payload, ensure_ascii=False))

    def __len__(self) -> int:
        return sum(1 for _ in self.folder.glob("*/*.json"))


@dataclass
class UsageReport:
    """What a run asked for, what it got, and what it cost (new requests and cached ones apart)."""

    requested: int = 0
    cached: int = 0
    answered: int = 0
    failed: Counter = field(default_factory=Counter)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_prompt_tokens: int = 0
    cached_completion_tokens: int = 0

    def add(self, other: UsageReport) -> None:
        for name in (
            "requested",
            "cached",
            "answered",
            "prompt_tokens",
            "completion_tokens",
            "cached_prompt_tokens",
            "cached_completion_tokens",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.failed.update(other.failed)

    def as_dict(self, backend: TeacherBackend) -> dict:
        cost = backend.cost(self.prompt_tokens, self.completion_tokens)
        cached_cost = backend.cost(self.cached_prompt_tokens, self.cached_completion_tokens)
        return {
            "requested": self.requested,
            "cached": self.cached,
            "answered": self.answered,
            "failed": dict(self.failed),
            "retries": dict(backend.stats.retries),
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "cost_usd": cost,
            "cached_prompt_tokens": self.cached_prompt_tokens,
            "cached_completion_tokens": self.cached_completion_tokens,
            "cost_saved_by_cache_usd": cached_cost,
        }

    def summary(self, backend: TeacherBackend) -> str:
        d = self.as_dict(backend)
        cost = (
            "no price set (teacher.price_per_million_*)" if d["cost_usd"] is None else f"${d['cost_usd']:.4f}"
        )
        lines = [
            f"requests: {d['requested']} ({d['cached']} from cache, {d['answered']} answered now, "
            f"{sum(self.failed.values())} failed{' ' + str(d['failed']) if d['failed'] else ''})",
            f"tokens this run: {d['prompt_tokens']} prompt + {d['completion_tokens']} completion; cost {cost}",
            f"tokens reused from cache: {d['cached_prompt_tokens']} prompt + {d['cached_completion_tokens']} completion",
        ]
        if d["retries"]:
            lines.append(f"retries: {d['retries']}")
        return "\n".join(lines)


def answer_all(
    backend: TeacherBackend,
    requests: Sequence[ChatRequest],
    cache: ReplyCache,
    desc: str = "teacher",
    progress: bool = True,
) -> tuple[list[TeacherReply | None], UsageReport]:
    """Replies in request order (None where a request failed); cached replies are not asked again."""
    identity = backend.identity()
    keys = [r.key(identity) for r in requests]
    replies: list[TeacherReply | None] = [None] * len(requests)
    report = UsageReport(requested=len(requests))
    missing: dict[str, list[int]] = {}
    for index, key in enumerate(keys):
        if key in missing:  # the same request twice in one call: ask once
            missing[key].append(index)
            continue
        cached = cache.get(key)
        if cached is None:
            missing[key] = [index]
            continue
        replies[index] = cached
        report.cached += 1
        report.cached_prompt_tokens += cached.prompt_tokens
        report.cached_completion_tokens += cached.completion_tokens
    todo = [indices[0] for indices in missing.values()]
    if todo:
        bar = tqdm(total=len(todo), desc=desc, unit="req", disable=not progress, dynamic_ncols=True)
        try:
            for position, result in backend.stream([requests[i] for i in todo]):
                index = todo[position]
                if isinstance(result, RequestFailure):
                    report.failed[result.reason] += len(missing[keys[index]])
                    log.warning("request %d failed (%s): %s", index, result.reason, result.detail)
                else:
                    cache.put(keys[index], requests[index], result)
                    for same in missing[keys[index]]:
                        replies[same] = result
                    report.answered += len(missing[keys[index]])
                    report.prompt_tokens += result.prompt_tokens
                    report.completion_tokens += result.completion_tokens
                bar.update(1)
                if report.failed:
                    bar.set_postfix(failed=sum(report.failed.values()))
        finally:
            bar.close()
    return replies, report
