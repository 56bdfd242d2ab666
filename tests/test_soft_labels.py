"""Soft-label store: round trip, provenance refusal, atomic writes, compact size."""

from __future__ import annotations

import numpy as np
import pytest

from kd_lightning.data import soft_labels as sl
from kd_lightning.data.soft_labels import (
    SoftLabelStore,
    SparseRows,
    StoreMismatchError,
    write_store,
)
from kd_lightning.data.store_shards import ShardedStoreWriter


def rows(n: int, k: int = 4, seed: int = 0) -> SparseRows:
    rng = np.random.default_rng(seed)
    p = rng.dirichlet(np.ones(k + 1), size=n)
    return SparseRows(
        rng.integers(0, 50000, (n, k)).astype(np.uint16),
        p[:, :k].astype(np.float16),
        p[:, k].astype(np.float32),
    )


def test_round_trip(tmp_path):
    data, offsets = rows(10), np.array([0, 3, 10])
    store = write_store(tmp_path / "s", data, offsets, {"corpus": "abc", "estimator": {"n": 5}})
    again = SoftLabelStore(tmp_path / "s", expect={"corpus": "abc", "estimator": {"n": 5}})
    np.testing.assert_array_equal(again.rows(1).ids, data.ids[3:10])
    np.testing.assert_array_equal(again.rows(0).probs, data.probs[:3])
    np.testing.assert_array_equal(again.rows(1).tail, data.tail[3:10])
    assert isinstance(again.ids, np.memmap)
    assert store.top_k == 4 and len(store) == 2


def test_mismatch_is_refused_with_a_one_line_error(tmp_path):
    write_store(tmp_path / "s", rows(3), np.array([0, 3]), {"corpus": "abc", "estimator": {"n": 5}})
    with pytest.raises(StoreMismatchError) as err:
        SoftLabelStore(tmp_path / "s", expect={"corpus": "abc", "estimator": {"n": 3}})
    message = str(err.value)
    assert "\n" not in message and "estimator" in message and "rebuild" in message


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="run its estimation stage"):
        SoftLabelStore(tmp_path / "nope")


def test_failed_write_leaves_nothing(tmp_path, monkeypatch):
    real_save = np.save
    calls = {"n": 0}

    def failing_save(path, array):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError("disk full")
        real_save(path, array)

    monkeypatch.setattr(sl.np, "save", failing_save)
    with pytest.raises(OSError, match="disk full"):
        write_store(tmp_path / "s", rows(3), np.array([0, 3]), {})
    assert list(tmp_path.iterdir()) == []


def test_rows_offsets_mismatch_is_refused(tmp_path):
    with pytest.raises(ValueError, match="offsets"):
        write_store(tmp_path / "s", rows(3), np.array([0, 4]), {})


def test_sharded_writer_resumes_and_discards_foreign_leftovers(tmp_path):
    offsets = np.array([0, 2, 5, 6, 9])
    data = rows(9)
    writer = ShardedStoreWriter(tmp_path / "s", offsets, {"x": 1}, shard_size=2)
    writer.write(0, SparseRows(data.ids[:5], data.probs[:5], data.tail[:5]))
    # a different run's leftovers are thrown away, the same run's are kept
    assert ShardedStoreWriter(tmp_path / "s", offsets, {"x": 1}, shard_size=2).done_count() == 1
    assert ShardedStoreWriter(tmp_path / "s", offsets, {"x": 2}, shard_size=2).done_count() == 0
    writer = ShardedStoreWriter(tmp_path / "s", offsets, {"x": 1}, shard_size=2)
    for shard in writer.pending():
        lo, hi = offsets[shard * 2], offsets[min(shard * 2 + 2, 4)]
        writer.write(shard, SparseRows(data.ids[lo:hi], data.probs[lo:hi], data.tail[lo:hi]))
    store = writer.finish()
    np.testing.assert_array_equal(store.all_rows().ids, data.ids)
    assert not (tmp_path / "s.partial").exists()


def test_store_is_compact_against_dense_fp16(tmp_path):
    vocab, k = 49152, 32
    n = 2000
    rng = np.random.default_rng(0)
    probs = rng.random((n, k + 1))
    probs /= probs.sum(1, keepdims=True)  # rows are distributions: k stored entries + the tail
    data = SparseRows(
        rng.integers(0, vocab, (n, k)).astype(sl.id_dtype_for(vocab)),
        probs[:, :k].astype(np.float16),
        probs[:, k].astype(np.float32),
    )
    store = write_store(tmp_path / "s", data, np.array([0, n]), {})
    assert store.nbytes_per_row() <= vocab * 2 / 300
