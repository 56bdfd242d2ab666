"""Cached artifacts on disk: where they live, one lock per artifact, and forced rebuilds.

Every artifact (a corpus, a store, an aligned proxy, a trained student, an evaluation) lives at
``root/<kind>/<key>``, where the key hashes everything that changes it (settings, inputs, code). Two
processes that want the same artifact at once, say two jobs of a parallel Hydra multirun, serialise on
that artifact's lock: the second waits, then finds the first one's result and reuses it. Locks are
``flock``-based (the ``filelock`` package), so a killed holder releases its lock with its process.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from filelock import FileLock, Timeout

from kd_lightning.atomic import atomic_json
from kd_lightning.distributed import ProcessGroup, process_group
from kd_lightning.environment import env_setting
from kd_lightning.memory import release_freed_memory
from kd_lightning.models.hub import resolve_model_path

log = logging.getLogger(__name__)

T = TypeVar("T")

TRAINING_ARTIFACT_ENV = "KDL_TRAINING_ARTIFACT"
"""Set (to the artifact's path) by a process while it trains that artifact. Lightning's DDP launcher starts
the other training processes by re-running the command with ``LOCAL_RANK`` set; they inherit this, and when
they reach that artifact they join the training instead of waiting for the lock their parent holds."""


def training_replica(path: Path) -> bool:
    """Whether this process is one of Lightning's extra training processes for the artifact at ``path``."""
    return os.environ.get(TRAINING_ARTIFACT_ENV) == str(path) and os.environ.get("LOCAL_RANK", "0") != "0"


@contextmanager
def training_artifact(path: Path) -> Iterator[None]:
    """Mark ``path`` as the artifact this process trains (see :data:`TRAINING_ARTIFACT_ENV`)."""
    previous = os.environ.get(TRAINING_ARTIFACT_ENV)
    os.environ[TRAINING_ARTIFACT_ENV] = str(path)
    try:
        yield
    finally:
        if previous is None:
            os.environ.pop(TRAINING_ARTIFACT_ENV, None)
        else:
            os.environ[TRAINING_ARTIFACT_ENV] = previous


BUILD_LOG = ".builds.jsonl"
"""Suffix of the file beside an artifact that records, one JSON line each, every time it was built and
what its build did (``train`` events with the steps a student took): the evidence that a cached artifact
was reused, built once by concurrent runs, or finished without retraining."""


def build_log(path: Path) -> Path:
    """The build record beside the artifact at ``path`` (``<key>.builds.jsonl``)."""
    return path.with_name(path.name + BUILD_LOG)


def record_build_event(path: Path, event: str, **fields: Any) -> None:
    """Append one event (``build``, ``train`` ...) to the artifact's build record."""
    line = json.dumps({"event": event, "pid": os.getpid(), "at": round(time.time(), 3), **fields})
    path.parent.mkdir(parents=True, exist_ok=True)
    with build_log(path).open("a", encoding="utf-8") as handle:
        handle.write(line + "\n")


def build_events(path: Path, event: str | None = None) -> list[dict[str, Any]]:
    """The recorded events of the artifact at ``path`` (all of them, or those named ``event``)."""
    log_file = build_log(path)
    if not log_file.is_file():
        return []
    events = [json.loads(line) for line in log_file.read_text().splitlines() if line.strip()]
    return [e for e in events if event is None or e["event"] == event]


class DiskFullError(RuntimeError):
    """The artifacts' disk filled up while an artifact was written; the message names the folder, the
    size it needs and the fix. Nothing half-written is left looking complete."""


_SHORT_WRITE = re.compile(r"\d+ requested and \d+ written")


def disk_full(err: BaseException) -> bool:
    """Whether an error is a full disk: ``ENOSPC``/``EDQUOT``, or numpy's short write on one."""
    return (isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)) or bool(
        _SHORT_WRITE.search(str(err))
    )


def size_text(size: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if size >= scale:
            return f"{size / scale:.1f} {unit}"
    return f"{size:.0f} B"


def settings_key(settings: Mapping[str, Any]) -> str:
    """12-hex hash of a JSON-able settings mapping (key order does not matter)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass
class Workspace:
    """Artifacts live under ``root/<kind>/<key>``; :meth:`cached` is the one way an artifact is made.

    Args:
        root: the artifacts folder.
        rebuild: artifact kinds to build afresh even when cached, once per process (the CLI checks the names
            against :data:`kd_lightning.stages.registry.KINDS`).
    """

    root: Path
    rebuild: frozenset[str] = field(default_factory=frozenset)

    def __post_init__(self) -> None:
        self.root = Path(self.root)
        self.rebuild = frozenset(self.rebuild)

    def path(self, kind: str, key: str) -> Path:
        return self.root / kind / key

    def cached(
        self,
        kind: str,
        provenance: Mapping[str, Any],
        build: Callable[[Path], T],
        load: Callable[[Path], T],
        *,
        done: str | None = "meta.json",
        suffix: str = "",
        siblings: tuple[str, ...] = (),
        collective: bool = False,
        size_hint: Callable[[], float] | None = None,
    ) -> T:
        """The artifact of ``kind`` for ``provenance``: loaded when complete, else built, under its lock.

        The key hashes ``provenance`` (settings, inputs, code). ``done`` names the file whose presence
        marks the artifact complete (None: the artifact is the file ``<key><suffix>`` itself); ``build``
        must write it last, atomically, so a killed build leaves no complete-looking artifact. ``siblings``
        are suffixes of resume state beside it (``.partial``, ``.stats.json``), discarded with it on
        ``rebuild``.

        ``collective``: under ``torchrun`` (:mod:`kd_lightning.distributed`) every rank calls ``build``
        together (a sharded store); rank 0 holds the lock and tells the others whether to load or build.

        Each build is recorded in the artifact's build log (:func:`record_build_event`). A disk that fills
        up during the build stops it with one :class:`DiskFullError` line naming the folder and
        ``size_hint()`` (the plan's estimate of the artifact's bytes, where one exists).
        """
        path = self.path(kind, settings_key(provenance) + suffix)
        marker = path / done if done else path
        if training_replica(path):  # Lightning's extra DDP process: join the parent's training, no lock
            return build(path)
        group = process_group() if collective else ProcessGroup()
        if group.active and not group.is_main:  # rank 0 holds the lock and decides for the group
            return load(path) if group.main_decides(False) else self._build(kind, path, build, size_hint)
        with artifact_lock(path):
            extra = tuple(path.with_name(path.name + s) for s in siblings)
            discard_for_rebuild(kind, self.rebuild, path, *extra)
            complete = group.main_decides(marker.exists())
            return load(path) if complete else self._build(kind, path, build, size_hint)

    def _build(
        self, kind: str, path: Path, build: Callable[[Path], T], size_hint: Callable[[], float] | None
    ) -> T:
        record_build_event(path, "build", kind=kind)
        started = time.perf_counter()
        try:
            return build(path)
        except OSError as err:
            if not disk_full(err):
                raise
            needs = ""
            if size_hint is not None:
                with contextlib.suppress(Exception):
                    needs = f" (this {kind} artifact needs about {size_text(size_hint())})"
            free = ""
            with contextlib.suppress(OSError):
                free = f"; {size_text(shutil.disk_usage(self.root).free)} free now"
            raise DiskFullError(
                f"the disk holding the artifacts folder {self.root} is full: writing {kind} {path} "
                f"failed{needs}{free}; free space there or point KDL_ARTIFACTS at a folder on a disk with "
                "room, then rerun the same command (finished artifacts and shards are kept)"
            ) from None
        finally:
            if time.perf_counter() - started > RELEASE_AFTER_SECONDS:
                release_freed_memory()  # what the build held (a model, its optimizer) goes back to the system


RELEASE_AFTER_SECONDS = 2.0
"""A build that ran longer than this may have held large tensors: its freed heap is handed back after it
(:func:`~kd_lightning.memory.release_freed_memory`); quicker builds (a result file) skip the collection."""

_LOCKS: dict[str, FileLock] = {}  # one instance per path, so a process can re-enter its own lock


@contextmanager
def artifact_lock(path: Path) -> Iterator[None]:
    """Hold ``<path>.lock`` while checking for and building the artifact at ``path``.

    A second process asking for the same artifact logs which process is building it and waits; when it
    gets the lock the artifact is usually there, and it is reused.
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    lock_path = f"{path}.lock"
    lock = _LOCKS.setdefault(lock_path, FileLock(lock_path))
    owner = Path(f"{path}.lock.owner")
    try:
        lock.acquire(timeout=0)
    except Timeout:
        holder = (owner.read_text().strip() if owner.is_file() else "") or "another process"
        log.warning("%s is being built by %s; waiting for it to finish", path, holder)
        lock.acquire()
    try:
        if lock.lock_counter == 1:
            owner.write_text(f"process {os.getpid()} on {os.uname().nodename}\n")
        yield
    finally:
        lock.release()


_REBUILT: set[str] = set()  # artifacts already rebuilt in this process (a multirun rebuilds each once)


def discard_for_rebuild(kind: str, rebuild: Collection[str], *paths: Path) -> None:
    """Remove a cached artifact (and its resume state) when ``kind`` is in ``rebuild``, once per process.

    The folder is first renamed to a hidden sibling, so a reader never sees half of it, then deleted.
    """
    if kind not in rebuild or str(paths[0]) in _REBUILT:
        return
    _REBUILT.add(str(paths[0]))
    for path in paths:
        if not path.exists():
            continue
        trash = path.with_name(f".{path.name}.rebuild-{os.getpid()}")
        os.replace(path, trash)
        if trash.is_dir():
            shutil.rmtree(trash, ignore_errors=True)
        else:
            trash.unlink(missing_ok=True)
    log.info("rebuild=%s: discarded the cached %s %s", sorted(rebuild), kind, paths[0])


def remove_leftovers(folder: Path, pattern: str) -> None:
    """Delete hidden temp siblings that a killed writer left (``.student.*``, ``.model.*``)."""
    for item in folder.glob(pattern):
        if item.is_dir():
            shutil.rmtree(item, ignore_errors=True)
        else:
            item.unlink(missing_ok=True)


def digest_cache_dir() -> Path:
    """Where content digests are remembered (``$KDL_ASSETS/digests``, else ``~/.cache/kd_lightning``)."""
    root = env_setting("KDL_ASSETS") or Path.home() / ".cache" / "kd_lightning"
    return Path(root).expanduser() / "digests"


def content_digest(path: str | os.PathLike) -> str:
    """sha256 (16 hex) of a file's contents, computed once per (path, size, mtime) and remembered.

    Model weights can be replaced in place with files of the same size; a cache key built from sizes
    would then reuse stores built from the old weights. Hashing a 500 MB file takes about a second, so the
    digest is kept beside the assets and recomputed only when the file's size or mtime changes.
    """
    path = Path(path).resolve()
    stat = path.stat()
    stamp = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    memo = digest_cache_dir() / (hashlib.sha256(str(path).encode()).hexdigest()[:24] + ".json")
    try:
        known = json.loads(memo.read_text())
        if known.get("path") == str(path) and known.get("stamp") == stamp:
            return str(known["digest"])
    except (OSError, ValueError, KeyError):
        pass
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    value = digest.hexdigest()[:16]
    with contextlib.suppress(OSError):  # a read-only cache folder only costs a re-hash next time
        atomic_json(memo, {"path": str(path), "stamp": stamp, "digest": value})
    return value


def file_digest(path: str | os.PathLike) -> str:
    """Content digest of a file, or of every file in a folder (names and contents)."""
    path = Path(path)
    if path.is_dir():
        digest = hashlib.sha256()
        for item in sorted(path.rglob("*")):
            if item.is_file():
                digest.update(str(item.relative_to(path)).encode())
                digest.update(content_digest(item).encode())
        return digest.hexdigest()[:16]
    return content_digest(path)


def model_identity(path: str) -> dict[str, str]:
    """What identifies a model slot for caching: its resolved folder and a digest of its weights' contents
    (remembered per file size and mtime, so only a changed file is hashed again)."""
    folder = resolve_model_path(path)
    weights = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("*.bin"))
    return {
        "path": str(folder),
        "weights": _short_hash({w.name: content_digest(w) for w in weights})
        + content_digest(folder / "config.json"),
    }


def _short_hash(settings: dict) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:12]


_FAULT_COUNTS: dict[str, int] = {}


def fault_point(name: str) -> None:
    """Fault-injection hook: with ``KDL_FAULT=<name>[@n]`` the process dies here, as under ``kill -9``.

    Placed between the steps of every artifact write (before a rename, between a saved student and its
    result, after a shard). ``tests/test_reliability.py`` kills each stage at each point and checks that
    the rerun completes with the same artifact as a clean run. ``KDL_HOLD=<name>=<file>`` instead pauses
    here until ``<file>`` exists (a test's deterministic race: another process meets the held lock). Without
    either variable it does nothing.
    """
    hold = os.environ.get("KDL_HOLD")
    if hold and hold.partition("=")[0] == name:  # KDL_HOLD=<name>=<file>: wait here until <file> exists
        release = Path(hold.partition("=")[2])
        Path(f"{release}.held").touch()  # tells the test this process has reached the point
        while not release.exists():
            time.sleep(0.05)
    spec = os.environ.get("KDL_FAULT")
    if not spec:
        return
    target, _, nth = spec.partition("@")
    if target != name:
        return
    _FAULT_COUNTS[name] = _FAULT_COUNTS.get(name, 0) + 1
    if _FAULT_COUNTS[name] >= int(nth or 1):
        logging.shutdown()
        os._exit(137)
