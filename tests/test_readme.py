"""Every shell block of README.md runs in a test, or says why not: a documented command cannot rot unnoticed.

Before each fenced ``bash`` block the README carries one of:

* nothing: this test runs every ``kdl`` line of the block at a tiny size, in this interpreter (the
  experiment becomes ``experiment=tiny``, the shipped models the tiny ones, a sweep its first job, long
  step counts two steps). A line that cannot run here ends its comment with ``(not run: <reason>)``.
* ``<!-- run: tests/<file>.py::<test> -->``: that test runs the block's commands (it must exist);
* ``<!-- not run: <reason> -->`` with a one-word reason from :data:`REASONS`.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from tests.helpers.cli import kdl

ROOT = Path(__file__).resolve().parents[1]
REASONS = {"gpu", "hours", "minutes", "network", "placeholder"}
BLOCK = re.compile(
    r"(?:<!--\s*(?P<marker>(?:not run|run):[^>]*?)\s*-->\s*\n)?```(?:bash|sh|shell)\n(?P<body>.*?)```", re.S
)
LINE_MARK = re.compile(r"\(not run: (\w+)\)")


def blocks() -> list[tuple[int, str | None, str]]:
    text = (ROOT / "README.md").read_text()
    return [(text[: m.start()].count("\n") + 1, m["marker"], m["body"]) for m in BLOCK.finditer(text)]


def commands(body: str) -> list[str]:
    """The block's lines, continuation lines joined, without the activation line."""
    joined = body.replace("\\\n", " ")
    return [
        line.strip() for line in joined.splitlines() if line.strip() and not line.strip().startswith(". ")
    ]


def test_every_shell_block_is_run_or_says_why_not():
    found = blocks()
    assert len(found) >= 15
    for line, marker, body in found:
        if marker and marker.startswith("not run:"):
            reason = marker.split(":", 1)[1].strip()
            assert reason in REASONS, (
                f"README.md:{line}: not-run reason {reason!r} is not one of {sorted(REASONS)}"
            )
        elif marker:
            path, _, test = marker.split(":", 1)[1].strip().partition("::")
            source = (ROOT / path).read_text()
            assert re.search(rf"^def {re.escape(test)}\(", source, re.M), (
                f"README.md:{line}: no test {path}::{test}"
            )
        else:
            for command in commands(body):
                words = command.split("#", 1)
                mark = LINE_MARK.search(words[1]) if len(words) > 1 else None
                assert command.startswith("kdl ") or mark, (
                    f"README.md:{line}: `{command[:60]}` is not a kdl command: mark it (not run: <reason>)"
                )
                assert not mark or mark[1] in REASONS, f"README.md:{line}: reason {mark[1]!r}"


SWAPS = {
    "teacher=smollm2": ["teacher=local", "teacher.path=${kdl_tiny:}"],
    "teacher=gemma3_270m": ["teacher=local", "teacher.path=${kdl_tiny:}"],
    "proxy=gemma3_270m": ["proxy=local", "proxy.path=${kdl_tiny:}"],
    "proxy=smollm2_layers": ["proxy=local", "proxy.path=${kdl_tiny:}"],
    "data=smollm2_self_instruct": [],
    "data=alpaca_gpt35": ["data=alpaca_gpt35", "data.path=null"],  # the shipped corpus, not the tiny file
    "sweep=optuna_loss_weights": ["sweep=optuna_loss_weights", "data.validation_size=16"],
}


STAGE_NEEDS = {
    "fidelity": [
        "data=jsonl",
        "teacher=local",
        "teacher.path=${kdl_tiny:}",
        "proxy=local",
        "proxy.path=${kdl_tiny:}",
    ],
}
"""Stages whose config picks a shipped model by default: the tiny one instead."""


def tiny(argv: list[str], tiny_dir: Path) -> list[str]:
    """A README command at the tiny size: the tiny experiment and models, a sweep's first job, two steps."""
    stage, rest = argv[1], argv[2:]
    out = ["experiment=tiny", *STAGE_NEEDS.get(stage, [])]
    sweeping = "-m" in rest or any(a.startswith("sweep=") for a in rest)
    for arg in rest:
        key, _, value = arg.partition("=")
        if arg == "-m" or key == "experiment":
            continue
        if arg in SWAPS:
            out += SWAPS[arg]
        elif key == "recipe":  # a recipe picks the shipped teacher (the tiny one instead) and its own steps
            out += [arg, "teacher=local", "teacher.path=${kdl_tiny:}", "trainer.max_steps=2"]
        elif key.endswith(".path") and value.startswith("<"):
            out.append(f"{key}={tiny_dir}")
        elif key in ("trainer.max_steps", "trainer.val_check_interval"):
            out.append(f"{key}=2")
        elif "," in value and "[" not in value:  # a sweep's values: its first job
            out.append(f"{key}={value.split(',')[0]}")
        else:
            out.append(arg)
    if sweeping:
        out.append("hydra.mode=RUN")
    return [stage, *out]


def runnable() -> list[tuple[str, list[list[str]]]]:
    """Per unmarked block, its kdl commands in order (a block is one session, run in one folder)."""
    found = []
    for line, marker, body in blocks():
        if marker:
            continue
        session = []
        for command in commands(body):
            text, _, comment = command.partition("  #")
            if LINE_MARK.search(comment) or not text.startswith("kdl "):
                continue
            session.append(shlex.split(re.sub(r"=<([^>]*)>", "=<placeholder>", text)))
        if session:
            found.append((f"README.md:{line}", session))
    return found


@pytest.mark.slow
@pytest.mark.parametrize(("where", "session"), runnable(), ids=[w for w, _ in runnable()])
def test_readme_commands_run_at_a_tiny_size(where, session, kdl_env, tiny_dir):
    for argv in session:
        done = kdl(*tiny(argv, tiny_dir), env_dir=kdl_env, check=False)
        assert done.returncode == 0, (
            f"{where} `{' '.join(argv)}`:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
        )
