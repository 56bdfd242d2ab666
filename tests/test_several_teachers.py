"""Several teachers in one run: ``teachers:``, ``kd_target=teacher:<name>|teacher_mixture``, routing."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

from kd_lightning.data.soft_labels import SoftLabelSource, SoftLabelStore, SparseRows, write_store
from kd_lightning.data.store_mixture import MixedStore, mix_rows
from tests.helpers.cli import artifacts, kdl


def rows_of(seed: int, n: int = 12, k: int = 5, vocab: int = 20) -> SparseRows:
    g = torch.Generator().manual_seed(seed)
    probs = torch.softmax(torch.randn(n, vocab, generator=g) * 2.0, -1)
    top, ids = probs.topk(k, -1)
    return SparseRows(
        ids.numpy().astype(np.uint16), top.numpy().astype(np.float32), (1 - top.sum(-1)).numpy()
    )


def test_the_mixture_is_the_hand_computed_weighted_sum_on_every_id():
    a, b = rows_of(0), rows_of(1)
    mixed = mix_rows([a, b], [0.7, 0.3])
    for r in range(len(a.ids)):
        want: dict[int, float] = {}
        for rows, w in ((a, 0.7), (b, 0.3)):
            for i, p in zip(rows.ids[r].tolist(), rows.probs[r].tolist()):
                want[i] = want.get(i, 0.0) + w * p
        got = {int(i): float(p) for i, p in zip(mixed.ids[r], mixed.probs[r]) if p > 0}
        assert got.keys() == want.keys()
        for i in want:
            assert got[i] == pytest.approx(want[i], abs=1e-6)
        assert float(mixed.tail[r]) == pytest.approx(
            0.7 * float(a.tail[r]) + 0.3 * float(b.tail[r]), abs=1e-6
        )
        assert list(mixed.probs[r]) == sorted(mixed.probs[r], reverse=True)  # descending, as stores keep rows
    np.testing.assert_allclose(mixed.probs.sum(1) + mixed.tail, 1.0, atol=1e-5)
    # a teacher of weight 0 contributes nothing; a teacher mixed with itself is itself
    alone = mix_rows([a, b], [1.0, 0.0])
    np.testing.assert_allclose(alone.probs[:, :5], a.probs, atol=1e-7)
    assert (alone.probs[:, 5:] == 0).all()
    same = mix_rows([a, a], [0.5, 0.5])
    np.testing.assert_array_equal(same.ids[:, :5], a.ids)


def store(tmp_path, name: str, rows: SparseRows) -> SoftLabelStore:
    offsets = np.array([0, 4, 9, 12])
    return write_store(tmp_path / name, rows, offsets, {"teacher": name})


def test_routing_reads_each_sequence_from_its_teacher_only(tmp_path):
    a, b = store(tmp_path, "a", rows_of(0)), store(tmp_path, "b", rows_of(1))
    routed = MixedStore({"a": a, "b": b}, {"a": 1.0, "b": 1.0}, routes=["b", "a", "b"])
    for seq, name in enumerate(["b", "a", "b"]):
        want = {"a": a, "b": b}[name].rows(seq)
        got = routed.rows(seq)
        np.testing.assert_array_equal(got.ids, want.ids)
        np.testing.assert_array_equal(got.probs, want.probs)
    mixed = MixedStore({"a": a, "b": b}, {"a": 3.0, "b": 1.0})  # weights are normalised
    np.testing.assert_allclose(mixed.rows(1).probs, mix_rows([a.rows(1), b.rows(1)], [0.75, 0.25]).probs)
    assert routed.key != mixed.key  # a student records which one it read
    assert isinstance(mixed, SoftLabelSource) and isinstance(a, SoftLabelSource) and a.parts == {}
    with pytest.raises(ValueError, match="does not name"):
        MixedStore({"a": a, "b": b}, {"a": 1.0, "b": 1.0}, routes=["a", "c", "a"])
    with pytest.raises(ValueError, match="non-negative with a positive sum"):
        MixedStore({"a": a, "b": b}, {"a": 0.0, "b": 0.0})


def second_teacher(tiny_dir, folder):
    """The tiny teacher with other weights (the same tokenizer): a second, different teacher."""
    shutil.copytree(tiny_dir, folder)
    (weights,) = folder.glob("*.safetensors")
    g = torch.Generator().manual_seed(7)
    tensors = {k: t + 0.5 * torch.randn(t.shape, generator=g) for k, t in load_file(weights).items()}
    save_file(tensors, weights, metadata={"format": "pt"})
    return folder


def test_a_two_teacher_run_trains_with_a_mixture_and_with_routing(kdl_env, tiny_dir):
    other = second_teacher(tiny_dir, kdl_env / "teacher_b")
    corpus = kdl_env / "routed.jsonl"
    lines = (tiny_dir / "corpus.jsonl").read_text().splitlines()
    corpus.write_text(
        "".join(json.dumps({**json.loads(x), "source": "ab"[i % 2]}) + "\n" for i, x in enumerate(lines))
    )
    teachers = [
        f"+teachers.a.path={tiny_dir}",
        "+teachers.a.weight=0.7",
        f"+teachers.b.path={other}",
        "+teachers.b.weight=0.3",
    ]
    common = [
        "experiment=tiny",
        f"data.path={corpus}",
        "estimator.teacher_targets.k=4",
        "trainer.max_steps=2",
    ]
    common += ["loss=[hard_ce,forward_kl]", *teachers]
    kdl("distill", *common, "kd_target=teacher_mixture", env_dir=kdl_env)
    stores = artifacts(kdl_env, "teacher_logits")
    assert len(stores) == 2  # one per teacher, keyed by it
    metas = [json.loads((s / "meta.json").read_text())["provenance"]["teacher"] for s in stores]
    assert metas[0] != metas[1]
    kdl("distill", *common, "kd_target=teacher_mixture", "teacher_routing=source", env_dir=kdl_env)
    kdl("distill", *common, "kd_target=teacher:b", env_dir=kdl_env)
    assert artifacts(kdl_env, "teacher_logits") == stores  # every run reads the same two stores
    results = [json.loads((s / "result.json").read_text()) for s in artifacts(kdl_env, "distill")]
    assert len(results) == 3 and all(np.isfinite(r["nll"]) for r in results)
    records = sorted(json.dumps(r["stores"], sort_keys=True) for r in results)
    assert len(set(records)) == 3, records  # mixture, routed and one teacher: three different stores read
    mixed = [r["teachers"]["teacher_mixture"] for r in results if "teachers" in r]
    assert len(mixed) == 2 and sorted(m["routing"] is None for m in mixed) == [False, True]
    for m in mixed:  # each names both teachers' stores and weights
        assert {n: t["weight"] for n, t in m["teachers"].items()} == {"a": 0.7, "b": 0.3}
        assert {t["store"] for t in m["teachers"].values()} == {s.name for s in stores}

    bad = kdl("distill", *common, "kd_target=teacher:c", env_dir=kdl_env, check=False)
    assert (
        bad.returncode == 1 and "teachers: has no 'c' (it has: a, b)" in bad.stderr.strip().splitlines()[-1]
    )
    bad = kdl(
        "distill", *common, "kd_target=teacher_mixture", "teacher_routing=nope", env_dir=kdl_env, check=False
    )
    assert bad.returncode == 1 and "has no field 'nope'" in bad.stderr.strip().splitlines()[-1]
