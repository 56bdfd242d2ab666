"""A store corrupted in place is refused before anything reads it: for every store format, bytes overwritten
inside any file (its size kept) and a shifted index entry are each one line naming the file, the store and
the fix; an index broken by a writer (checksums that match) is refused by the structural checks; and a
corrupted prior never reaches a training step of ``kdl distill``."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from kd_lightning.data.soft_labels import SoftLabelStore, SparseRows, write_store
from kd_lightning.data.store_checks import StoreCorruptError, folder_checksums
from kd_lightning.data.store_format import StoreFormat, StoreWrite
from tests.helpers.cli import artifacts, kdl

FORMATS = {
    "fp16": StoreFormat(),
    "log8": StoreFormat("log8"),
    "topk_floor": StoreFormat("log8", floor=1e-3, ragged=True),
    "compact": StoreFormat("counts", floor=1e-3, ragged=True),
}
V, K = 300, 8


def rows_and_offsets(sampled: bool) -> tuple[SparseRows, np.ndarray]:
    """Rows of 12 sequences: draws (whole counts of 8 samples, empty tail) for a sampled store, else top-k
    probabilities with a tail."""
    rng = np.random.default_rng(0)
    lengths = rng.integers(3, 9, size=12)
    n = int(lengths.sum())
    ids = np.stack([rng.choice(V, K, replace=False) for _ in range(n)]).astype(np.uint16)
    if sampled:
        counts = rng.multinomial(K, np.full(K, 1.0 / K), size=n)
        probs, tail = (counts / K).astype(np.float16), np.zeros(n, dtype=np.float32)
    else:
        raw = rng.dirichlet(np.full(K + 1, 0.3), size=n)
        probs, tail = (
            raw[:, :K].astype(np.float16),
            (1.0 - raw[:, :K].astype(np.float16).sum(1)).clip(0).astype(np.float32),
        )
    return SparseRows(ids, probs, tail), np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)


def write(folder: Path, name: str) -> SoftLabelStore:
    fmt = FORMATS[name]
    rows, offsets = rows_and_offsets(sampled=name == "compact")
    write = StoreWrite(fmt, K if name == "compact" else None)
    return write_store(folder, rows, offsets, write.key(), vocab_size=V, write=write)


def overwrite_inside(path: Path) -> None:
    """Flip bytes in the middle of a file's data (past the .npy header), its size unchanged."""
    data = bytearray(path.read_bytes())
    start = max(128, len(data) // 2)
    for i in range(start, min(start + 4, len(data))):
        data[i] ^= 0x5A
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("name", list(FORMATS))
def test_bytes_overwritten_in_any_file_are_refused_naming_the_file(name, tmp_path):
    original = write(tmp_path / "store", name)
    files = sorted(p.name for p in original.folder.iterdir() if p.name != "meta.json")
    assert set(json.loads((original.folder / "meta.json").read_text())["checksums"]) == set(files)
    for file in files:
        copy = tmp_path / f"copy-{file}"
        shutil.copytree(original.folder, copy)
        size = (copy / file).stat().st_size
        overwrite_inside(copy / file)
        assert (copy / file).stat().st_size == size
        with pytest.raises(StoreCorruptError, match=rf"{file} does not hold the bytes.*rebuild=\["):
            SoftLabelStore(copy, vocab_size=V)


@pytest.mark.parametrize("name", list(FORMATS))
def test_a_shifted_index_entry_is_refused(name, tmp_path):
    store = write(tmp_path / "store", name)
    index = "entry_offsets" if store.encoding and store.encoding.get("ragged") else "offsets"
    path = store.folder / f"{index}.npy"
    values = np.load(path)
    values[len(values) // 2] += 16
    np.save(path, values)
    with pytest.raises(StoreCorruptError, match=f"{index}.npy"):
        SoftLabelStore(store.folder, vocab_size=V)
    # a writer that broke the index and recorded checksums of the broken files: the structure still says no
    meta = json.loads((store.folder / "meta.json").read_text())
    meta["checksums"] = folder_checksums(store.folder)
    (store.folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(StoreCorruptError, match=r"broken index|does not start at 0|ends at"):
        SoftLabelStore(store.folder, vocab_size=V)


def test_a_corrupted_prior_never_reaches_a_training_step(kdl_env):
    args = ("distill", "experiment=tiny", "loss=[hard_ce,prior_kl]", "trainer.max_steps=2")
    kdl(*args, env_dir=kdl_env)
    (prior,) = artifacts(kdl_env, "prior")
    overwrite_inside(prior / "probs.npy")
    done = kdl(*args, "rebuild=[distill]", env_dir=kdl_env, check=False)
    assert done.returncode != 0
    message = [line for line in done.stderr.splitlines() if "does not hold the bytes" in line]
    assert len(message) == 1 and "probs.npy" in message[0] and "rebuild=[prior]" in message[0]
    assert "Epoch 0" not in done.stderr + done.stdout  # refused before the first step
