"""What `kdl --help`, `kdl <stage> --help` and `kdl --version` print (plain text; no Hydra import here).

The per-stage page is Hydra's ``hydra.help.template`` (``conf/hydra/default.yaml``), rendered by the
``kdl_stage_help`` resolver from :data:`STAGE_PAGES` and the composed config, so the settings it shows carry
the values the command line and experiment files give them. Hydra then fills in ``$APP_CONFIG_GROUPS``.
"""

from __future__ import annotations

import difflib
import importlib.metadata
import platform
import sys
from dataclasses import dataclass, field
from typing import Any

from omegaconf import DictConfig, OmegaConf

from kd_lightning.environment import package_version


@dataclass(frozen=True)
class StagePage:
    """One stage's help: what it builds, from what, which settings matter, where results land."""

    summary: str
    """What the stage builds, in a few words."""
    inputs: str
    """What it reads, in a few words (the ``kdl --help`` line)."""
    reads: str
    writes: str
    settings: tuple[tuple[str, str], ...] = field(default_factory=tuple)
    """(config key, what it means); a key of a config group is shown as ``group=<choice>``."""
    example: str = ""


KD_TARGETS_HELP = "what divergences compare with: teacher (online)"
"""Completed at rendering with every soft-label name of the registry (``stage_help``'s ``soft_labels``)."""
TEACHERS_HELP = (
    "several teachers: +teachers.<name>.path=<model> (or .base_url/.model: served) +teachers.<name>.weight=0.5; "
    "read by kd_target=teacher:<name> or teacher_mixture"
)
GROUP_SETTINGS = ("teacher",)
"""Config groups whose selected option's own settings a stage's help lists (a served teacher's base_url,
model, api, max_logprobs, ...), as each option has its own."""

STAGE_PAGES: dict[str, StagePage] = {
    "generate": StagePage(
        "a teacher corpus (self-instruct, instructions file or labelled augmentation)",
        "seed tasks; a local model or an OpenAI-compatible API",
        "seed tasks or your instructions; the teacher (teacher_backend)",
        "corpus_dir (corpus.jsonl, logprobs.jsonl, generation.json); replies cached under cache_dir",
        (
            ("teacher_backend", "local HF model or openai (any OpenAI-compatible API)"),
            ("generation_task", "self_instruct | instructions_file | augment"),
            ("sampling.max_new_tokens", "reply length cap"),
            ("sampling.generation_temperature", "sampling temperature of the teacher (0: greedy)"),
            ("sampling.top_logprobs", "> 0 also stores the teacher's top-k log-probs"),
            ("corpus_dir", "where the corpus is written"),
        ),
        "kdl generate teacher_backend=openai teacher_backend.model=gpt-4o-mini",
    ),
    "prior": StagePage(
        "the n-gram prior store over the student's vocabulary",
        "teacher corpus, tokenizer",
        "the teacher text (data), the student's tokenizer",
        "artifacts/prior/<key>/ (a sparse soft-label store)",
        (
            ("data", "teacher text: alpaca_gpt35 | jsonl | hf_dataset | smollm2_self_instruct"),
            ("tokenizer.path", "the student's tokenizer (folder, hub id or smollm2)"),
            ("estimator.prior.ngram_order", "n of the n-gram model"),
            ("estimator.prior.gamma", "γ: 1/γ n-gram + (1 − 1/γ) one-hot of the observed token"),
            ("estimator.prior.top_k", "ids kept per position (the rest is one tail bucket)"),
        ),
        "kdl prior estimator.prior.ngram_order=3",
    ),
    "align": StagePage(
        "the aligned proxy: the open proxy fine-tuned on the teacher text (SFT or LoRA)",
        "proxy, teacher corpus",
        "the proxy (proxy.path), the teacher text",
        "artifacts/align/<key>/model/ (an HF folder)",
        (
            ("proxy.path", "the open proxy: folder, hub id or smollm2"),
            ("alignment", "sft | lora"),
            ("alignment.max_epochs", "passes over the corpus"),
            ("alignment.learning_rate", "learning rate"),
        ),
        "kdl align alignment=lora",
    ),
    "posterior": StagePage(
        "the posterior store: the prior updated with R proxy samples per position",
        "prior, aligned proxy",
        "the prior and the aligned proxy (built if missing)",
        "artifacts/posterior/<key>/ (a sparse soft-label store; resumable shards in <key>.partial/)",
        (
            ("estimator.posterior", "dirichlet | expected_counts"),
            ("estimator.posterior.sampling_rounds", "R, proxy draws per position"),
            ("estimator.posterior.top_k", "ids kept per position"),
            ("estimator.prior.ngram_order", "n of the prior it updates"),
            ("proxy.path", "the open proxy"),
        ),
        "kdl posterior -m estimator.posterior.sampling_rounds=1,4,16",
    ),
    "teacher-logits": StagePage(
        "an open teacher's sparse distributions per position (offline white-box KD)",
        "open teacher, corpus",
        "the teacher (teacher=), the teacher text",
        "artifacts/teacher_logits/<key>/ (read by kd_target=offline_teacher)",
        (
            (
                "teacher",
                "smollm2 | local (teacher.path=<folder or hub id>) | served (teacher.base_url, teacher.model)",
            ),
            ("teachers", TEACHERS_HELP),
            ("estimator.teacher_targets", "topk | sampled"),
            (
                "estimator.teacher_targets.k",
                "ids kept per position (a served teacher: at most teacher.max_logprobs)",
            ),
        ),
        "kdl teacher-logits teacher=smollm2",
    ),
    "distill": StagePage(
        "one student trained on a weighted sum of loss terms",
        "corpus + the stores its terms need",
        "the teacher text and the stores its terms need (built if missing): prior, posterior, "
        "proxy_agreement, offline_teacher, teacher_logprobs; an online teacher for kd_target=teacher",
        "artifacts/distill/<key>/ (student/, result.json with held-out NLL, checkpoints/)",
        (
            ("loss", "loss terms: conf/loss/*.yaml, e.g. loss=[hard_ce,prior_kl,posterior_kl]"),
            ("hard_ce_weight", "weight of CE on the teacher's tokens"),
            ("prior_kl_weight", "weight of KL(prior ‖ student)"),
            ("posterior_kl_weight", "weight of KL(posterior ‖ student)"),
            (
                "loss.posterior_kl.weighting",
                "none | proxy_agreement (Proxy-KD: positions by p_proxy(teacher token))",
            ),
            ("kd_target", KD_TARGETS_HELP),
            ("teacher", "null | smollm2 | local | served: the online teacher kd_target=teacher reads"),
            ("teachers", TEACHERS_HELP),
            ("loss.prior_kl.decoupled", "true: the estimate only ranks the other tokens (target_weight=0)"),
            ("loss.prior_kl.weighting", "none | prior_reliability (n(c)/(n(c)+m) per position)"),
            ("kd_weight_schedule.kind", "constant | ramp_up | decay of the divergence terms' weights"),
            ("estimator.prior.smoothing", "ngram | unigram | uniform (label smoothing at the same mass)"),
            ("trainer.compile", "torch.compile of the student's training forward"),
            ("student_attn_implementation", "null | eager | sdpa: eager + compile trains faster on a CPU"),
            ("distill_temperature", "softens student and target (terms scaled by T²)"),
            ("student", "smollm2_layers | random_llama | local (student.path=...)"),
            ("module", "the LightningModule: distill | online_teacher | minillm | gkd | distillm | yours"),
            ("trainer.max_epochs", "epochs"),
            ("optimizer.lr", "learning rate"),
        ),
        "kdl distill loss=[hard_ce,prior_kl] prior_kl_weight=0.5",
    ),
    "pipeline": StagePage(
        "every stage, one student per variant, then a held-out table",
        "corpus, proxy, student",
        "the teacher text, the proxy, the student",
        "every artifact above, and outputs/pipeline/<time>/pipeline_result.json",
        (
            (
                "variants",
                "students to train: name → loss terms (or {loss, module, init_from, trainer, report, ...})",
            ),
            ("data", "teacher text"),
            ("student", "the student model"),
            ("estimator.prior.ngram_order", "n of the prior"),
            ("estimator.posterior.sampling_rounds", "R of the posterior"),
            ("evaluate_students", "also token accuracy, ECE and ROUGE-L per student"),
        ),
        "kdl pipeline experiment=demo",
    ),
    "evaluate": StagePage(
        "held-out NLL/ppl, token accuracy, ECE, ROUGE-L, question-set scores",
        "trained students or model folders",
        "trained students (artifacts/distill/*) or models_to_evaluate; the held-out teacher text",
        "artifacts/eval/<key>.json per model; outputs/evaluate/<time>/evaluate.csv",
        (
            ("models_to_evaluate", "folders or hub ids; empty: every trained student"),
            ("evaluation.generation_limit", "held-out prompts generated for ROUGE-L"),
            ("evaluation.question_sets", "born_first, which_is_heavier, ... or your JSONL"),
        ),
        "kdl evaluate models_to_evaluate=[smollm2]",
    ),
    "fidelity": StagePage(
        "how close prior and posterior come to a true teacher distribution",
        "open teacher, its corpus, proxy",
        "an open teacher that wrote the corpus (teacher=), the proxy",
        "outputs/fidelity/<time>/ (fidelity.csv, fidelity_positions.npz); stores cached as usual",
        (
            ("teacher", "the open teacher treated as closed"),
            ("fidelity.records", "training records scored"),
            ("fidelity.ngram_orders", "priors built per n"),
            ("fidelity.gammas", "... and per γ"),
            ("fidelity.sampling_rounds", "posteriors built per R"),
        ),
        "kdl fidelity fidelity.sampling_rounds=[1,16]",
    ),
    "prior-quality": StagePage(
        "how well the n-gram prior predicts held-out teacher text, per n and amount counted",
        "teacher corpus, tokenizer",
        "the teacher text (data: its training split counted, its held-out records scored)",
        "outputs/prior-quality/<time>/prior_quality.csv (and the table); cached under artifacts/eval/",
        (
            ("data", "teacher text, e.g. data=sharegpt"),
            ("prior_quality.ngram_orders", "n of each model"),
            ("prior_quality.counted_tokens", "response tokens counted (null: the whole training split)"),
        ),
        "kdl prior-quality data=sharegpt",
    ),
    "preflight": StagePage(
        "whether the loss terms can help this student: NLLs and λ per term, one verdict line each",
        "teacher corpus (its validation split), student, prior, proxy",
        "the validation split (data.validation_size), the untrained student, the prior's counts, the proxy "
        "(aligned if cached); forward passes only",
        "outputs/preflight/<time>/preflight.json (and the table on stdout)",
        (
            ("data.validation_size", "records it measures on (kdl pipeline prints it first when > 0)"),
            ("loss", "the terms checked, with their weights"),
            ("prior_kl_weight", "the prior term's weight"),
            ("estimator.prior.gamma", "γ of the prior"),
            ("loss.prior_kl.decoupled", "decoupled terms leave the observed token to the CE"),
        ),
        "kdl preflight experiment=paper_small data.validation_size=200",
    ),
    "plan": StagePage(
        "a cost plan: corpus tokens, store sizes, proxy FLOPs, KD-loss memory",
        "teacher corpus, model headers",
        "the tokenised corpus (built if needed) and the models' safetensors headers; nothing heavy runs",
        "outputs/plan/<time>/plan_result.json (and the table on stdout)",
        (
            ("loss", "the terms whose stores are sized (and variants' terms)"),
            ("estimator.posterior.top_k", "K of the posterior store"),
            ("estimator.prior.top_k", "K of the prior store"),
            ("loss_chunk_size", "bounds the KD loss's memory"),
            ("datamodule.batch_size", "sequences per step"),
        ),
        "kdl plan experiment=demo",
    ),
}
STAGES = tuple(STAGE_PAGES)
REPORT_SUMMARY = ("a table and plots of finished runs", "Hydra job folders or wandb offline runs")

FIRST_COMMANDS = (
    ("kdl pipeline experiment=tiny", "a one-minute run on tiny built-in models, ending with a table"),
    ("kdl pipeline experiment=demo", "the closed-source demo: gpt-3.5 text, SmolLM2 proxy and student"),
    ("kdl distill --help", "a stage's settings (with current values), config groups and outputs"),
    ("kdl distill --cfg job", "print the composed config of a run without running it"),
)


def main_help() -> str:
    """The text of ``kdl --help``."""
    width = max(len(s) for s in (*STAGES, "report"))
    lines = [
        f"kdl — knowledge distillation of language models (kd_lightning {package_version()})",
        "",
        "usage: kdl <stage> [key=value ...] [-m]   Hydra overrides; -m runs a sweep (multirun)",
        "       kdl report <folder>... [--out DIR]",
        "       kdl <stage> --help | kdl --version",
        "",
        "stages (what each builds ← what it reads; each builds what it needs and caches it):",
        *(f"  {name:<{width}}  {page.summary}  ← {page.inputs}" for name, page in STAGE_PAGES.items()),
        f"  {'report':<{width}}  {REPORT_SUMMARY[0]}  ← {REPORT_SUMMARY[1]}",
        "",
        "first commands:",
        *(f"  {command:<30} {what}" for command, what in FIRST_COMMANDS),
        "",
        "Artifacts are cached under artifacts/ (KDL_ARTIFACTS) by settings and code; rebuild=[distill] forces one.",
        'Shell completion (bash): eval "$(kdl -sc install=bash)"',
        "More: README.md (quickstart, figures), docs/extending.md (your own loss or module).",
    ]
    return "\n".join(lines)


def version_text() -> str:
    """The text of ``kdl --version``: ours and the versions of what we run on."""

    def version(dist: str) -> str:
        try:
            return importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            return "not installed"

    deps = ", ".join(f"{d} {version(d)}" for d in ("torch", "transformers", "lightning", "hydra-core"))
    return f"kd_lightning {package_version()} ({deps}; python {platform.python_version()})"


def _value(root: DictConfig, key: str) -> str:
    """``key=<value>`` as composed: a config group shows its choice, a list of terms its names."""
    choices = OmegaConf.select(root, "hydra.runtime.choices", default=None)
    group = key.replace(".", "/")
    if choices is not None and group in choices:
        choice = choices[group]
        return f"{key}={'null' if choice is None else choice}"
    try:
        node = OmegaConf.select(root, key, throw_on_missing=True, throw_on_resolution_failure=True)
    except Exception:  # a missing value (???) or an interpolation that only resolves at run time
        return f"{key}=???"
    if OmegaConf.is_config(node):
        node = OmegaConf.to_container(node, resolve=False)
        if isinstance(node, dict) and key in ("loss", "variants"):
            node = f"[{','.join(node)}]"
    return f"{key}={str(node).replace(' ', '')}"


def _selected_group_rows(root: DictConfig, shown: set[str]) -> list[tuple[str, str]]:
    """``group.key=value`` of each :data:`GROUP_SETTINGS` group the stage's page shows and the command
    selected (``teacher=served`` has other settings than ``teacher=smollm2``)."""
    rows = []
    for group in GROUP_SETTINGS:
        node = OmegaConf.select(root, group, default=None)
        if group not in shown or not OmegaConf.is_dict(node):
            continue
        for key in node:
            if key != "_target_":
                rows.append((_value(root, f"{group}.{key}"), f"(the selected {group}'s setting)"))
    return rows


def stage_help(
    root: DictConfig, artifact_kinds: tuple[str, ...] = (), soft_labels: tuple[str, ...] = ()
) -> str:
    """The ``hydra.help.template`` of ``kdl <stage> --help`` (Hydra substitutes ``$APP_CONFIG_GROUPS``);
    ``artifact_kinds``: what ``rebuild=`` takes, ``soft_labels``: what ``kd_target`` reads besides the online
    teacher (both the registry's, passed in so this module stays light)."""
    stage = str(OmegaConf.select(root, "stage", default=""))
    page = STAGE_PAGES.get(stage)
    if page is None:
        return "$APP_CONFIG_GROUPS"
    rows = [(_value(root, key), what) for key, what in page.settings]
    rows = [
        (value, " | ".join([what, *soft_labels]) if what == KD_TARGETS_HELP else what) for value, what in rows
    ]
    rows += _selected_group_rows(root, {key for key, _ in page.settings})
    if artifact_kinds and stage != "generate":
        rows.append((_value(root, "rebuild"), f"artifact kinds to build again: {', '.join(artifact_kinds)}"))
    width = min(max(len(v) for v, _ in rows), 46)
    artifacts = OmegaConf.select(root, "paths.artifacts_dir", default="artifacts")
    lines = [
        f"kdl {stage} — {page.summary}.",
        "",
        f"reads:  {page.reads}",
        f"writes: {page.writes}",
        f"        artifacts root: {artifacts}; logs and results: outputs/{stage}/<time>/",
        "",
        "settings that matter (current values; change any with key=value):",
        *(f"  {value:<{width}}  {what}" for value, what in rows),
        "",
        f"example: {page.example}",
        "",
        "config groups (choose with group=option, e.g. experiment=tiny):",
        "$APP_CONFIG_GROUPS",
        f"the full config:  kdl {stage} --cfg job  (add --resolve to resolve interpolations)",
        f"Hydra's options:  kdl {stage} --hydra-help",
        "all stages:       kdl --help",
    ]
    # Hydra fills $APP_CONFIG_GROUPS with string.Template: any other $ must be escaped
    return "\n".join(lines).replace("$", "$$").replace("$$APP_CONFIG_GROUPS", "$APP_CONFIG_GROUPS")


def stage_help_resolver(artifact_kinds: tuple[str, ...] = (), soft_labels: tuple[str, ...] = ()):
    """The OmegaConf resolver for ``hydra.help.template`` (it gets the composed config as ``_root_``)."""

    def resolve(*, _root_: Any) -> str:
        return stage_help(_root_, artifact_kinds, soft_labels)

    return resolve


def answer_without_hydra(argv: list[str]) -> bool:
    """Handle the forms that need no config (help, version, an unknown stage); True if answered.

    Kept free of torch and Hydra imports so ``kdl --help`` answers at once.
    """
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(main_help())
        return True
    if argv[0] in ("-V", "--version", "version"):
        print(version_text())
        return True
    if argv[0] not in (*STAGES, "report", "-sc", "--shell-completion"):
        close = difflib.get_close_matches(argv[0], [*STAGES, "report"], n=1)
        hint = f"; did you mean `kdl {close[0]}`?" if close else ""
        print(f"kdl: unknown stage {argv[0]!r}{hint} (kdl --help lists the stages)", file=sys.stderr)
        raise SystemExit(2)
    return False
