"""The aligned-proxy artifact: the open proxy fine-tuned (SFT, optionally LoRA) on the teacher's text.

The paper aligns the proxy to the closed teacher before sampling it for the posterior, so the proxy's
distributions start from the teacher's style rather than its own. Training reuses
:class:`~kd_lightning.modules.distill.DistillModule` with the single term ``hard_ce``.
"""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch
from lightning import Trainer
from torch import nn

from kd_lightning.artifacts import Workspace, fault_point, model_identity, remove_leftovers, settings_key
from kd_lightning.atomic import atomic_folder
from kd_lightning.data.corpus import Corpus, first_sequences
from kd_lightning.data.cross_tokenizer import ForeignTokenizer
from kd_lightning.data.datamodule import TeacherTextDataModule
from kd_lightning.data.tokenized import TokenizedCorpus
from kd_lightning.losses.terms import HardCrossEntropy
from kd_lightning.models.loading import load_causal_lm
from kd_lightning.models.size import parameter_count
from kd_lightning.modules.distill import DistillModule
from kd_lightning.modules.preference import (
    PreferenceModule,
    PreferenceStep,
    pair_loader,
    preference_pairs,
    write_report,
)
from kd_lightning.modules.training import close_loggers, last_checkpoint

TrainerFactory = Callable[..., Trainer]
"""``(folder, run_name, max_epochs=None, validate=True, overrides=None) -> Trainer`` (loggers included)."""


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
    preference: PreferenceStep | None = None
    """Proxy-KD's second step after SFT (``alignment=proxy_kd``): DPO toward the teacher's answers."""
    packing: bool = False
    """Pack each batch's records into rows (``datamodule.packing``): same records per step, less padding."""
    pack_length: int | None = None

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


def aligned_proxy_provenance(
    corpus: Corpus, proxy_path: str, alignment: ProxyAlignment, code: str | None, own_tokenizer: bool = False
) -> dict[str, Any]:
    """What the aligned proxy depends on; with a preference step, its settings too (the SFT artifact's own
    key leaves them out, so it is shared by every preference setting)."""
    settings = asdict(alignment)
    preference = settings.pop("preference")
    return {
        "proxy": model_identity(proxy_path),
        "corpus": corpus.full_train.fingerprint,
        "alignment": settings,
        "code": code,
        **({"own_tokenizer": True} if own_tokenizer else {}),
        **({"preference": preference} if preference is not None else {}),
    }


def aligned_proxy_key(
    corpus: Corpus, proxy_path: str, alignment: ProxyAlignment, code: str | None, own_tokenizer: bool = False
) -> str:
    """The aligned proxy's cache key (the posterior's provenance names it)."""
    return settings_key(aligned_proxy_provenance(corpus, proxy_path, alignment, code, own_tokenizer))


def aligned_proxy(
    workspace: Workspace,
    corpus: Corpus,
    proxy_path: str,
    alignment: ProxyAlignment,
    trainer_factory: TrainerFactory,
    code: str | None = None,
    own: ForeignTokenizer | None = None,
) -> Path:
    """Fine-tune the proxy on the training corpus and return the saved HF folder (cached, resumable).

    A proxy of another tokenizer (``own``) is fine-tuned on its own tokenization of the records.
    """

    def build(folder: Path) -> Path:
        final = folder / "model"
        remove_leftovers(folder, ".model.*")  # a save of an earlier layout, cut short
        proxy = load_causal_lm(proxy_path)
        records = corpus.full_train
        if alignment.max_records is not None:
            records = first_sequences(records, alignment.max_records)
        if own is None:
            corpus.check_model_vocabulary(proxy, proxy_path, "proxy")
            train, pad_id, tokenizer = records, corpus.pad_id, corpus.tokenizer
        else:  # only the records it trains on are read through its tokenizer
            train = own.view(records, corpus.tokenizer).corpus
            pad_id, tokenizer = int(own.tokenizer.pad_token_id or 0), own.tokenizer
        model = _fine_tune(proxy, train, pad_id, alignment, trainer_factory, folder)
        with atomic_folder(final, lambda: fault_point("align:before-rename")) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
        return final

    if alignment.preference is not None and own is not None:
        raise ValueError(
            "alignment.preference (Proxy-KD) with a proxy of another tokenizer is not supported; use a proxy "
            "of the student's tokenizer (proxy.own_tokenizer=false), or alignment=sft"
        )
    sft_only = replace(alignment, preference=None)
    provenance = aligned_proxy_provenance(corpus, proxy_path, sft_only, code, own is not None)
    sft = workspace.cached(
        "align",
        provenance,
        build,
        lambda folder: folder / "model",
        done="model/config.json",
        size_hint=lambda: 4.0 * parameter_count(proxy_path),  # fp32 safetensors
    )
    if alignment.preference is None:
        return sft
    return preferred_proxy(workspace, corpus, sft, settings_key(provenance), alignment, trainer_factory, code)


def preferred_proxy(
    workspace: Workspace,
    corpus: Corpus,
    sft: Path,
    sft_key: str,
    alignment: ProxyAlignment,
    trainer_factory: TrainerFactory,
    code: str | None,
) -> Path:
    """The SFT proxy after Proxy-KD's preference step (:mod:`kd_lightning.modules.preference`), cached."""
    step = alignment.preference
    assert step is not None

    def build(folder: Path) -> Path:
        final = folder / "model"
        remove_leftovers(folder, ".model.*")
        tokenizer = corpus.tokenizer
        if tokenizer.eos_token_id is None or tokenizer.pad_token_id is None:
            raise ValueError("alignment.preference samples answers: the tokenizer needs EOS and pad ids")
        records = corpus.full_train
        if alignment.max_records is not None:
            records = first_sequences(records, alignment.max_records)
        policy = load_causal_lm(sft)
        pairs, counts = preference_pairs(
            policy, records, tokenizer.eos_token_id, tokenizer.pad_token_id, step
        )
        if not pairs:
            raise ValueError(
                f"alignment.preference: no preference pairs left ({counts['prompts']} training prompts, "
                f"{counts['dropped_equal']} samples equal to the teacher's answer); train on more records "
                "(alignment.max_records) or raise alignment.preference.samples / generation_temperature"
            )
        if alignment.lora_rank:
            policy = _with_lora(policy, alignment)
        torch.manual_seed(step.seed)
        module = PreferenceModule(policy, load_causal_lm(sft), step.beta, step.learning_rate)
        trainer = trainer_factory(
            folder, "align-preference", max_epochs=step.max_epochs, validate=False,
            overrides={"strategy": "auto", "devices": 1},
        )  # fmt: skip
        loader = pair_loader(pairs, tokenizer.pad_token_id, step)
        trainer.fit(module, train_dataloaders=loader, ckpt_path=last_checkpoint(folder))
        close_loggers(trainer)
        model = module.policy.merge_and_unload() if alignment.lora_rank else module.policy
        with atomic_folder(final, lambda: fault_point("align:before-rename")) as tmp:
            model.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            write_report(tmp, counts, {"sft": str(sft)})
        shutil.rmtree(folder / "checkpoints", ignore_errors=True)
        return final

    provenance = {
        "sft": sft_key,
        "preference": asdict(step),
        "records": alignment.max_records,
        "lora": [alignment.lora_rank, alignment.lora_alpha],
        "code": code,
    }
    return workspace.cached(
        "align", provenance, build, lambda folder: folder / "model", done="model/config.json"
    )


def _fine_tune(
    proxy: nn.Module,
    train: TokenizedCorpus,
    pad_id: int,
    cfg: ProxyAlignment,
    trainer_factory: TrainerFactory,
    folder: Path,
) -> nn.Module:
    if cfg.lora_rank:
        proxy = _with_lora(proxy, cfg)
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
    data = TeacherTextDataModule(
        batch_size=cfg.batch_size, shuffle_seed=cfg.seed, packing=cfg.packing, pack_length=cfg.pack_length
    ).connect(pad_id, train)
    # one process: a data-parallel launcher would re-run the command, and its ranks would wait on the
    # posterior that this alignment is being built for (kdl distill/pipeline hold its lock meanwhile)
    trainer = trainer_factory(
        folder,
        "align",
        max_epochs=cfg.max_epochs,
        validate=False,
        overrides={"strategy": "auto", "devices": 1},
    )
    trainer.fit(module, datamodule=data, ckpt_path=last_checkpoint(folder))
    close_loggers(trainer)
    model = module.student
    return model.merge_and_unload() if cfg.lora_rank else model


def _with_lora(model: nn.Module, cfg: ProxyAlignment) -> nn.Module:
    try:
        from peft import LoraConfig, get_peft_model  # optional dependency (kd_lightning[lora])
    except ImportError:
        raise RuntimeError(
            "alignment.lora_rank > 0 (alignment=lora, alignment=proxy_kd) needs peft, which kd_lightning installs; "
            "reinstall it: pip install 'kd_lightning[lora]'"
        ) from None
    config = LoraConfig(
        r=cfg.lora_rank,
        lora_alpha=cfg.lora_alpha,
        task_type="CAUSAL_LM",
        target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"],
    )
    return get_peft_model(model, config)
