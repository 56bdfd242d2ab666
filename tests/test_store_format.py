"""Store formats: fewer bytes per target position, the same rows for every reader, old stores still load."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from kd_lightning.data.soft_labels import (
    SoftLabelStore,
    SparseRows,
    StoreCorruptError,
    StoreMismatchError,
    write_store,
)
from kd_lightning.data.store_checks import folder_checksums
from kd_lightning.data.store_format import LOG8_MIN, StoreFormat, StoreWrite, decode_log8, encode_log8
from kd_lightning.losses.divergences import sparse_target_kl
from kd_lightning.losses.sparsify import sampled_rows, topk_rows

VOCAB = 50_000
LOG8 = {"probabilities": "log8", "floor": 0.0, "ragged": False}
FLOOR = {"probabilities": "log8", "floor": 1e-3, "ragged": True}
COMPACT = {"probabilities": "counts", "floor": 1e-3, "ragged": True}


def topk(n: int, k: int = 32, seed: int = 0) -> SparseRows:
    """Top-k rows of peaked (Zipf-like) distributions, as the estimators write them."""
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 500, generator=g) * 5.0
    ids, probs, tail = topk_rows(logits, k)
    return SparseRows(ids.numpy().astype(np.uint16), probs.numpy().astype(np.float16), tail.numpy())


def sampled(n: int, draws: int, seed: int = 0) -> SparseRows:
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(n, 500, generator=g) * 3.0
    ids, probs, tail = sampled_rows(logits, draws, generator=g)
    return SparseRows(ids.numpy().astype(np.uint16), probs.numpy().astype(np.float16), tail.numpy())


def written(tmp_path, rows: SparseRows, fmt: dict | None, draws: int | None = None, name: str = "s"):
    offsets = np.array([0, len(rows.ids) // 3, len(rows.ids)])
    write = StoreWrite(StoreFormat(**(fmt or {})), draws)
    write_store(tmp_path / name, rows, offsets, {"corpus": "c"} | write.key(), vocab_size=VOCAB, write=write)
    return SoftLabelStore(tmp_path / name, expect={"corpus": "c"}, vocab_size=VOCAB)


def floored(rows: SparseRows, floor: float) -> SparseRows:
    """What a floor means: entries under it join the tail (the reference the quantised rows are held to)."""
    if not floor:
        return rows
    probs = rows.probs.astype(np.float32)
    under = probs < floor
    tail = rows.tail + np.where(under, probs, 0.0).sum(1)
    return SparseRows(np.where(under, 0, rows.ids), np.where(under, 0.0, probs).astype(np.float16), tail)


def dense(rows: SparseRows) -> np.ndarray:
    return rows.to_dense(VOCAB).numpy().astype(np.float64)


def kl(p: np.ndarray, q: np.ndarray) -> float:
    """Mean KL(p ‖ q) over rows."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * (np.log(p) - np.log(np.maximum(q, 1e-30))), 0.0)
    return float(terms.sum(1).mean())


def test_log8_codes_cover_the_range_within_half_a_step():
    p = np.exp(np.linspace(LOG8_MIN, 0.0, 1000)).astype(np.float32)
    back = decode_log8(encode_log8(p))
    half_step = -LOG8_MIN / 254 / 2
    assert np.abs(np.log(back) - np.log(p)).max() <= half_step + 1e-6
    assert encode_log8(np.array([0.0]))[0] == 0 and decode_log8(np.array([0], np.uint8))[0] == 0
    assert encode_log8(np.array([1.0]))[0] == 255 and encode_log8(np.array([1e-12]))[0] == 1


def test_format_1_is_written_as_before_and_still_loads(tmp_path):
    rows = topk(30)
    store = written(tmp_path, rows, None)
    meta = json.loads((store.folder / "meta.json").read_text())
    assert meta["format_version"] == 1 and "encoding" not in meta
    assert sorted(p.name for p in store.folder.iterdir()) == [
        "ids.npy",
        "meta.json",
        "offsets.npy",
        "probs.npy",
        "tail.npy",
    ]
    np.testing.assert_array_equal(store.rows(1).probs, rows.probs[10:])
    assert StoreWrite().key() == {} and StoreFormat().settings() == {}


def test_the_format_is_a_parameter_of_writing_and_a_key_that_misnames_it_is_refused(tmp_path):
    """The writer is handed the format (StoreWrite); the provenance only records it. A provenance whose
    recorded format disagrees with what is written would let a cache key misname the bytes: refused."""
    rows = topk(30)
    offsets = np.array([0, 10, 30])
    log8 = StoreWrite(StoreFormat(**LOG8))
    store = write_store(tmp_path / "a", rows, offsets, {"corpus": "c"} | log8.key(), write=log8)
    assert store.encoding["probabilities"] == "log8"
    assert store.provenance["format"]["probabilities"] == "log8"
    with pytest.raises(ValueError, match=r"records format .* but the rows are written as format 1"):
        write_store(tmp_path / "b", rows, offsets, {"corpus": "c"} | log8.key())  # key says log8, no write
    with pytest.raises(ValueError, match="records format None but the rows are written as"):
        write_store(tmp_path / "c", rows, offsets, {"corpus": "c"}, write=log8)
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()


@pytest.mark.parametrize("fmt", [LOG8, FLOOR, COMPACT], ids=["log8", "floor", "compact-on-topk"])
def test_quantised_topk_rows_read_back_as_distributions_close_to_the_written_ones(tmp_path, fmt):
    rows = topk(300)
    store = written(tmp_path, rows, fmt)
    got = store.all_rows()
    assert got.ids.shape == rows.ids.shape and got.probs.dtype == np.float32
    total = got.probs.sum(1, dtype=np.float64) + got.tail
    np.testing.assert_allclose(total, 1.0, atol=1e-5)  # rescaled against the exact tail
    assert (
        kl(dense(floored(rows, fmt["floor"])), dense(got)) < 2e-3
    )  # only quantisation error beyond the floor
    if fmt["floor"]:
        kept = got.probs > 0
        assert (got.probs[kept] >= fmt["floor"] * 0.9).all()  # entries under the floor went to the tail
        dropped = (rows.probs.astype(np.float32) < fmt["floor"]).sum()
        np.testing.assert_allclose(
            got.tail.sum() - rows.tail.sum(),
            rows.probs[rows.probs < fmt["floor"]].astype(np.float64).sum(),
            rtol=1e-3,
        )
        assert dropped > 0 and store.nbytes() < written(tmp_path, rows, LOG8, name="fixed").nbytes()
    if fmt is COMPACT:  # the prior's rows are not draws: counts fall back to log8
        assert store.encoding["probabilities"] == "log8"


@pytest.mark.parametrize("draws", [12, 32])
def test_a_sampled_store_keeps_its_draws_exactly_in_fewer_bytes(tmp_path, draws):
    rows = sampled(90, draws)
    fixed = written(tmp_path, rows, None, name="fixed")
    compact = written(tmp_path, rows, COMPACT, draws=draws, name="compact")
    assert compact.encoding["probabilities"] == "counts" and "tail.npy" not in {
        p.name for p in compact.folder.iterdir()
    }
    got, want = compact.all_rows(), fixed.all_rows()
    positive = want.probs > 0
    np.testing.assert_array_equal(got.ids[got.probs > 0], want.ids[positive])
    counts = np.rint(want.probs.astype(np.float64) * draws)
    np.testing.assert_array_equal(got.probs[got.probs > 0], (counts[positive] / draws).astype(np.float32))
    distinct = positive.sum() / len(rows.ids)
    arrays = compact.nbytes() - (compact.folder / "meta.json").stat().st_size - 5 * 128  # headers
    per_row = (arrays - 8 * (len(compact) + 1) * 2) / len(rows.ids)  # without the two per-sequence offsets
    assert per_row == pytest.approx(
        1 + 3 * distinct, abs=0.01
    )  # an entry count, then uint16 id + uint8 count


def test_every_reader_gets_the_same_k_slots_and_losses_agree(tmp_path):
    """The divergences read a ragged store through the same contract: forward KL to it equals forward KL
    to the format-1 store within the quantisation."""
    rows = topk(40)
    fixed, ragged = written(tmp_path, rows, None, name="a"), written(tmp_path, rows, FLOOR, name="b")
    student = torch.randn(40, 500)
    values = []
    for store in (fixed, ragged):
        r = store.all_rows()
        values.append(
            float(
                sparse_target_kl(
                    student.unsqueeze(0),
                    torch.from_numpy(r.ids.astype(np.int64)).unsqueeze(0),
                    torch.from_numpy(r.probs.astype(np.float32)).unsqueeze(0),
                    torch.from_numpy(r.tail.astype(np.float32)).unsqueeze(0),
                )
            )
        )
    assert values[1] == pytest.approx(values[0], rel=2e-2)


def corrupt(store: SoftLabelStore, name: str, change) -> None:
    """Change an array as a faulty writer would: its checksum is recorded anew, so what refuses the store is
    the validation of its contents (bytes changed after writing are tests/test_store_integrity.py's)."""
    path = store.folder / f"{name}.npy"
    array = np.load(path)
    change(array)
    np.save(path, array)
    meta = json.loads((store.folder / "meta.json").read_text())
    (store.folder / "meta.json").write_text(json.dumps({**meta, "checksums": folder_checksums(store.folder)}))


@pytest.mark.parametrize(
    ("fmt", "draws", "name", "change", "message"),
    [
        (COMPACT, 12, "values", lambda a: a.__setitem__(0, a[0] + 3), "sums to"),
        (FLOOR, None, "ids", lambda a: a.__setitem__(0, VOCAB + 10), "outside the vocabulary"),
        (FLOOR, None, "entries", lambda a: a.__setitem__(0, a[0] + 1), "entries by the row index"),
        (LOG8, None, "tail", lambda a: a.__setitem__(3, np.nan), "non-finite"),
    ],
    ids=["counts-not-summing", "id-out-of-range", "ragged-index", "nan-tail"],
)
def test_validation_covers_the_new_encodings(tmp_path, fmt, draws, name, change, message):
    rows = sampled(30, draws) if draws else topk(30)
    store = written(tmp_path, rows, fmt, draws=draws)
    corrupt(store, name, change)
    with pytest.raises(StoreCorruptError, match=message) as err:
        SoftLabelStore(store.folder, vocab_size=VOCAB)
    assert "\n" not in str(err.value) and "rerun its stage" in str(err.value)


def test_an_unknown_format_version_is_a_one_line_refusal(tmp_path):
    store = written(tmp_path, topk(6), LOG8)
    meta = json.loads((store.folder / "meta.json").read_text())
    (store.folder / "meta.json").write_text(json.dumps({**meta, "format_version": 3}))
    with pytest.raises(
        StoreMismatchError, match=r"format_version 3 is not one this kd_lightning reads \(1, 2\)"
    ):
        SoftLabelStore(store.folder)


def test_bad_format_settings_are_refused_by_name():
    with pytest.raises(ValueError, match=r"store_format\.probabilities must be one of fp16, log8, counts"):
        StoreFormat(probabilities="int4")
    with pytest.raises(ValueError, match=r"add store_format\.ragged=true"):
        StoreFormat(probabilities="log8", floor=1e-3)
    with pytest.raises(ValueError, match=r"floor must be in \[0, 1\)"):
        StoreFormat(floor=1.5, ragged=True)


def test_pipeline_variants_with_their_own_store_format_train_from_their_own_store(kdl_env, tiny_dir):
    """variants.<name>.store_format / teacher_targets (experiment=store_formats): each variant's offline store
    is built in its own format and its student reads that one; a sampled store is drawn per seed."""
    import json

    from tests.helpers.cli import artifacts, kdl

    kdl(
        "pipeline",
        "experiment=tiny",
        "teacher=local",
        f"teacher.path={tiny_dir}",
        "kd_target=offline_teacher",
        "loss=[hard_ce,forward_kl]",
        "trainer.max_steps=2",
        "seeds=[0,1]",
        "+store_format@variants.log8.store_format=log8",
        "+variants.log8.loss=[hard_ce,forward_kl]",
        "+estimator/teacher_targets@variants.sampled.teacher_targets=sampled",
        "+store_format@variants.sampled.store_format=compact",
        "variants.sampled.teacher_targets.k=4",
        "+variants.sampled.loss=[hard_ce,forward_kl]",
        env_dir=kdl_env,
    )
    metas = [json.loads((f / "meta.json").read_text()) for f in artifacts(kdl_env, "teacher_logits")]
    formats = sorted(
        (m["provenance"]["format"]["probabilities"], m["provenance"]["targets"].get("seed")) for m in metas
    )
    assert formats == [("counts", 0), ("counts", 1), ("log8", None)], formats
    assert len(artifacts(kdl_env, "distill")) == 4
