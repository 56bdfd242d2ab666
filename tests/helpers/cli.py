"""Running ``kdl`` from a test: in this interpreter (the default), or as a real process.

Most tests are about what a command computes, not about the process it runs in, and starting one costs
seconds of imports (torch, Lightning, transformers, Hydra). :func:`kdl` calls the CLI entry point here, as a
fresh process would see it: Hydra's global state cleared, the working folder, environment, ``sys.argv``,
``sys.path``, logging and torch's thread count restored afterwards, the process-level state a new process
starts without reset, the exit status and both output streams captured. :func:`kdl_process` starts a real
process: for kills and signals, concurrent runs, torchrun, the wheel and the console script.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
import traceback
from dataclasses import dataclass
from pathlib import Path

KDL = [sys.executable, "-m", "kd_lightning.cli.main"]


@dataclass
class Completed:
    """What a finished ``kdl`` left: like :class:`subprocess.CompletedProcess`."""

    args: list[str]
    returncode: int
    stdout: str
    stderr: str


def _fail(args: tuple[str, ...], done: Completed | subprocess.CompletedProcess) -> AssertionError:
    return AssertionError(f"kdl {' '.join(args)} failed:\n{done.stdout[-3000:]}\n{done.stderr[-5000:]}")


def kdl_process(
    *args: str, env_dir: Path, check: bool = True, env: dict[str, str] | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """``python -m kd_lightning.cli.main <args>`` as a real process in ``env_dir``."""
    environment = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    done = subprocess.run(
        [*KDL, *args], cwd=env_dir, env=environment, capture_output=True, text=True, timeout=timeout
    )
    if check and done.returncode != 0:
        raise _fail(args, done)
    return done


def _reset_process_state() -> None:
    """What a new process starts without: Hydra's global state, rebuilds already done, fault counts,
    the remote-code switch, the relaunch command line, one-time warnings."""
    from hydra.core.global_hydra import GlobalHydra

    from kd_lightning import artifacts
    from kd_lightning.cli import main, trainer
    from kd_lightning.models import loading

    GlobalHydra.instance().clear()
    artifacts._REBUILT.clear()
    artifacts._FAULT_COUNTS.clear()
    loading.set_trust_remote_code(False)
    main._RELAUNCH.clear()
    trainer._WARNED.clear()


def kdl(*args: str, env_dir: Path, check: bool = True, env: dict[str, str] | None = None) -> Completed:
    """``kdl <args>`` run in this interpreter, in ``env_dir``, with ``env`` added to the environment."""
    import torch

    from kd_lightning.cli.main import main

    if "KDL_FAULT" in {**os.environ, **(env or {})}:
        raise AssertionError("KDL_FAULT ends the process it fires in: use kdl_process for fault injection")
    saved_env, saved_cwd, saved_argv, saved_path = dict(os.environ), os.getcwd(), sys.argv[:], sys.path[:]
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    loggers = {
        name: (lg.handlers[:], lg.level, lg.propagate, lg.disabled)
        for name, lg in logging.root.manager.loggerDict.items()
        if isinstance(lg, logging.Logger)
    }
    threads = torch.get_num_threads()
    modules = set(sys.modules)
    out, err = io.StringIO(), io.StringIO()
    # handlers made at import time (Lightning's own logger, say) write to the streams of that time: point
    # them at the captured streams for the run, as a process's output would hold their lines
    streams = {id(s): out for s in (sys.stdout, sys.__stdout__)} | {
        id(s): err for s in (sys.stderr, sys.__stderr__)
    }
    moved = []
    for logger in [
        root,
        *(lg for lg in logging.root.manager.loggerDict.values() if isinstance(lg, logging.Logger)),
    ]:
        for handler in logger.handlers:
            fixed = isinstance(getattr(type(handler), "stream", None), property)  # logging.lastResort
            if isinstance(handler, logging.StreamHandler) and not fixed and id(handler.stream) in streams:
                moved.append((handler, handler.stream))
                handler.stream = streams[id(handler.stream)]
    code = 0
    _reset_process_state()
    os.environ.update(env or {})
    os.environ["PYTHONUNBUFFERED"] = "1"
    os.chdir(env_dir)
    try:
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            try:
                main(list(args))
            except SystemExit as exit_:
                code = exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
                if exit_.code not in (None, 0) and not isinstance(exit_.code, int):
                    print(exit_.code, file=sys.stderr)
            except Exception:  # an uncaught error ends a process with status 1 and its traceback
                traceback.print_exc()
                code = 1
    finally:
        _finish_wandb()
        for handler, stream in moved:
            handler.stream = stream
        for name in set(sys.modules) - modules:  # a user's modules in env_dir: the next run imports its own
            file = getattr(sys.modules[name], "__file__", None) or ""
            if file and Path(file).resolve().is_relative_to(Path(env_dir).resolve()):
                del sys.modules[name]
        for handler in root.handlers[:]:
            if handler not in saved_handlers:
                root.removeHandler(handler)
                handler.close()
        for handler in saved_handlers:
            if handler not in root.handlers:
                root.addHandler(handler)
        root.setLevel(saved_level)
        for name, (handlers, level, propagate, disabled) in loggers.items():
            logger = logging.getLogger(name)
            logger.handlers[:] = handlers
            logger.setLevel(level)
            logger.propagate, logger.disabled = propagate, disabled
        os.chdir(saved_cwd)
        os.environ.clear()
        os.environ.update(saved_env)
        sys.argv[:], sys.path[:] = saved_argv, saved_path
        torch.set_num_threads(threads)
        _reset_process_state()
    done = Completed(list(args), code, out.getvalue(), err.getvalue())
    if check and done.returncode != 0:
        raise _fail(args, done)
    return done


def _finish_wandb() -> None:
    wandb = sys.modules.get("wandb")
    if wandb is not None and getattr(wandb, "run", None) is not None:
        wandb.finish()


def artifacts(env_dir: Path, stage: str) -> list[Path]:
    """The artifact folders of one kind under ``env_dir/artifacts``."""
    return sorted(p for p in (env_dir / "artifacts" / stage).glob("*") if p.is_dir())


def build_counts(env_dir: Path) -> dict[str, tuple[int, int]]:
    """``kind/key`` → (builds, training runs) of every artifact under ``env_dir/artifacts``, from the build
    records Workspace.cached keeps: the evidence that a rerun reused what it found."""
    from kd_lightning.artifacts import BUILD_LOG, build_events

    counts = {}
    for log in sorted((env_dir / "artifacts").glob(f"*/*{BUILD_LOG}")):
        artifact = log.with_name(log.name[: -len(BUILD_LOG)])
        key = f"{log.parent.name}/{artifact.name}"
        counts[key] = (len(build_events(artifact, "build")), len(build_events(artifact, "train")))
    return counts
