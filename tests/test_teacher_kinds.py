"""A kind of teacher of your own is one class plus one config node, and the library is not touched.

The toy kind here is a bigram teacher read from a file: for the token at each target position, the top-k
next tokens and their probabilities (a table saved with numpy). It gives rows, as a served teacher does, so
the word-level modules read it through the divergence terms, and the run refuses it where a module needs a
model in process, in the same one line as for a served teacher.
"""

from __future__ import annotations

import itertools
import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from kd_lightning.data.batch import SoftLabels
from kd_lightning.models.loading import load_tokenizer
from kd_lightning.teachers.rows import TeacherRows
from kd_lightning.teachers.source import TeacherSource
from tests.helpers.cli import artifacts, kdl

CALLS: list[int] = []
"""Target positions the toy teacher was asked for, by every run in this process (the test reads it)."""


class BigramRows(TeacherRows):
    def __init__(self, ids: np.ndarray, probs: np.ndarray) -> None:
        self.ids, self.probs = torch.from_numpy(ids), torch.from_numpy(probs)

    def rows(self, input_ids, attention_mask, mask, position_ids=None) -> SoftLabels:
        current = input_ids[mask.bool()].cpu()  # the token at each target position, in mask's order
        CALLS.append(int(current.numel()))
        probs = self.probs[current]
        return SoftLabels(self.ids[current][None], probs[None], (1.0 - probs.sum(-1))[None]).to(
            input_ids.device
        )


@dataclass(frozen=True)
class BigramFileTeacher(TeacherSource):
    table: str = ""

    @property
    def gives_rows(self) -> bool:
        return True

    def online(self, tokenizer, probe_ids=None) -> BigramRows:
        saved = np.load(self.table)
        return BigramRows(saved["ids"], saved["probs"])


def bigram_table(tiny_dir: Path, path: Path, k: int = 4) -> Path:
    """The corpus's bigram counts as top-k rows over the tiny tokenizer's ids."""
    tok = load_tokenizer(tiny_dir)
    counts = np.ones((len(tok), len(tok)))
    for line in (tiny_dir / "corpus.jsonl").read_text().splitlines():
        record = json.loads(line)
        ids = tok(record["instruction"] + " " + record["response"], add_special_tokens=False)["input_ids"]
        for a, b in itertools.pairwise(ids):
            counts[a, b] += 1
    probs = counts / counts.sum(1, keepdims=True)
    ids = np.argsort(-probs, axis=1)[:, :k]
    np.savez(path, ids=ids.astype(np.int64), probs=np.take_along_axis(probs, ids, 1).astype(np.float32))
    return path


def test_a_teacher_kind_of_ones_own_trains_a_word_level_module_and_is_refused_by_minillm(kdl_env, tiny_dir):
    table = bigram_table(tiny_dir, kdl_env / "bigram.npz")
    teacher = f"++teacher={{_target_:{__name__}.BigramFileTeacher,table:{table}}}"
    CALLS.clear()
    kdl(
        "distill", "experiment=tiny", "module=online_teacher", "loss=[hard_ce,forward_kl]", "kd_target=teacher",
        teacher, "trainer.max_steps=3", env_dir=kdl_env,
    )  # fmt: skip
    assert len(CALLS) >= 3 and all(n > 0 for n in CALLS)  # every step read the toy teacher's rows
    assert len(artifacts(kdl_env, "distill")) == 1  # the trained student, cached
    refused = kdl("distill", "experiment=tiny", "recipe=minillm", teacher, env_dir=kdl_env, check=False)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "MiniLLMModule needs the teacher model in process" in refused.stderr


def test_telling_a_teacher_kind_from_a_model_builder_logs_nothing(caplog, tiny_dir):
    """Every run with a teacher asks whether its ``_target_`` is a TeacherSource subclass; for a function
    (``load_causal_lm``) the answer is no, without an ERROR line in the user's log (as hydra's get_class
    would write)."""
    import logging

    from omegaconf import OmegaConf

    from kd_lightning.cli.build import source_class, teacher_source

    with caplog.at_level(logging.DEBUG):
        assert not source_class("kd_lightning.models.loading.load_causal_lm")
        assert not source_class("no_such_package.Thing") and not source_class("kd_lightning.nothing_here")
        assert source_class("kd_lightning.teachers.source.TeacherSource")
        node = OmegaConf.create(
            {"_target_": "kd_lightning.models.loading.load_causal_lm", "path": str(tiny_dir)}
        )
        source = teacher_source(node)
    assert source is not None and source.path is not None and not source.is_served
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING], caplog.text
