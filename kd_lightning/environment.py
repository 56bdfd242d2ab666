"""Where things are at run time: environment settings, the packaged Hydra configs, the package version.

Nothing here depends on the repository checkout: an installed wheel carries its configs as the package
data folder ``kd_lightning/conf`` (built from the repository's top-level ``conf/``), and a checkout or an
editable install finds the top-level folder itself.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

# Prefixes of the environment variables this project (or a library it drives) reads. A variable that is
# set but blank (``WANDB_MODE=``) means "unset" to a user; wandb and others would instead try to parse "".
BLANK_MEANS_UNSET = ("KDL_", "WANDB_", "HF_", "HUGGINGFACE_", "TRANSFORMERS_", "OPENAI_")


def env_setting(name: str, default: str | None = None) -> str | None:
    """``os.environ[name]``, with a blank or whitespace-only value treated as unset."""
    value = os.environ.get(name)
    return value if value is not None and value.strip() else default


def drop_blank_environment(prefixes: tuple[str, ...] = BLANK_MEANS_UNSET) -> list[str]:
    """Remove blank variables with these prefixes from ``os.environ``; returns their names.

    Called once by the CLI before any library reads its settings, so ``WANDB_MODE=`` behaves like an unset
    ``WANDB_MODE`` everywhere (Hydra's ``oc.env`` defaults included).
    """
    dropped = [k for k, v in os.environ.items() if k.startswith(prefixes) and not v.strip()]
    for key in dropped:
        del os.environ[key]
    return dropped


class ConfigNotFoundError(RuntimeError):
    """No Hydra config folder could be found; the message says how to fix it."""


def conf_dir() -> Path:
    """The folder of the shipped Hydra configs.

    In order: ``$KDL_CONF``; ``kd_lightning/conf`` inside an installed wheel; the package data mapped by an
    editable install; the repository's top-level ``conf/`` next to the package (a plain checkout). User
    configs are added on top with Hydra's search path (``hydra.searchpath=[file://./my_conf]``), never by
    editing these.
    """
    override = env_setting("KDL_CONF")
    if override:
        return Path(override).expanduser()
    package = Path(__file__).resolve().parent
    candidates = [package / "conf"]
    spec = importlib.util.find_spec("kd_lightning.conf")
    if spec is not None and spec.submodule_search_locations:
        candidates += [Path(p) for p in spec.submodule_search_locations]
    candidates.append(package.parent / "conf")
    for folder in candidates:
        if (folder / "kdl.yaml").is_file():
            return folder
    raise ConfigNotFoundError(
        "kd_lightning's configs are missing (looked in "
        + ", ".join(str(c) for c in candidates)
        + "); reinstall the package (`pip install --force-reinstall kd_lightning`) or set KDL_CONF=<folder>"
    )


def package_version() -> str:
    """The installed distribution's version (``0+unknown`` when run from a bare source tree)."""
    try:
        return importlib.metadata.version("kd_lightning")
    except importlib.metadata.PackageNotFoundError:
        return "0+unknown"


SECRET_NAME = re.compile(r"(KEY|TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIAL)", re.IGNORECASE)
_URL_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)[^/\s@]+@")
_BEARER = re.compile(r"(?i)(bearer\s+)[A-Za-z0-9._~+/=-]+")
_QUERY_SECRET = re.compile(r"(?i)([?&](?:api[_-]?key|key|token|access[_-]?token|sig|signature)=)[^&\s\"']+")


def redact(text: str, secrets: tuple[str, ...] | None = None) -> str:
    """``text`` with credentials removed: URL user-info, bearer tokens, secret query parameters, and the
    values of environment variables whose names say they are secrets (``*_API_KEY``, ``*_TOKEN``...)."""
    text = _URL_USERINFO.sub(r"\g<scheme>***@", text)
    text = _BEARER.sub(r"\1***", text)
    text = _QUERY_SECRET.sub(r"\1***", text)
    for value in secret_values() if secrets is None else secrets:
        text = text.replace(value, "***")
    return text


def secret_values() -> tuple[str, ...]:
    """Values (8+ characters) of environment variables named like secrets, longest first."""
    values = {v for k, v in os.environ.items() if SECRET_NAME.search(k) and len(v.strip()) >= 8}
    return tuple(sorted(values, key=len, reverse=True))


class RedactSecrets(logging.Filter):
    """A handler filter that rewrites every record's message through :func:`redact` before it is written.

    Installed on the root logger's handlers (Hydra's console and ``main.log``), so records that
    libraries log (httpx's "HTTP Request: POST http://user:KEY@host/..." at INFO) are cleaned too.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact(message)
        if clean != message:
            record.msg, record.args = clean, ()
        if record.exc_info and not record.exc_text:
            record.exc_text = redact(logging.Formatter().formatException(record.exc_info))
        elif record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True


def install_log_redaction() -> None:
    """Add :class:`RedactSecrets` to every handler of the root logger (once per handler)."""
    for handler in logging.getLogger().handlers:
        if not any(isinstance(f, RedactSecrets) for f in handler.filters):
            handler.addFilter(RedactSecrets())


class RedactedStream:
    """A text stream that writes through :func:`redact`: what a run prints (Hydra's own error lines, a
    traceback with ``KDL_TRACEBACK=1``, a library's print) never shows a credential."""

    def __init__(self, stream: Any) -> None:
        self._stream = stream

    def write(self, text: str) -> int:
        self._stream.write(redact(text))
        return len(text)

    def writelines(self, lines: Any) -> None:
        for line in lines:
            self.write(line)

    def __getattr__(self, name: str) -> Any:  # flush, isatty, fileno, encoding ... of the real stream
        return getattr(self._stream, name)


def redact_output() -> None:
    """Route ``sys.stdout`` and ``sys.stderr`` through :class:`RedactedStream` (once; for the rest of the
    process, so an uncaught exception's traceback, printed at exit, is redacted too)."""
    if not isinstance(sys.stdout, RedactedStream):
        sys.stdout = RedactedStream(sys.stdout)
    if not isinstance(sys.stderr, RedactedStream):
        sys.stderr = RedactedStream(sys.stderr)
