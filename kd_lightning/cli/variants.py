"""A pipeline's variants from the config: each student of ``kdl pipeline`` (``variants:``), with its own
settings (loss terms, module, trainer, optimizer, overrides, proxy, alignment, store settings), once per seed."""

from __future__ import annotations

from typing import Any

from hydra.utils import instantiate
from omegaconf import DictConfig, OmegaConf, open_dict

from kd_lightning.cli.build import align_code, model_path, resolved, stage_code, student_run
from kd_lightning.stages.compare import Variant
from kd_lightning.stages.registry import ARTIFACTS

VARIANT_KEYS = (
    "loss", "module", "init_from", "trainer", "optimizer", "overrides", "proxy", "alignment", "store_format",
    "teacher_targets", "seeds", "family", "report",
)  # fmt: skip
VARIANT_STORE_SETTINGS = {
    "estimator.prior": "prior_estimator",
    "estimator.posterior": "posterior_estimator",
    "store_format": "store_format",
    "estimator.teacher_targets": "teacher_targets",
}
"""Config entries a variant may change (through ``overrides`` or its own keys) that its stores are built
from, and the StageContext field each one sets."""


def variant_config(cfg: DictConfig, spec: DictConfig) -> DictConfig:
    """The run's config as one variant sees it: its ``overrides`` (dotted key → value, any setting: loss
    weights, a term's settings, ``estimator.prior.gamma``, ``kd_weight_schedule.kind`` ...), its
    ``optimizer`` settings (e.g. ``{lr: 1.0e-5}``), its ``store_format`` and ``teacher_targets``."""
    changes = dict(spec.get("overrides") or {})
    changes.update({f"optimizer.{key}": value for key, value in (spec.get("optimizer") or {}).items()})
    for key in ("store_format", "teacher_targets"):
        if spec.get(key) is not None:
            changes["store_format" if key == "store_format" else "estimator.teacher_targets"] = spec[key]
    if not changes:
        return cfg
    local = cfg.copy()
    with open_dict(local):
        for key, value in changes.items():
            if OmegaConf.select(local, str(key), default=_MISSING) is _MISSING and not str(key).startswith(
                "+"
            ):
                raise KeyError(
                    f"variant override {key!r} names no setting of this run (check the spelling, e.g. "
                    "prior_kl_weight, estimator.prior.gamma, loss.prior_kl.decoupled, optimizer.lr)"
                )
            OmegaConf.update(local, str(key).lstrip("+"), value, merge=False, force_add=True)
    return local


_MISSING = object()


def variant_stores(base: DictConfig, local: DictConfig) -> tuple[dict[str, Any], dict[str, str]]:
    """The StageContext fields a variant's config changes for its stores (its prior and posterior settings,
    ``store_format``, ``teacher_targets``), with the code fingerprints of the store stages under them."""
    settings: dict[str, Any] = {}
    for entry, field_name in VARIANT_STORE_SETTINGS.items():
        mine, theirs = OmegaConf.select(local, entry), OmegaConf.select(base, entry)
        if mine is not None and resolved(mine) != resolved(theirs):
            settings[field_name] = instantiate(mine)
    if not settings:
        return {}, {}
    code = stage_code(local)
    changed = {entry for entry, field_name in VARIANT_STORE_SETTINGS.items() if field_name in settings}
    return settings, {kind.name: code[kind.name] for kind in ARTIFACTS if changed & set(kind.config)}


def with_seed(cfg: DictConfig, seed: int | None) -> DictConfig:
    """The config with ``seed`` set (everything that interpolates ``${seed}`` follows), or itself."""
    if seed is None or seed == cfg.get("seed"):
        return cfg
    copy = cfg.copy()
    with open_dict(copy):
        copy.seed = int(seed)
    return copy


def with_seeds(cfg: DictConfig, seeds: list[int], names: list[str] | None = None) -> DictConfig:
    """The config with ``seeds`` (and only the variants ``names``, if given): a search's candidates, trained
    once, and its finals, trained with every final seed. A variant with its own ``seeds`` keeps those of
    them that are among ``seeds`` (or the first of ``seeds``)."""
    copy = cfg.copy()
    with open_dict(copy):
        copy.seeds = list(seeds)
        node = "variants" if copy.get("variants") is not None else "default_variants"
        specs = copy[node] or {}
        for name in list(specs):
            if names is not None and name not in names:
                del specs[name]
            elif OmegaConf.is_dict(specs[name]) and specs[name].get("seeds") is not None:
                own = [seed for seed in specs[name].seeds if seed in seeds]
                specs[name].seeds = own or list(seeds)[:1]
    return copy


def report_flag(name: str, value: Any) -> bool:
    """A variant's ``report``: a boolean (a string such as "no" would read as true)."""
    if not isinstance(value, bool):
        raise ValueError(
            f"variants.{name}.report must be true or false, got {value!r}: "
            "report: false trains the variant only for others to start from"
        )
    return value


def variants(cfg: DictConfig) -> list[Variant]:
    """``cfg.variants`` as Variants: each a list of loss terms, or ``{loss, module, init_from, trainer,
    optimizer, overrides, proxy, alignment, store_format, teacher_targets, seeds, family, report}``, once per seed of
    ``cfg.seeds`` (seed-major: every variant of the first seed first).

    ``module`` is a module config node (an experiment composes one with a defaults entry such as
    ``/module@variants.minillm.module: minillm``); ``init_from`` names an earlier variant whose student (of the
    same seed) this one starts from; ``trainer`` overrides trainer settings for this variant only; ``proxy``
    is a proxy config node (``- /proxy@variants.<name>.proxy: gemma3_270m``) whose posterior this variant's
    terms read; ``alignment`` an alignment config node (``- /alignment@variants.<name>.alignment: proxy_kd``)
    of the proxy its posterior and proxy-agreement stores come from, resolved under the variant's seed;
    ``seeds`` replaces ``cfg.seeds`` for this variant (e.g. ``[0]`` for an untrained student);
    ``optimizer`` sets optimizer settings for this variant (``{lr: 1.0e-5}``); ``overrides`` sets any other
    setting for it (``{prior_kl_weight: 0.1, estimator.prior.gamma: 10, loss.prior_kl.decoupled: true}``),
    its stores included (:func:`variant_config`); ``family`` names the group a search selects the best
    member of (``kdl pipeline`` with ``search:``); ``report: false`` trains a variant only for others to start
    from (GAD's discriminator warm-up), unscored and out of the tables. A null entry is dropped.
    """
    listed = cfg.get("variants")
    node = "variants" if listed is not None else "default_variants"
    specs = {name: spec for name, spec in (cfg.get(node) or {}).items() if spec is not None}
    for name, spec in specs.items():
        if not OmegaConf.is_dict(spec):
            continue
        if "method" in spec or "method_settings" in spec:
            raise KeyError(
                f"variant {name!r}: method/method_settings became module (a module config node); compose one "
                f"with the defaults entry `- /module@variants.{name}.module: <minillm|gkd|distillm>` and set "
                f"its settings under variants.{name}.module (see conf/experiment/onpolicy_compare.yaml)"
            )
        unknown = set(spec) - set(VARIANT_KEYS)
        if unknown:
            raise KeyError(
                f"variant {name!r} has unknown keys {sorted(unknown)}; use {', '.join(VARIANT_KEYS)}"
            )
    default_seeds = list(cfg.get("seeds") or [None])
    every_seed = list(
        dict.fromkeys(
            [
                *default_seeds,
                *(s for spec in specs.values() if OmegaConf.is_dict(spec) for s in spec.get("seeds") or []),
            ]
        )
    )
    found = []
    for seed in every_seed:
        seeded = with_seed(cfg, seed)
        for name, spec in specs.items():
            own_seeds = list(spec.get("seeds") or default_seeds) if OmegaConf.is_dict(spec) else default_seeds
            if seed not in own_seeds:
                continue
            label = f"student {name}" + ("" if seed is None or len(every_seed) == 1 else f" (seed {seed})")
            if not OmegaConf.is_dict(spec):
                found.append(Variant(name, student_run(seeded, label, list(spec)), seed=seed))
                continue
            spec = seeded[node][name]
            local = variant_config(seeded, spec)
            trainer = resolved(spec.trainer) if spec.get("trainer") else None
            run = student_run(
                local, label, list(spec.get("loss") or ["hard_ce"]), spec.get("module"), trainer
            )
            proxy = None
            if spec.get("proxy") is not None:
                proxy = (model_path(spec.proxy.path), bool(spec.proxy.get("own_tokenizer", False)))
            alignment = None
            if spec.get("alignment") is not None:  # resolved under this seed, like the rest of the variant
                alignment = (instantiate(spec.alignment), align_code(spec.alignment))
            found.append(
                Variant(
                    name,
                    run,
                    spec.get("init_from"),
                    seed,
                    proxy,
                    alignment,
                    variant_stores(seeded, local),
                    family=spec.get("family"),
                    report=report_flag(name, spec.get("report", True)),
                )
            )
    return found
