"""Values that cannot be used are one line naming the setting and the fix (issue: messages of a new user)."""

from __future__ import annotations

import pytest

from tests.helpers.cli import kdl


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["distill", "experiment=tiny", "+teachers.a.path=x", "+teachers.a.weight=abc", "kd_target=teacher_mixture",
             "loss=[hard_ce,forward_kl]"],
            "teachers.a.weight='abc' is not a number",
        ),
        (["plan", "data.path=/tmp/mine.jsonl"], "data.path=/tmp/mine.jsonl is not read by data=alpaca_gpt35"),
        (["plan", "experiment=tiny", "data.heldout_size=abc"], "data.heldout_size='abc' is not a whole number"),
        (["plan", "experiment=tiny", "data.validation_size=-3"], "data.validation_size must be >= 0"),
    ],
    ids=["teacher-weight", "path-without-jsonl", "heldout-size", "validation-size"],
)  # fmt: skip
def test_a_value_that_cannot_be_used_is_one_line_naming_it(kdl_env, args, message):
    done = kdl(*args, env_dir=kdl_env, check=False)
    assert done.returncode != 0 and "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert message in line, line
    if "data.path" in message:
        assert "add data=jsonl" in line


@pytest.mark.parametrize(
    ("module", "args", "extra"),
    [
        ("peft", ["align", "experiment=tiny", "alignment=lora"], "kd_lightning[lora]"),
        (  # data.path: a small folder of the test's own (the corpus key hashes the folder first)
            "datasets",
            ["plan", "experiment=tiny", "data=hf_dataset", "data.path=mine"],
            "kd_lightning[datasets]",
        ),
    ],
    ids=["peft", "datasets"],
)
def test_a_missing_optional_dependency_is_one_line_naming_the_extra(
    kdl_env, monkeypatch, module, args, extra
):
    import sys

    monkeypatch.setitem(sys.modules, module, None)  # `import peft` now fails as if it were not installed
    (kdl_env / "mine").mkdir()
    (kdl_env / "mine" / "train.jsonl").write_text('{"instruction": "a", "response": "b"}\n')
    done = kdl(*args, env_dir=kdl_env, check=False)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    line = done.stderr.strip().splitlines()[-1]
    assert extra in line, line


def test_the_tiny_experiment_evaluates_on_enough_held_out_tokens(kdl_env):
    import json

    kdl("distill", "experiment=tiny", "loss=[hard_ce]", "trainer.max_steps=1", env_dir=kdl_env)
    (result,) = [json.loads(p.read_text()) for p in (kdl_env / "artifacts" / "distill").glob("*/result.json")]
    assert result["tokens"] >= 100  # no held-out record repeats a training prompt, so none is dropped
