"""``kdl <stage> [hydra overrides] [-m]`` — the Hydra app: config in, one stage function out.

Stages: ``prior``, ``align``, ``posterior``, ``teacher-logits`` (stores and the aligned proxy), ``distill``
(one student), ``pipeline`` (several students and a table), ``evaluate`` (held-out metrics of trained
students or any model), ``fidelity`` (estimates of an open teacher against its true distributions) and
``generate`` (teacher corpora); ``kdl report`` (no Hydra) turns a sweep's folders into a table and plots.
:data:`STAGE_FUNCTIONS` maps each name to a function of the config; the work is done by
:mod:`kd_lightning.stages` over cached artifacts, so ``kdl distill`` after ``kdl posterior`` reuses the
stores, and a multirun over sampling rounds reuses the prior and the aligned proxy.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from hydra.errors import InstantiationException
from hydra.utils import instantiate
from lightning import seed_everything
from omegaconf import DictConfig, OmegaConf

from kd_lightning.artifacts import fault_point
from kd_lightning.atomic import atomic_json, atomic_write_text
from kd_lightning.cli import resolvers  # noqa: F401  (registers the configs' ${kdl_...} resolvers)
from kd_lightning.cli.build import build_context, loss_terms, student_run
from kd_lightning.cli.help import STAGES, answer_without_hydra
from kd_lightning.cli.overrides import (
    check_group_choices,
    check_plugins,
    renamed_groups,
    search_folders,
    switched_option_hint,
)
from kd_lightning.cli.trainer import launches_processes, log_rows
from kd_lightning.cli.variants import variants, with_seeds
from kd_lightning.environment import (
    conf_dir,
    drop_blank_environment,
    env_setting,
    install_log_redaction,
    redact,
    redact_output,
)
from kd_lightning.generation.job import run_generation
from kd_lightning.models.hub import set_trust_remote_code
from kd_lightning.modules.training import ReplicaFinished
from kd_lightning.report import main as report_main
from kd_lightning.stages import estimate
from kd_lightning.stages.compare import run_pipeline
from kd_lightning.stages.context import StageContext
from kd_lightning.stages.measure import run_evaluate, run_fidelity, run_prior_quality
from kd_lightning.stages.plan import run_plan
from kd_lightning.stages.preflight import run_preflight
from kd_lightning.stages.search import SearchSpec, run_search
from kd_lightning.stages.train import run_distill

log = logging.getLogger("kdl")


def stage_distill(cfg: DictConfig) -> dict[str, Any]:
    return run_distill(build_context(cfg), student_run(cfg, cfg.run_name, list(cfg.loss)))


def stage_pipeline(cfg: DictConfig) -> dict[str, Any]:
    if launches_processes(cfg):
        raise ValueError(
            "kdl pipeline trains several students in one command, and Lightning's DDP/FSDP launcher re-runs the "
            "command once per rank, so it cannot follow them; run the pipeline with trainer=cpu or trainer=gpu, or "
            "train each student with `kdl distill ... trainer=ddp`"
        )
    spec = instantiate(cfg.evaluation) if cfg.get("evaluate_students") else None
    sets = {name: instantiate(node) for name, node in (cfg.get("evaluation_sets") or {}).items()}
    ctx = build_context(cfg)
    if ctx.corpus().validation is not None:  # before hours of training: can these terms help at all?
        stage_preflight(cfg, ctx)
    if cfg.get("search"):
        search = SearchSpec(**OmegaConf.to_container(cfg.search, resolve=True))
        return run_search(
            ctx,
            variants(with_seeds(cfg, [search.seed])),
            search,
            lambda names: variants(with_seeds(cfg, search.final_seeds, names)),
            spec,
            evaluation_sets=sets,
            compare_to=cfg.get("compare_to"),
            out_dir=Path(cfg.paths.output_dir),
        )
    return run_pipeline(
        ctx,
        variants(cfg),
        spec,
        evaluation_sets=sets,
        compare_to=cfg.get("compare_to"),
        out_dir=Path(cfg.paths.output_dir),
    )


def stage_preflight(cfg: DictConfig, ctx: StageContext | None = None) -> dict[str, Any]:
    """``kdl preflight``: the configured terms against the untrained student, on the validation split."""
    return run_preflight(
        ctx or build_context(cfg),
        lambda: instantiate(cfg.student),
        loss_terms(cfg),
        Path(cfg.paths.output_dir),
    )


def stage_evaluate(cfg: DictConfig) -> dict[str, Any]:
    """Evaluate ``models_to_evaluate`` (or every trained student); log each row to the configured loggers."""
    models = [str(p) for p in cfg.get("models_to_evaluate") or []]
    result = run_evaluate(build_context(cfg), instantiate(cfg.evaluation), models, Path(cfg.paths.output_dir))
    log_rows(
        cfg,
        result["rows"],
        "eval",
        "name",
        {"evaluation": OmegaConf.to_container(cfg.evaluation, resolve=True)},
    )
    return result


def stage_fidelity(cfg: DictConfig) -> dict[str, Any]:
    result = run_fidelity(build_context(cfg), instantiate(cfg.fidelity), Path(cfg.paths.output_dir))
    log_rows(cfg, result["rows"], "fidelity", "fidelity", keys=("kl", "kl_median", "tv", "topk_recall"))
    return result


def stage_plan(cfg: DictConfig) -> dict[str, Any]:
    """``kdl plan``: the stores the configured terms (and the pipeline's variants) read, their sizes, FLOPs,
    memory. The default variants are planned only where the selected terms include theirs (``recipe=gkd``
    selects generalized_jsd alone: its plan is the one student's). A variant with its own store format,
    teacher targets, proxy or alignment gets a plan of its own stores (``variants`` in the result)."""
    selected = set(cfg.get("loss") or {})
    defaults = [v for v in (cfg.get("default_variants") or {}).values() if v is not None]
    usable = cfg.get("variants") is not None or all(
        set(v) <= selected for v in defaults if not OmegaConf.is_dict(v)
    )
    planned = variants(cfg) if usable else []
    own = {v.name: v for v in reversed(planned) if v.stores[0] or v.proxy or v.alignment}  # first seed's
    shared = [
        *loss_terms(cfg).values(),
        *(t for v in planned if v.name not in own for t in v.run.loss_terms.values()),
    ]
    what_if = cfg.get("plan") or {}
    ctx = build_context(cfg)

    def plan(context, terms, title=""):
        return run_plan(
            context,
            int(cfg.datamodule.batch_size),
            cfg.get("loss_chunk_size"),
            sorted({label for term in terms for label in term.soft_labels}),
            records=what_if.get("records"),
            proxy_parameters=what_if.get("proxy_parameters"),
            teacher_parameters=what_if.get("teacher_parameters"),
            vocab_size=what_if.get("vocab_size"),
            title=title,
        )

    result = plan(ctx, shared)
    if own:
        result["variants"] = {
            name: plan(v.context(ctx), v.run.loss_terms.values(), f"variant {name}")
            for name, v in sorted(own.items())
        }
    return result


def stage_generate(cfg: DictConfig) -> dict[str, Any]:
    """``kdl generate``: instantiate the teacher backend and the task, write the corpus folder."""
    return run_generation(
        task=instantiate(cfg.generation_task),
        backend=instantiate(cfg.teacher_backend),
        sampling=instantiate(cfg.sampling),
        corpus_dir=cfg.corpus_dir,
        cache_dir=cfg.cache_dir,
        progress=bool(cfg.progress),
    )


STAGE_FUNCTIONS: dict[str, Callable[[DictConfig], dict[str, Any]]] = {
    "prior": lambda cfg: estimate.run_prior(build_context(cfg)),
    "align": lambda cfg: estimate.run_align(build_context(cfg)),
    "posterior": lambda cfg: estimate.run_posterior(build_context(cfg)),
    "teacher-logits": lambda cfg: estimate.run_teacher_logits(build_context(cfg)),
    "distill": stage_distill,
    "pipeline": stage_pipeline,
    "evaluate": stage_evaluate,
    "fidelity": stage_fidelity,
    "generate": stage_generate,
    "plan": stage_plan,
    "preflight": stage_preflight,
    "prior-quality": lambda cfg: run_prior_quality(
        build_context(cfg), instantiate(cfg.prior_quality), Path(cfg.paths.output_dir)
    ),
}
"""Stage name → the function that runs it (every name of :data:`kd_lightning.cli.help.STAGES`)."""


def run_stage(cfg: DictConfig) -> dict[str, Any]:
    """Run ``cfg.stage``; its result is saved as ``<stage>_result.json`` under the Hydra output dir."""
    if cfg.get("num_threads"):
        torch.set_num_threads(int(cfg.num_threads))
    set_trust_remote_code(bool(cfg.get("trust_remote_code", False)))
    seed_everything(cfg.seed, workers=True)
    result = STAGE_FUNCTIONS[cfg.stage](cfg)
    out_dir = Path(cfg.paths.output_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    fault_point("stage:before-result")
    atomic_json(out_dir / f"{cfg.stage}_result.json", result)
    if cfg.stage not in ("pipeline", "plan"):  # those print their tables
        log.info("%s: %s", cfg.stage, result)
    return result


def objective(result: Any, path: str) -> float:
    """The figure a sweeper optimises: ``nll``, or a path such as ``rows.-1.nll`` into the stage's result."""
    node = result
    for part in path.split("."):
        try:
            node = node[int(part)] if isinstance(node, list) else node[part]
        except (KeyError, IndexError, ValueError, TypeError):
            raise KeyError(
                f"sweep_objective={path!r} is not in the {type(result).__name__} result (at {part!r}); "
                "use e.g. nll for kdl distill or rows.-1.nll for kdl pipeline"
            ) from None
    return float(node)


def redact_run_records() -> None:
    """Rewrite the run's ``.hydra/*.yaml`` without credentials (a key in ``base_url``, say).

    Hydra writes the composed config and the command line there before the task starts.
    """
    if not HydraConfig.initialized():
        return
    runtime = HydraConfig.get()
    if not runtime.output_subdir:
        return
    for path in (Path(runtime.runtime.output_dir) / runtime.output_subdir).glob("*.yaml"):
        text = path.read_text()
        clean = redact(text)
        if clean != text:
            atomic_write_text(path, clean)


_RELAUNCH: list[str] = []
"""The command line that re-runs this stage (``kdl <stage> <overrides>``), see :func:`main`."""

_STOP: dict[str, str] = {}
"""What stopped this run early (``signal``: SIGTERM or Ctrl-C) and where its artifacts are, see :func:`main`."""

STOP_CODES = {"SIGTERM": 128 + signal.SIGTERM, "Ctrl-C": 128 + signal.SIGINT}


def _stop_on(signum: int, frame: object) -> None:
    """SIGTERM and Ctrl-C end the run through KeyboardInterrupt (Lightning stops training cleanly on it)."""
    _STOP["signal"] = "SIGTERM" if signum == signal.SIGTERM else "Ctrl-C"
    raise KeyboardInterrupt


def stopped_line(stage: str) -> str:
    """The one line a stopped run leaves: what is kept, and that the same command resumes."""
    where = _STOP.get("artifacts", "the artifacts folder")
    return (
        f"kdl {stage}: stopped by {_STOP['signal']}; finished artifacts under {where} are kept and nothing "
        "unfinished is marked complete (a student keeps its last checkpoint, a store its finished shards); "
        "rerun the same command to resume"
    )


def _task(cfg: DictConfig) -> Any:
    install_log_redaction()  # Hydra has set up its handlers by now; no credential reaches a log file
    _STOP["artifacts"] = str(cfg.paths.artifacts_dir)
    redact_run_records()
    if _RELAUNCH:  # Hydra has parsed its arguments; Lightning's DDP launcher re-runs sys.argv for its ranks
        sys.argv = list(_RELAUNCH)
    try:
        result = run_stage(cfg)
        # Optuna and other optimising sweepers read the job's return value
        return objective(result, cfg.sweep_objective) if cfg.get("sweep_objective") else result
    except ReplicaFinished:  # an extra DDP training process: rank 0 saves and evaluates the student
        raise SystemExit(0) from None
    except (ValueError, KeyError, FileNotFoundError, RuntimeError, InstantiationException) as err:
        if env_setting("KDL_TRACEBACK"):
            raise
        cause = err.__cause__ if isinstance(err, InstantiationException) and err.__cause__ else err
        key = re.search(r"full_key: (\S+)", str(err)) if isinstance(err, InstantiationException) else None
        where = f" (in {key.group(1)})" if key else ""
        if key and isinstance(cause, TypeError):  # an option switched on the command line, with stale keys?
            where += option_hint(cfg, key.group(1).split(".")[0])
        message = str(cause).strip()
        if len(message) > 1 and message[0] == message[-1] and message[0] in "'\"":  # a KeyError's repr
            message = message[1:-1]
        message = redact(message)
        log.error("%s: %s%s", type(cause).__name__, message, where)
        print(
            f"kdl {cfg.stage}: error: {message}{where}  (set KDL_TRACEBACK=1 for the traceback)",
            file=sys.stderr,
        )
        raise SystemExit(1) from None


def option_hint(cfg: DictConfig, group: str) -> str:
    """:func:`switched_option_hint` for a top-level config group of this run."""
    if not HydraConfig.initialized() or not OmegaConf.is_dict(cfg.get(group)):
        return ""
    choice = HydraConfig.get().runtime.choices.get(group)
    return switched_option_hint(group, choice, [str(k) for k in cfg[group]], search_folders(_RELAUNCH[2:]))


def main(argv: list[str] | None = None) -> None:
    """Run ``kdl`` with ``argv`` (the console script, :mod:`kd_lightning.cli.kdl`, lands here for stages)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    redact_output()  # no credential on stdout or stderr, Hydra's own error lines and tracebacks included
    drop_blank_environment()  # WANDB_MODE= (set but empty) means unset, for wandb and oc.env alike
    # like `python -m`, the working folder is importable: a user's ./my_losses/ works as a _target_
    if os.getcwd() not in sys.path and "" not in sys.path:
        sys.path.append(os.getcwd())
    if argv and argv[0] == "report":  # reads finished runs: plain arguments, no Hydra
        report_main(argv[1:])
        return
    if answer_without_hydra(argv):
        return
    if argv[0] in ("-sc", "--shell-completion"):
        shell_completion(argv[1:])
        return
    stage = argv.pop(0)
    argv = renamed_groups(argv)
    check_group_choices(stage, argv)
    check_plugins(stage, argv)
    # Lightning's DDP launcher starts its other ranks by re-running sys.argv[0] (or `-m <module>`) with
    # sys.argv[1:]; _task restores this form of the command once Hydra has parsed its own
    _RELAUNCH[:] = [sys.argv[0], stage, *argv]
    sys.argv = [f"kdl-{stage}", *argv]
    _STOP.clear()
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: signal.signal(sig, _stop_on) for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name=stage)(_task)()
    except (KeyboardInterrupt, SystemExit):
        if "signal" not in _STOP:
            raise
        log.warning(stopped_line(stage))
        print(stopped_line(stage), file=sys.stderr, flush=True)
        raise SystemExit(STOP_CODES[_STOP["signal"]]) from None
    finally:
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def shell_completion(args: list[str]) -> None:
    """``kdl -sc install=bash`` prints the script; the shell then calls ``kdl -sc query=bash``.

    A query completes a stage name after ``kdl``, and after ``kdl <stage>`` hands the rest of the line to
    that stage's Hydra app (config groups, options and keys).
    """
    line = os.environ.get("COMP_LINE", "")
    words = line.split()
    if any(a.startswith("query=") for a in args):
        if len(words) < 2 or (len(words) == 2 and not line.endswith(" ")):
            prefix = words[1] if len(words) == 2 else ""
            print(" ".join(s for s in (*STAGES, "report") if s.startswith(prefix)))
            return
        stage = words[1]
        if stage not in STAGES:
            return
        os.environ["COMP_LINE"] = "kdl " + line.split(stage, 1)[1].lstrip()
    else:
        stage = "distill"  # install/uninstall print a script that does not depend on the stage
    sys.argv = ["kdl", "-sc", *args]
    hydra.main(version_base="1.3", config_path=str(conf_dir()), config_name=stage)(_task)()


if __name__ == "__main__":
    main()
