"""The closed-source KD stages as plain Python: corpus → prior → aligned proxy → posterior → distill.

Every stage returns a cached artifact keyed by a hash of the settings it depends on, so a sweep over the
sampling rounds R reuses the prior and the aligned proxy, and a sweep over loss weights reuses all
estimates. No Hydra here: :mod:`kd_lightning.cli.main` builds the objects and calls these functions.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from lightning import Trainer
from torch import nn

from kd_lightning.artifacts import (
    ARTIFACT_KINDS,
    Workspace,
    artifact_lock,
    discard_for_rebuild,
    fault_point,
    file_digest,
    model_identity,
    remove_leftovers,
)
from kd_lightning.atomic import atomic_json
from kd_lightning.data.datamodule import TeacherTextDataModule
from kd_lightning.data.records import CorpusError, load_records, split_records
from kd_lightning.data.soft_labels import SoftLabelStore, write_store
from kd_lightning.data.tokenized import TokenizedCorpus, tokenize_records
from kd_lightning.estimation.ngram import NGramPriorEstimator
from kd_lightning.estimation.posterior import ProxyPosteriorEstimator
from kd_lightning.estimation.teacher_targets import TeacherTargetBuilder
from kd_lightning.evaluation.evaluate import EvaluationSpec, evaluate_model
from kd_lightning.evaluation.fidelity import (
    Estimate,
    FidelitySpec,
    label_smoothing_estimate,
    one_hot_estimate,
    store_estimate,
)
from kd_lightning.evaluation.nll import heldout_nll
from kd_lightning.losses.terms import HardCrossEntropy, LossTerm, soft_label_names
from kd_lightning.models.loading import (
    freeze,
    load_causal_lm,
    load_tokenizer,
    tokenizer_fingerprint,
)
from kd_lightning.modules.distill import DistillModule
from kd_lightning.modules.teacher import OnlineTeacherDistillModule

log = logging.getLogger(__name__)


def settings_key(settings: Mapping[str, Any]) -> str:
    """12-hex hash of a JSON-able settings mapping (key order does not matter)."""
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()[:12]


@dataclass
class CorpusSpec:
    """Where the teacher text comes from and how it is cut into train / held-out."""

    source: str = "alpaca_gpt35"
    """``alpaca_gpt35`` (the 805 gpt-3.5-turbo-0301 responses), ``jsonl`` or ``hf_dataset``."""
    path: str | None = None
    """File or folder for ``jsonl`` / ``hf_dataset``."""
    fields: dict[str, str] = field(default_factory=dict)
    """Map of our field names (instruction, input, system, response) to the source's."""
    heldout_size: int = 100
    """Records held out by the fixed hash rule (see :func:`split_records`)."""
    max_seq_len: int = 512
    """Prompt + response tokens; longer responses are truncated (and counted)."""
    train_limit: int | None = None
    """Use only the first N training records (after the split), e.g. for a quick demo."""
    heldout_limit: int | None = None
    """Evaluate on only the first N held-out records."""
    logprobs: str | None = None
    """``logprobs.jsonl`` from ``kdl generate sampling.top_logprobs=K``: the teacher's top-k log-probs,
    stored as the ``teacher_logprobs`` soft labels (``kd_target=teacher_logprobs``)."""
    keep_duplicate_heldout: bool = False
    """A held-out prompt that also occurs in the training split is dropped from the held-out side (and
    reported) unless this is true: evaluating on a prompt the student trained on flatters it."""

    def __post_init__(self) -> None:
        if self.heldout_size < 1:
            raise ValueError(
                f"data.heldout_size must be >= 1 (records held out to evaluate on), got {self.heldout_size}"
            )
        if self.max_seq_len < 2:
            raise ValueError(f"data.max_seq_len must be >= 2, got {self.max_seq_len}")
        for name in ("train_limit", "heldout_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"data.{name} must be >= 1 or null, got {value}")


@dataclass
class ProxyAlignment:
    """How the proxy is fine-tuned on the teacher text before it is sampled (plain SFT; LoRA optional)."""

    max_records: int | None = None
    """Train on the first N training records (None: all)."""
    max_epochs: int = 1
    batch_size: int = 4
    learning_rate: float = 5e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    """Linear learning-rate warm-up over this many optimizer steps (0: none)."""
    lora_rank: int | None = None
    """If set, train LoRA adapters of this rank (needs ``peft``) and merge them after training."""
    lora_alpha: float = 16.0
    seed: int = 0

    def __post_init__(self) -> None:
        checks = (
            ("max_epochs", self.max_epochs >= 1, ">= 1"),
            ("batch_size", self.batch_size >= 1, ">= 1"),
            ("learning_rate", self.learning_rate > 0, "> 0"),
            ("weight_decay", self.weight_decay >= 0, ">= 0"),
            ("warmup_steps", self.warmup_steps >= 0, ">= 0"),
            ("max_records", self.max_records is None or self.max_records >= 1, ">= 1 or null"),
            ("lora_rank", self.lora_rank is None or self.lora_rank >= 1, ">= 1 or null"),
        )
        for name, ok, rule in checks:
            if not ok:
                raise ValueError(f"alignment.{name} must be {rule}, got {getattr(self, name)}")


class Pipeline:
    """Runs and caches the stages. Built from plain objects (see :mod:`kd_lightning.cli.main`).

    Args:
        workspace: artifact root.
        tokenizer_path: the student's tokenizer (the prior is over its vocabulary; the proxy must share it).
        corpus: the teacher text spec.
        prior: n-gram prior estimator.
        posterior: proxy posterior estimator.
        proxy_path: the open proxy model (``smollm2`` or a local HF folder).
        alignment: proxy fine-tuning settings.
        trainer_factory: ``(run_dir, run_name) -> Trainer`` (loggers and callbacks included).
        teacher_path: an open (white-box) teacher, for the offline-teacher store (``kdl teacher-logits``).
        teacher_targets: how that store keeps the teacher's distributions (top-k or sampled).
        code: per artifact kind, a fingerprint of the code that builds it
            (:func:`kd_lightning.code_fingerprint.code_fingerprint`); part of every cache key.
        rebuild: artifact kinds (:data:`ARTIFACT_KINDS`) to build afresh even when cached, once per process.
    """

    def __init__(
        self,
        workspace: Workspace,
        tokenizer_path: str,
        corpus: CorpusSpec,
        prior: NGramPriorEstimator,
        posterior: ProxyPosteriorEstimator,
        proxy_path: str,
        alignment: ProxyAlignment,
        trainer_factory: Callable[[Path, str], Trainer],
        teacher_path: str | None = None,
        teacher_targets: TeacherTargetBuilder | None = None,
        code: Mapping[str, str] | None = None,
        rebuild: Collection[str] = (),
    ) -> None:
        unknown = sorted(set(rebuild) - set(ARTIFACT_KINDS))
        if unknown:
            raise ValueError(
                f"rebuild={list(rebuild)}: unknown artifact kind {unknown[0]!r}; choose from {list(ARTIFACT_KINDS)}"
            )
        self.code = dict(code or {})
        self.rebuild = frozenset(rebuild)
        self.workspace = workspace
        self.tokenizer_path = tokenizer_path
        self.tokenizer = load_tokenizer(tokenizer_path)
        self.tokenizer_fp = tokenizer_fingerprint(self.tokenizer)
        self.corpus_spec = corpus
        self.prior_estimator = prior
        self.posterior_estimator = posterior
        self.proxy_path = proxy_path
        self.alignment = alignment
        self.trainer_factory = trainer_factory
        self.teacher_path = teacher_path
        self.teacher_targets = teacher_targets or TeacherTargetBuilder()
        self._corpora: tuple[TokenizedCorpus, TokenizedCorpus] | None = None
        self._full: tuple[TokenizedCorpus, TokenizedCorpus] | None = None

    # ---------------------------------------------------------------- corpus
    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    def corpus_key(self) -> str:
        spec = asdict(self.corpus_spec)
        spec.pop("logprobs")  # evidence about the corpus, not part of it
        if spec["source"] not in ("alpaca_gpt35", "smollm2_self_instruct") and spec["path"]:
            if not Path(spec["path"]).expanduser().exists():
                raise CorpusError(
                    f"data.path={spec['path']} does not exist; point it at your corpus "
                    "(a JSONL file of records, or a datasets folder for data=hf_dataset)"
                )
            spec["content"] = file_digest(Path(spec["path"]).expanduser())
        spec["format"] = 2  # tokenized corpora keep their record keys
        return settings_key({"spec": spec, "tokenizer": self.tokenizer_fp, "code": self.code.get("corpus")})

    def corpora(self) -> tuple[TokenizedCorpus, TokenizedCorpus]:
        """(train, held-out) tokenised corpora, cached. ``train`` honours ``train_limit``."""
        if self._corpora is None:
            full, heldout = self._tokenized()
            limit = self.corpus_spec.train_limit
            self._corpora = (full if limit is None else _first_sequences(full, limit)), heldout
        return self._corpora

    def full_train(self) -> TokenizedCorpus:
        """The whole training split (n-gram counts and proxy alignment use all of it)."""
        return self._tokenized()[0]

    def _tokenized(self) -> tuple[TokenizedCorpus, TokenizedCorpus]:
        if self._full is not None:
            return self._full
        folder = self.workspace.path("corpus", self.corpus_key())
        with artifact_lock(folder):
            discard_for_rebuild("corpus", self.rebuild, folder)
            if not ((folder / "train").is_dir() and (folder / "heldout").is_dir()):
                self._build_corpus(folder)
            self._full = TokenizedCorpus.load(folder / "train"), TokenizedCorpus.load(folder / "heldout")
        return self._full

    def _build_corpus(self, folder: Path) -> None:
        """Read, split and tokenise the records; both halves land in ``folder`` with one rename."""
        spec = self.corpus_spec
        records = load_records(spec.source, spec.path, spec.fields)
        train_records, heldout_records = split_records(records, spec.heldout_size)
        seen = {r.key for r in train_records}
        straddling = [r for r in heldout_records if r.key in seen]
        if straddling:
            action = (
                "kept (data.keep_duplicate_heldout=true)"
                if spec.keep_duplicate_heldout
                else ("dropped from the held-out side (data.keep_duplicate_heldout=true keeps them)")
            )
            log.warning("corpus: %d held-out record(s) repeat a training prompt; %s", len(straddling), action)
            if not spec.keep_duplicate_heldout:
                heldout_records = [r for r in heldout_records if r.key not in seen]
        if spec.heldout_limit is not None:
            heldout_records = heldout_records[: spec.heldout_limit]
        if not heldout_records:
            raise ValueError("data.heldout_size is 0: the pipeline needs held-out records to evaluate on")
        train = tokenize_records(train_records, self.tokenizer, spec.max_seq_len)
        heldout = tokenize_records(heldout_records, self.tokenizer, spec.max_seq_len)
        log.info("corpus train: %s", train.report.summary())
        log.info("corpus held-out: %s", heldout.report.summary())
        remove_leftovers(folder.parent, f".{folder.name}.*")  # a corpus write cut short by a kill
        tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
        try:
            train.save(tmp / "train")
            heldout.save(tmp / "heldout")
            fault_point("corpus:before-rename")
            if folder.exists():  # a half-written corpus of a run killed before this layout
                shutil.rmtree(folder)
            os.replace(tmp, folder)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise

    def vocab_size(self) -> int:
        return int(max(len(self.tokenizer), self.tokenizer.vocab_size))

    # ---------------------------------------------------------------- prior
    def prior_provenance(self) -> dict[str, Any]:
        train, _ = self.corpora()
        return {
            "tokenizer": self.tokenizer_fp,
            "corpus": train.fingerprint,
            "counts": self.full_train().fingerprint,
            "estimator": self.prior_estimator.settings(),
            "code": self.code.get("prior"),
        }

    def prior(self) -> SoftLabelStore:
        """The n-gram prior store for the training corpus (built once per settings)."""
        provenance = self.prior_provenance()
        folder = self.workspace.path("prior", settings_key(provenance))
        with artifact_lock(folder):
            discard_for_rebuild("prior", self.rebuild, folder, _stats_path(folder))
            if (folder / "meta.json").is_file():
                return SoftLabelStore(folder, expect=provenance, vocab_size=self.vocab_size())
            return self._build_prior(folder, provenance)

    def _build_prior(self, folder: Path, provenance: dict[str, Any]) -> SoftLabelStore:
        train, _ = self.corpora()
        start = time.perf_counter()
        rows, stats = self.prior_estimator.estimate(train, self.vocab_size(), count_corpus=self.full_train())
        store = write_store(folder, rows, train.target_offsets(), provenance, vocab_size=self.vocab_size())
        atomic_json(
            folder.parent / f"{folder.name}.stats.json", {**stats, "seconds": time.perf_counter() - start}
        )
        log.info("prior written to %s (%s)", folder, stats)
        return store

    # ---------------------------------------------------------------- proxy alignment
    def proxy_identity(self) -> dict[str, str]:
        return model_identity(self.proxy_path)

    def aligned_proxy_key(self) -> str:
        return settings_key(
            {
                "proxy": self.proxy_identity(),
                "corpus": self.full_train().fingerprint,
                "alignment": asdict(self.alignment),
                "code": self.code.get("align"),
            }
        )

    def check_proxy_compatible(self, proxy: nn.Module) -> None:
        self.check_shares_tokenizer(proxy, self.proxy_path, "proxy")

    def check_shares_tokenizer(self, model: nn.Module, path: str, role: str) -> None:
        """Refuse a proxy/teacher whose logits are not over the student's vocabulary, in one line."""
        vocab = int(model.config.vocab_size)
        if vocab < self.vocab_size():
            raise ValueError(
                f"{role} {path} has config.vocab_size={vocab} but the student tokenizer has "
                f"{self.vocab_size()} ids; the {role} must share the student's tokenizer"
            )
        fingerprint = tokenizer_fingerprint(load_tokenizer(path))
        if fingerprint != self.tokenizer_fp:
            raise ValueError(
                f"{role} {path} uses a different tokenizer than {self.tokenizer_path} "
                f"(fingerprints {fingerprint} vs {self.tokenizer_fp}); its distributions must be over one "
                "shared vocabulary"
            )

    def aligned_proxy(self) -> Path:
        """Fine-tune the proxy on the training corpus (SFT) and return the saved HF folder (cached)."""
        folder = self.workspace.path("align", self.aligned_proxy_key())
        with artifact_lock(folder):
            discard_for_rebuild("align", self.rebuild, folder)
            final = folder / "model"
            if not (final / "config.json").is_file():
                self._build_aligned_proxy(folder, final)
            return final

    def _build_aligned_proxy(self, folder: Path, final: Path) -> None:
        remove_leftovers(folder, ".model.*")
        train = self.full_train()
        cfg = self.alignment
        proxy = load_causal_lm(self.proxy_path)
        self.check_proxy_compatible(proxy)
        if cfg.lora_rank:
            proxy = self._with_lora(proxy)
        subset = train if cfg.max_records is None else _first_sequences(train, cfg.max_records)
        torch.manual_seed(cfg.seed)
        warmup = None
        if cfg.warmup_steps > 0:

            def warmup(optimizer):
                return torch.optim.lr_scheduler.LinearLR(
                    optimizer, start_factor=1.0 / cfg.warmup_steps, total_iters=cfg.warmup_steps
                )

        module = DistillModule(
            proxy,
            {"hard_ce": HardCrossEntropy()},
            optimizer=lambda params: torch.optim.AdamW(
                params, lr=cfg.learning_rate, weight_decay=cfg.weight_decay
            ),
            scheduler=warmup,
        )
        data = TeacherTextDataModule(batch_size=cfg.batch_size, shuffle_seed=cfg.seed).connect(
            self.pad_id, subset
        )
        trainer = self.trainer_factory(folder, "align", max_epochs=cfg.max_epochs, validate=False)
        trainer.fit(module, datamodule=data, ckpt_path=_last_checkpoint(folder))
        close_loggers(trainer)
        model = module.student
        if cfg.lora_rank:
            model = model.merge_and_unload()
        tmp = Path(tempfile.mkdtemp(prefix=".model.", dir=folder))
        model.save_pretrained(tmp)
        self.tokenizer.save_pretrained(tmp)
        fault_point("align:before-rename")
        if final.exists():  # not complete (no config.json): a leftover of an older layout
            shutil.rmtree(final)
        os.replace(tmp, final)
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)

    def _with_lora(self, model: nn.Module) -> nn.Module:
        try:
            from peft import LoraConfig, get_peft_model
        except ImportError as err:
            raise ImportError("alignment.lora_rank needs `pip install peft` (or kd_lightning[lora])") from err
        config = LoraConfig(
            r=self.alignment.lora_rank,
            lora_alpha=self.alignment.lora_alpha,
            task_type="CAUSAL_LM",
            target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
        )
        return get_peft_model(model, config)

    # ---------------------------------------------------------------- posterior
    def posterior_provenance(self) -> dict[str, Any]:
        prior = self.prior_provenance()
        return {
            "tokenizer": self.tokenizer_fp,
            "corpus": prior["corpus"],
            "prior": settings_key(prior),
            "proxy": self.aligned_proxy_key(),
            "estimator": self.posterior_estimator.settings(),
            "code": self.code.get("posterior"),
        }

    def posterior(self) -> SoftLabelStore:
        """The posterior store (prior updated with R proxy draws per position), resumable."""
        provenance = self.posterior_provenance()
        folder = self.workspace.path("posterior", settings_key(provenance))
        with artifact_lock(folder):
            discard_for_rebuild("posterior", self.rebuild, folder, _partial_path(folder), _stats_path(folder))
            if (folder / "meta.json").is_file():
                return SoftLabelStore(folder, expect=provenance, vocab_size=self.vocab_size())
            return self._build_posterior(folder, provenance)

    def _build_posterior(self, folder: Path, provenance: dict[str, Any]) -> SoftLabelStore:
        prior = self.prior()
        proxy_folder = self.aligned_proxy()
        train, _ = self.corpora()
        proxy = freeze(load_causal_lm(proxy_folder))
        start = time.perf_counter()
        store = self.posterior_estimator.estimate(proxy, train, prior, self.pad_id, str(folder), provenance)
        atomic_json(
            folder.parent / f"{folder.name}.stats.json",
            {"seconds": time.perf_counter() - start, "rows": len(store.tail)},
        )
        return store

    # ---------------------------------------------------------------- offline white-box teacher
    def offline_teacher_provenance(self) -> dict[str, Any]:
        if self.teacher_path is None:
            raise ValueError(
                "the offline_teacher soft labels need an open teacher: add teacher=smollm2 "
                "(or teacher=local teacher.path=<HF folder>)"
            )
        train, _ = self.corpora()
        return {
            "tokenizer": self.tokenizer_fp,
            "corpus": train.fingerprint,
            "teacher": model_identity(self.teacher_path),
            "targets": self.teacher_targets.settings(),
            "code": self.code.get("teacher_logits"),
        }

    def offline_teacher(self) -> SoftLabelStore:
        """The teacher's sparse distributions at every training target position (built once, resumable)."""
        provenance = self.offline_teacher_provenance()
        folder = self.workspace.path("teacher_logits", settings_key(provenance))
        with artifact_lock(folder):
            discard_for_rebuild(
                "teacher_logits", self.rebuild, folder, _partial_path(folder), _stats_path(folder)
            )
            if (folder / "meta.json").is_file():
                return SoftLabelStore(folder, expect=provenance, vocab_size=self.vocab_size())
            return self._build_offline_teacher(folder, provenance)

    def _build_offline_teacher(self, folder: Path, provenance: dict[str, Any]) -> SoftLabelStore:
        teacher = freeze(load_causal_lm(self.teacher_path))
        self.check_shares_tokenizer(teacher, self.teacher_path, "teacher")
        train, _ = self.corpora()
        start = time.perf_counter()
        store = self.teacher_targets.estimate(teacher, train, self.pad_id, str(folder), provenance)
        atomic_json(
            folder.parent / f"{folder.name}.stats.json",
            {"seconds": time.perf_counter() - start, "rows": len(store.tail)},
        )
        return store

    # ---------------------------------------------------------------- API teacher log-probs
    def teacher_logprobs(self) -> SoftLabelStore:
        """The API teacher's top-k log-probs (``data.logprobs``) aligned to every training target position."""
        if not self.corpus_spec.logprobs:
            raise ValueError(
                "the teacher_logprobs soft labels need data.logprobs=<corpus folder>/logprobs.jsonl "
                "(written by kdl generate sampling.top_logprobs=K)"
            )
        train, _ = self.corpora()
        provenance = {
            "tokenizer": self.tokenizer_fp,
            "corpus": train.fingerprint,
            "logprobs": file_digest(self.corpus_spec.logprobs),
            "code": self.code.get("teacher_logprobs"),
        }
        folder = self.workspace.path("teacher_logprobs", settings_key(provenance))
        with artifact_lock(folder):
            discard_for_rebuild("teacher_logprobs", self.rebuild, folder, _stats_path(folder))
            if (folder / "meta.json").is_file():
                return SoftLabelStore(folder, expect=provenance, vocab_size=self.vocab_size())
            return self._build_teacher_logprobs(folder, provenance)

    def _build_teacher_logprobs(self, folder: Path, provenance: dict[str, Any]) -> SoftLabelStore:
        from kd_lightning.generation.logprobs import build_logprob_store, read_logprobs

        train, _ = self.corpora()
        store, stats = build_logprob_store(
            train,
            read_logprobs(self.corpus_spec.logprobs),
            self.tokenizer,
            folder,
            provenance,
            self.vocab_size(),
        )
        atomic_json(folder.parent / f"{folder.name}.stats.json", stats)
        log.info("teacher log-probs written to %s (%s)", folder, stats)
        return store

    def stores_for(self, names: tuple[str, ...]) -> dict[str, SoftLabelStore]:
        known = {
            "prior": self.prior,
            "posterior": self.posterior,
            "offline_teacher": self.offline_teacher,
            "teacher_logprobs": self.teacher_logprobs,
        }
        unknown = [n for n in names if n not in known]
        if unknown:
            raise KeyError(f"no estimation stage produces soft labels {unknown[0]!r}; known: {sorted(known)}")
        return {name: known[name]() for name in names}

    # ---------------------------------------------------------------- distillation
    def distill(
        self,
        name: str,
        student_factory: Callable[[], nn.Module],
        loss_terms: Mapping[str, LossTerm],
        datamodule: TeacherTextDataModule,
        optimizer: Callable,
        scheduler: Callable | None,
        settings: Mapping[str, Any],
        max_epochs: int | None = None,
        teacher_factory: Callable[[], nn.Module] | None = None,
        loss_chunk_size: int | None = None,
        module_factory: Callable[..., nn.Module] | None = None,
        trainer_overrides: Mapping[str, Any] | None = None,
        student_module: Callable[..., nn.Module] | None = None,
    ) -> dict[str, Any]:
        """Train a student (resuming its last checkpoint) and evaluate it on the held-out text (cached).

        ``module_factory`` replaces the DistillModule (``method=minillm | gkd | distillm``): a partial called
        with ``student``, ``teacher``, ``tokenizer``, ``optimizer``, ``scheduler`` and, for modules that take
        them, ``loss_terms``. A module with ``select_best_checkpoint`` gets its best checkpoint back after fit.
        ``student_module`` (the ``module`` config group: a partial of ``DistillModule`` or a user's subclass)
        is called with ``student``, ``loss_terms``, ``optimizer``, ``scheduler``, ``loss_chunk_size`` and,
        when a teacher is configured, ``teacher``.
        """
        train, heldout = self.corpora()
        stores = self.stores_for(soft_label_names(loss_terms.values()))
        key = settings_key(
            {
                "settings": settings,
                "corpus": train.fingerprint,
                "stores": {n: s.folder.name for n, s in stores.items()},
            }
        )
        folder = self.workspace.path("distill", key)
        with artifact_lock(folder):
            discard_for_rebuild("distill", self.rebuild, folder)
            result_file = folder / "result.json"
            if result_file.is_file():
                return json.loads(result_file.read_text())
            remove_leftovers(folder, ".student.*")  # a save cut short by a kill
            if (folder / "student" / TRAINING_RECORD).is_file():  # killed after saving, before the result
                log.info("%s: the student was saved by an earlier run; evaluating it", folder)
                return self._finish_student(folder, name, load_causal_lm(folder / "student"), None)
            module = self._student_module(
                student_factory, loss_terms, optimizer, scheduler, teacher_factory, loss_chunk_size,
                module_factory, student_module,
            )  # fmt: skip
            datamodule.connect(self.pad_id, train, heldout, stores)
            trainer = self.trainer_factory(folder, name, max_epochs=max_epochs, overrides=trainer_overrides)
            start = time.perf_counter()
            trainer.fit(module, datamodule=datamodule, ckpt_path=_last_checkpoint(folder))
            seconds = time.perf_counter() - start
            best = restore_best_checkpoint(module, trainer)
            training = {
                "name": name,
                "loss_chunk_size": getattr(module, "loss_chunk_size", None),
                "terms": {n: t.weight for n, t in getattr(module, "loss_terms", {}).items()},
                "module": type(module).__name__,
                "train_seconds": seconds,
                **({"best_checkpoint": best} if best else {}),
                **timing_summary(module),
            }
            # the student and what its result needs from training land in one rename
            tmp = Path(tempfile.mkdtemp(prefix=".student.", dir=folder))
            if hasattr(module.student, "save_pretrained"):
                module.student.save_pretrained(tmp)
                self.tokenizer.save_pretrained(tmp)
            atomic_json(tmp / TRAINING_RECORD, training)
            fault_point("distill:before-student-rename")
            if (folder / "student").exists():  # a student of an older layout, without its record
                shutil.rmtree(folder / "student")
            os.replace(tmp, folder / "student")
            fault_point("distill:student-saved")
            return self._finish_student(folder, name, module.student, trainer)

    def _finish_student(
        self, folder: Path, name: str, student: nn.Module, trainer: Trainer | None
    ) -> dict[str, Any]:
        """Held-out NLL of a saved student, logged and written as ``result.json`` (never a non-finite one)."""
        _, heldout = self.corpora()
        training = json.loads((folder / "student" / TRAINING_RECORD).read_text())
        metrics = heldout_nll(student, heldout, self.pad_id, desc=f"eval {name}")
        if trainer is not None:
            close_loggers(trainer, {f"heldout/{k}": v for k, v in metrics.items()})
        require_finite(
            metrics,
            f"student {name!r}",
            f"training diverged, so nothing was cached; lower optimizer.lr or check the soft-label stores ({folder})",
        )
        result = {**training, **metrics, "name": name, "folder": str(folder)}
        atomic_json(folder / "result.json", result)
        return result

    def _student_module(
        self,
        student_factory: Callable[[], nn.Module],
        loss_terms: Mapping[str, LossTerm],
        optimizer: Callable,
        scheduler: Callable | None,
        teacher_factory: Callable[[], nn.Module] | None,
        loss_chunk_size: int | None,
        module_factory: Callable[..., nn.Module] | None,
        student_module: Callable[..., nn.Module] | None,
    ) -> nn.Module:
        """The LightningModule that trains the student (see :meth:`distill`)."""
        student = student_factory()
        student_vocab = int(getattr(getattr(student, "config", None), "vocab_size", 0) or 0)
        if student_vocab and student_vocab < self.vocab_size():
            raise ValueError(
                f"the student has config.vocab_size={student_vocab} but the tokenizer {self.tokenizer_path} "
                f"has {self.vocab_size()} ids; use a student built for this tokenizer"
            )
        if module_factory is not None:
            if teacher_factory is None:
                raise ValueError(
                    "on-policy methods (minillm, gkd, distillm) score the student's samples under an open teacher: "
                    "add teacher=smollm2 (or teacher=local teacher.path=<HF folder>)"
                )
            module = build_method_module(
                module_factory, student, teacher_factory(), self.tokenizer, loss_terms, optimizer, scheduler
            )
        elif student_module is not None:
            extra = {"teacher": teacher_factory()} if teacher_factory is not None else {}
            try:
                module = student_module(
                    student=student,
                    loss_terms=loss_terms,
                    optimizer=optimizer,
                    scheduler=scheduler,
                    loss_chunk_size=loss_chunk_size,
                    **extra,
                )
            except TypeError as err:
                name = getattr(getattr(student_module, "func", student_module), "__name__", "the module")
                hint = (
                    "drop teacher= or choose module=online_teacher"
                    if extra
                    else "it may need teacher= (an online teacher)"
                )
                raise ValueError(
                    f"module {name} cannot be built with these arguments ({err}); {hint}"
                ) from err
        elif teacher_factory is not None:
            module = OnlineTeacherDistillModule(
                student,
                teacher_factory(),
                loss_terms,
                optimizer=optimizer,
                scheduler=scheduler,
                loss_chunk_size=loss_chunk_size,
            )
        else:
            module = DistillModule(
                student, loss_terms, optimizer=optimizer, scheduler=scheduler, loss_chunk_size=loss_chunk_size
            )
        return module

    def trained_students(self) -> list[tuple[str, Path]]:
        """(name, folder) of every student this workspace has finished training, oldest first."""
        found = []
        for result in sorted(
            Path(self.workspace.root).glob("distill/*/result.json"), key=lambda p: p.stat().st_mtime
        ):
            folder = result.parent / "student"
            if (folder / "config.json").is_file():
                found.append((json.loads(result.read_text())["name"], folder))
        return found

    def evaluate(self, name: str, model_path: str | Path, spec: EvaluationSpec) -> dict[str, Any]:
        """Held-out metrics of one model (NLL, ppl, token accuracy, ECE, ROUGE-L), cached per model and spec."""
        _, heldout = self.corpora()
        key = settings_key(
            {
                "model": model_identity(str(model_path)),
                "heldout": heldout.fingerprint,
                "spec": asdict(spec),
                **({"teacher": model_identity(str(self.teacher_path))} if spec.reverse_kl_limit else {}),
                "code": self.code.get("eval"),
            }
        )
        path = self.workspace.path("eval", key + ".json")
        with artifact_lock(path):
            discard_for_rebuild("eval", self.rebuild, path)
            if path.is_file():
                return json.loads(path.read_text())
            result = self._evaluate(name, model_path, spec)
            require_finite(result, f"model {model_path}", "not cached; check the model's weights")
            atomic_json(path, result)
            return result

    def _evaluate(self, name: str, model_path: str | Path, spec: EvaluationSpec) -> dict[str, Any]:
        _, heldout = self.corpora()
        model = freeze(load_causal_lm(model_path))
        self.check_shares_tokenizer(model, str(model_path), "evaluated model")
        teacher = None
        if spec.reverse_kl_limit:
            if self.teacher_path is None:
                raise ValueError(
                    "evaluation.reverse_kl_limit > 0 measures the reverse KL to an open teacher: add teacher=smollm2 "
                    "(or teacher=local teacher.path=<HF folder>), or set evaluation.reverse_kl_limit=0"
                )
            teacher = freeze(load_causal_lm(self.teacher_path))
            self.check_shares_tokenizer(teacher, str(self.teacher_path), "teacher")
        return {
            "name": name,
            "model": str(model_path),
            **evaluate_model(model, self.tokenizer, heldout, spec, teacher=teacher),
        }

    def proxy_heldout(self, aligned: bool) -> dict[str, Any]:
        """Held-out NLL of the proxy before or after alignment (cached)."""
        _, heldout = self.corpora()
        key = settings_key(
            {
                "proxy": self.aligned_proxy_key() if aligned else self.proxy_identity(),
                "heldout": heldout.fingerprint,
                "code": self.code.get("eval"),
            }
        )
        path = self.workspace.path("eval", key + ".json")
        with artifact_lock(path):
            discard_for_rebuild("eval", self.rebuild, path)
            if path.is_file():
                return json.loads(path.read_text())
            model = load_causal_lm(self.aligned_proxy() if aligned else self.proxy_path)
            name = "proxy (aligned)" if aligned else "proxy (before alignment)"
            result = {"name": name, **heldout_nll(freeze(model), heldout, self.pad_id, desc=f"eval {name}")}
            require_finite(result, name, "not cached; check the proxy's weights")
            atomic_json(path, result)
            return result


def require_finite(metrics: Mapping[str, Any], what: str, fix: str) -> None:
    """Refuse to cache a result whose NLL is NaN or infinite (it would also be invalid JSON)."""
    nll = metrics.get("nll")
    if isinstance(nll, float) and not math.isfinite(nll):
        raise ValueError(f"{what} has a non-finite held-out NLL ({nll}): {fix}")


TRAINING_RECORD = "kdl_training.json"
"""Saved inside a trained student's folder: what its ``result.json`` needs from training (seconds, terms,
best checkpoint), so a run killed between saving the student and writing the result can finish it."""


def _stats_path(folder: Path) -> Path:
    return folder.parent / f"{folder.name}.stats.json"


def _partial_path(folder: Path) -> Path:
    return folder.with_name(folder.name + ".partial")


def _first_sequences(corpus: TokenizedCorpus, n: int) -> TokenizedCorpus:
    n = min(n, len(corpus))
    end = int(corpus.offsets[n])
    return TokenizedCorpus(
        corpus.tokens[:end],
        corpus.offsets[: n + 1].copy(),
        corpus.prompt_lens[:n].copy(),
        corpus.report,
        None if corpus.record_keys is None else corpus.record_keys[:n],
    )


def close_loggers(trainer: Trainer, metrics: Mapping[str, float] | None = None) -> None:
    """Log a run's final figures (e.g. held-out NLL) to its own loggers, then close them.

    The figures land in the same wandb run / CSV file as the training curves, so a dashboard or
    ``kdl report`` finds them with the run's config. A wandb run is finished so that the next stage of a
    pipeline or multirun job starts a fresh one.
    """
    import sys

    for logger in trainer.loggers:
        if metrics:
            logger.log_metrics(dict(metrics), step=trainer.global_step)
        logger.finalize("success")
    wandb = sys.modules.get("wandb")  # only if a logger imported it
    if wandb is not None and wandb.run is not None:
        wandb.finish()


def build_method_module(
    factory: Callable[..., nn.Module],
    student: nn.Module,
    teacher: nn.Module,
    tokenizer: Any,
    loss_terms: Mapping[str, LossTerm],
    optimizer: Callable,
    scheduler: Callable | None,
) -> nn.Module:
    """Call a method's module partial with what it takes (MiniLLM has no loss terms; GKD/DistiLLM do)."""
    import inspect

    target = getattr(factory, "func", factory)
    accepted = inspect.signature(target).parameters
    arguments: dict[str, Any] = {
        "student": student,
        "teacher": teacher,
        "tokenizer": tokenizer,
        "optimizer": optimizer,
        "scheduler": scheduler,
    }
    if "loss_terms" in accepted:
        arguments["loss_terms"] = loss_terms
    elif set(loss_terms) - {"hard_ce"}:
        raise ValueError(
            f"{target.__name__} has its own objective and takes no loss terms, but loss={list(loss_terms)}; "
            "use loss=[hard_ce] (ignored) with method=minillm, or a word-level method (gkd, distillm)"
        )
    return factory(**arguments)


def restore_best_checkpoint(module: nn.Module, trainer: Trainer) -> str | None:
    """Load the best monitored checkpoint back into a module that asks for it (``select_best_checkpoint``)."""
    if not getattr(module, "select_best_checkpoint", False):
        return None
    best = getattr(trainer.checkpoint_callback, "best_model_path", "") if trainer.checkpoint_callback else ""
    if not best or not Path(best).is_file():
        log.warning("no best checkpoint was recorded (was validation run?); keeping the final student")
        return None
    state = torch.load(best, map_location="cpu", weights_only=True)["state_dict"]
    module.load_state_dict(state)
    log.info("restored the best checkpoint %s", best)
    return best


def timing_summary(module: nn.Module) -> dict[str, float]:
    """Mean rollout and update seconds per training step, for modules that time them (on-policy methods)."""
    timing: Mapping[str, list[float]] = getattr(module, "step_seconds", None) or {}
    return {f"{key}_per_step": sum(v) / len(v) for key, v in timing.items() if v}


def _last_checkpoint(folder: Path) -> str | None:
    last = folder / "checkpoints" / "last.ckpt"
    if last.is_file():
        log.info("resuming from %s", last)
        return str(last)
    return None


def results_table(rows: list[Mapping[str, Any]]) -> str:
    """A markdown table of held-out results."""
    extra = [
        (key, title)
        for key, title in (
            ("token_accuracy", "token acc."),
            ("ece", "ECE"),
            ("rouge_l", "ROUGE-L"),
            ("reverse_kl", "reverse KL to teacher"),
            ("rollout_seconds_per_step", "rollout s/step"),
            ("update_seconds_per_step", "update s/step"),
        )
        if any(key in row for row in rows)
    ]
    lines = [
        "| model | held-out NLL (nats/token) | perplexity | tokens | train s |"
        + "".join(f" {title} |" for _, title in extra),
        "|---|---:|---:|---:|---:|" + "---:|" * len(extra),
    ]
    for row in rows:
        train_s = f"{row['train_seconds']:.0f}" if "train_seconds" in row else ""
        cells = "".join(f" {row[key]:.4f} |" if key in row else " |" for key, _ in extra)
        lines.append(
            f"| {row['name']} | {row['nll']:.4f} | {row['ppl']:.2f} | {row['tokens']} | {train_s} |{cells}"
        )
    return "\n".join(lines)


def evaluation_table(rows: list[Mapping[str, Any]]) -> str:
    """A markdown table of ``kdl evaluate`` rows."""
    # question-set columns (``<set>/mc_accuracy``, ``<set>/answer_match``) in the order they first appear
    questions = [
        key
        for key in dict.fromkeys(k for row in rows for k in row)
        if key.endswith(("/mc_accuracy", "/answer_match"))
    ]
    if any("reverse_kl" in row for row in rows):
        questions.insert(0, "reverse_kl")
    lines = [
        "| model | NLL | perplexity | token acc. | ECE | ROUGE-L | generated |"
        + "".join(f" {q} |" for q in questions),
        "|---|---:|---:|---:|---:|---:|---:|" + "---:|" * len(questions),
    ]
    for row in rows:
        rouge = f"{row['rouge_l']:.4f}" if "rouge_l" in row else ""
        cells = "".join(f" {row[q]:.3f} |" if q in row else " |" for q in questions)
        lines.append(
            f"| {row['name']} | {row['nll']:.4f} | {row['ppl']:.2f} | {row['token_accuracy']:.4f} | "
            f"{row['ece']:.4f} | {rouge} | {row.get('generated', '')} |{cells}"
        )
    return "\n".join(lines)


def summarize_store(store: SoftLabelStore) -> dict[str, float]:
    """Mean top-1 probability, mean tail mass and mean entropy over the stored entries (for logs and reports)."""
    rows = store.all_rows()
    p = np.asarray(rows.probs, dtype=np.float64)
    entropy = -(np.where(p > 0, p * np.log(np.maximum(p, 1e-30)), 0.0)).sum(1)
    return {
        "rows": len(p),
        "mean_top1": float(p[:, 0].mean()),
        "mean_tail": float(np.asarray(rows.tail).mean()),
        "mean_entropy_topk_nats": float(entropy.mean()),
    }


def fidelity_estimates(pipeline: Pipeline, spec: FidelitySpec) -> list[Estimate]:
    """Every estimate ``kdl fidelity`` scores, building (or reusing) the prior and posterior stores.

    One-hot labels and label smoothing need nothing; the prior is built per (n, γ) and the posterior per R
    on copies of ``pipeline`` that differ only in that setting, so every store is cached as usual and a
    later ``kdl distill`` with the same settings reuses it.
    """
    vocab = pipeline.vocab_size()
    estimates = [Estimate("one-hot", {}, lambda observed: one_hot_estimate(observed, vocab), "one-hot")]
    for eps in spec.label_smoothing:
        estimates.append(
            Estimate(
                f"label smoothing ε={eps:g}",
                {"label_smoothing": eps},
                lambda observed, e=eps: label_smoothing_estimate(observed, vocab, e),
                "label smoothing",
            )
        )
    for n in spec.ngram_orders:
        for gamma in spec.gammas:
            variant = copy.copy(pipeline)
            variant.prior_estimator = copy.copy(pipeline.prior_estimator)
            variant.prior_estimator.ngram_order, variant.prior_estimator.gamma = n, gamma
            estimates.append(
                Estimate(
                    f"prior n={n} γ={gamma:g}",
                    {"ngram_order": n, "gamma": gamma},
                    store_estimate(variant.prior(), vocab),
                    f"prior γ={gamma:g}",
                )
            )
    base = pipeline.prior_estimator
    for rounds in spec.sampling_rounds:
        variant = copy.copy(pipeline)
        variant.posterior_estimator = copy.copy(pipeline.posterior_estimator)
        variant.posterior_estimator.sampling_rounds = rounds
        estimates.append(
            Estimate(
                f"posterior R={rounds} (prior n={base.ngram_order} γ={base.gamma:g})",
                {"ngram_order": base.ngram_order, "gamma": base.gamma, "sampling_rounds": rounds},
                store_estimate(variant.posterior(), vocab),
                f"posterior (prior n={base.ngram_order} γ={base.gamma:g})",
            )
        )
    return estimates
