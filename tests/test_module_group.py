"""The ``module`` config group: a user's subclass by ``_target_``, presets, and clear errors for modules
that cannot be built with the uniform call."""

from __future__ import annotations

import json
import sys
import textwrap

import pytest

from tests.helpers.cli import kdl

USER_MODULES = '''
from kd_lightning.modules.distill import DistillModule


class LoggedDistill(DistillModule):
    """A user's subclass with a setting of its own (passed as module.note=...)."""

    def __init__(self, *args, note: str = "", **settings):
        super().__init__(*args, **settings)
        self.note = note

    def extra_terms(self, student_logits, batch):
        return {"zero": (0.0, student_logits.sum() * 0.0)} if student_logits is not None else {}


class NarrowInit(DistillModule):
    """Written for an older, narrower call: no teacher or tokenizer keywords."""

    def __init__(self, student, loss_terms, optimizer, scheduler=None, loss_chunk_size=None):
        super().__init__(student, loss_terms, optimizer, scheduler, loss_chunk_size)


class NotAModule:
    def __init__(self, **kwargs):
        pass
'''


@pytest.fixture()
def user_package(kdl_env):
    package = kdl_env / "user_mods"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "mods.py").write_text(textwrap.dedent(USER_MODULES))
    sys.path.insert(0, str(kdl_env))
    yield "user_mods.mods"
    sys.path.remove(str(kdl_env))
    for name in [m for m in sys.modules if m.startswith("user_mods")]:
        del sys.modules[name]


def test_a_users_subclass_trains_by_target_from_the_cli(kdl_env, user_package):
    kdl(
        "distill",
        "experiment=tiny",
        "loss=[hard_ce]",
        f"module._target_={user_package}.LoggedDistill",
        "+module.note=hello",
        env_dir=kdl_env,
    )
    result = json.loads(next((kdl_env / "outputs").rglob("distill_result.json")).read_text())
    assert result["module"] == "LoggedDistill" and result["nll"] > 0
    metrics = next((kdl_env / "outputs").rglob("metrics.csv")).read_text().splitlines()[0]
    assert "train/zero" in metrics  # its extra term was logged beside hard_ce


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("NarrowInit", "cannot be built with the standard keywords"),
        ("NotAModule", "is not a StudentModule subclass"),
    ],
)
def test_a_module_that_cannot_take_the_uniform_call_is_a_one_line_error(kdl_env, user_package, name, message):
    from kd_lightning.cli.build import build_context, student_run
    from kd_lightning.stages.train import run_distill
    from tests.helpers.configs import compose_cfg

    cfg = compose_cfg(
        ["experiment=tiny", "loss=[hard_ce]", f"module._target_={user_package}.{name}"], "distill"
    )
    with pytest.raises(ValueError, match=message):
        run_distill(build_context(cfg), student_run(cfg, "student", ["hard_ce"]))


def test_method_is_rewritten_to_module_with_a_notice(kdl_env):
    done = kdl("distill", "experiment=tiny", "method=minillm", "--cfg", "job", env_dir=kdl_env)
    assert "method= is now module=" in done.stderr
    assert "_target_: kd_lightning.modules.minillm.MiniLLMModule" in done.stdout
