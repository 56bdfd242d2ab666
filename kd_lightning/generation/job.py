"""``kdl generate``: run a generation task against a teacher backend and write the corpus.

Output folder ``corpus_dir``:

* ``corpus.jsonl``: records in the core pipeline's format (``kdl pipeline data=jsonl data.path=...``);
* ``logprobs.jsonl``: the teacher's top-k log-probabilities per record (when requested and returned),
  keyed by record key, for :func:`kd_lightning.generation.logprobs.build_logprob_store`;
* ``generation.json``: the teacher's identity, sampling settings, task settings, counts and usage.

All three are written atomically after the run; a killed run leaves the previous files (if any) intact
and its replies in the cache, so rerunning the same command finishes the job without asking twice.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
from pathlib import Path
from typing import Any

from kd_lightning.atomic import atomic_write_text
from kd_lightning.data.records import write_jsonl
from kd_lightning.generation.backends import SamplingSettings, TeacherBackend
from kd_lightning.generation.runner import ReplyCache
from kd_lightning.generation.tasks import GenerationResult, GenerationTask

log = logging.getLogger(__name__)


def _settings(task: GenerationTask) -> dict[str, Any]:
    def plain(value):
        if dataclasses.is_dataclass(value):
            return {
                f.name: plain(getattr(value, f.name))
                for f in dataclasses.fields(value)
                if f.name not in ("kept", "seen")
            }
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value

    return {"type": type(task).__name__, **plain(task)}


def summary_text(result: GenerationResult, backend: TeacherBackend) -> str:
    stages = ", ".join(f"{k} {v}" for k, v in result.stages.items())
    dropped = (
        ", ".join(f"{k} {v}" for k, v in sorted(result.dropped.items(), key=lambda kv: -kv[1])) or "none"
    )
    return (
        f"kept {len(result.records)} records ({stages})\n"
        f"filtered by reason: {dropped}\n"
        f"{result.usage.summary(backend)}"
    )


def run_generation(
    task: GenerationTask,
    backend: TeacherBackend,
    sampling: SamplingSettings,
    corpus_dir: str | os.PathLike,
    cache_dir: str | os.PathLike,
    progress: bool = True,
) -> dict[str, Any]:
    """Generate, write the corpus folder, print the summary; returns the manifest."""
    corpus_dir = Path(corpus_dir)
    corpus_dir.mkdir(parents=True, exist_ok=True)
    result = task.run(backend, ReplyCache(cache_dir), sampling, progress)
    if not result.records:
        raise RuntimeError(
            "the teacher produced no usable records; see the drop reasons above "
            f"({dict(result.dropped)}) and the teacher's replies in {cache_dir}"
        )
    write_jsonl(result.records, corpus_dir / "corpus.jsonl")
    logprob_path = corpus_dir / "logprobs.jsonl"
    if result.logprobs:
        atomic_write_text(
            logprob_path,
            "".join(
                json.dumps({"key": k, "tokens": v}, ensure_ascii=False) + "\n"
                for k, v in result.logprobs.items()
            ),
        )
    else:  # a stale file from an earlier run with logprobs would no longer match this corpus
        logprob_path.unlink(missing_ok=True)
    manifest = {
        "teacher": backend.identity(),
        "sampling": dataclasses.asdict(sampling),
        "task": _settings(task),
        "records": len(result.records),
        "stages": result.stages,
        "dropped": dict(result.dropped),
        "usage": result.usage.as_dict(backend),
        "logprobs": str(logprob_path) if result.logprobs else None,
        "corpus": str(corpus_dir / "corpus.jsonl"),
    }
    atomic_write_text(
        corpus_dir / "generation.json", json.dumps(manifest, indent=1, ensure_ascii=False, default=str)
    )
    print(f"\n{summary_text(result, backend)}\ncorpus: {corpus_dir / 'corpus.jsonl'}", flush=True)
    return manifest
