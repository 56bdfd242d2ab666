"""The one atomic file writer: a hidden temp sibling, fsync'd, then renamed over the target.

A reader (or a rerun after a kill at any point) sees the old file, or the whole new one, never a cut
one; the temp file is removed on any error; the new file gets the mode ``open()`` would give it under the
current umask (``mkstemp`` alone makes owner-only files).
"""

from __future__ import annotations

import csv
import io
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any


def default_file_mode() -> int:
    """The mode ``open()`` would give a new file under the current umask."""
    return 0o666 & ~_umask()


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.chmod(tmp, default_file_mode())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    """Write UTF-8 ``text`` to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_json(path: str | os.PathLike, payload: Any) -> None:
    """Write ``payload`` as indented, key-sorted JSON atomically (non-JSON values as ``str``)."""
    atomic_write_text(path, json.dumps(payload, indent=1, sort_keys=True, default=str))


def atomic_csv(path: str | os.PathLike, rows: list[dict[str, Any]]) -> None:
    """Rows as CSV, one per line, with every column any row has, written atomically."""
    columns = list(dict.fromkeys(key for row in rows for key in row))
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns)
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(path, buffer.getvalue())


@contextmanager
def atomic_folder(
    final: str | os.PathLike, before_rename: Callable[[], None] | None = None, keep_existing: bool = False
) -> Iterator[Path]:
    """Build a folder in a hidden temp sibling that replaces ``final`` in one rename when the block ends.

    A reader sees the old folder or the whole new one, never half of it. The temp folder is removed if the
    block raises; one left by a killed writer (``.<name>.tmp-*``) is removed on the next write.
    ``before_rename`` runs just before the rename (a fault-injection point). With ``keep_existing``, a
    folder that another process completed first is kept and the new one discarded.
    """
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    for leftover in final.parent.glob(f".{final.name}.tmp-*"):
        shutil.rmtree(leftover, ignore_errors=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # as mkdir would make it (mkdtemp makes 0o700)
        yield tmp
        if before_rename is not None:
            before_rename()
        if final.exists() and not keep_existing:
            shutil.rmtree(final)
        try:
            os.replace(tmp, final)
        except OSError:
            if not (keep_existing and final.exists()):  # another process completed it first: keep theirs
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask
