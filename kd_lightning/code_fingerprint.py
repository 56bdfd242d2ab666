"""A fingerprint of the code an artifact was built with, so that a cache key covers code as well as settings.

A cached store or student is reused only if the settings *and* the code that produced it are unchanged.
The code is found from the ``_target_`` paths the artifact's config instantiates (a user's own loss or
module included) plus the stage's builder module, closed over imports: every module of ``kd_lightning``
or of the user's own code (anything not installed under site-packages or the standard library) that those
modules import, directly or through each other. Third-party libraries are covered by their versions being
installed, not by hashing them; ``kd_lightning``'s own version is part of the fingerprint too.

Editing a loss file and rerunning therefore retrains; rerunning unchanged code reuses (tested).
"""

from __future__ import annotations

import ast
import hashlib
import importlib
import inspect
import site
import sys
import sysconfig
from collections.abc import Iterable, Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

from kd_lightning.environment import package_version

PACKAGE = "kd_lightning"


def targets_in(node: Any) -> list[str]:
    """Every ``_target_`` string in a plain (resolved) config container, depth first."""
    found: list[str] = []
    if isinstance(node, Mapping):
        target = node.get("_target_")
        if isinstance(target, str):
            found.append(target)
        for value in node.values():
            found += targets_in(value)
    elif isinstance(node, (list, tuple)):
        for value in node:
            found += targets_in(value)
    return found


def locate_module(path: str) -> ModuleType:
    """The module that defines a dotted ``_target_`` path (``pkg.mod.Class`` → ``pkg.mod``)."""
    parts = path.split(".")
    for end in range(len(parts), 0, -1):
        name = ".".join(parts[:end])
        try:
            module = importlib.import_module(name)
        except ImportError:
            continue
        obj: Any = module
        for attr in parts[end:]:
            obj = getattr(obj, attr, None)
            if obj is None:
                break
        defining = getattr(obj, "__module__", None) if obj is not None and obj is not module else None
        return sys.modules.get(defining, module) if defining else module
    raise ImportError(f"cannot import {path!r} (a _target_ of this run's config); is its package importable?")


def _installed_roots() -> tuple[str, ...]:
    paths = {sysconfig.get_paths()[key] for key in ("stdlib", "platstdlib", "purelib", "platlib")}
    paths.update(site.getsitepackages() if hasattr(site, "getsitepackages") else [])
    user_site = getattr(site, "getusersitepackages", lambda: None)()
    if user_site:
        paths.add(user_site)
    return tuple(str(Path(p).resolve()) for p in paths if p)


def _is_installed(file: str, installed: tuple[str, ...]) -> bool:
    path = Path(file).resolve()
    return str(path).startswith(installed) or any(
        part in ("site-packages", "dist-packages") for part in path.parts
    )


def _tracked_top(top: str, installed: tuple[str, ...], memo: dict[str, bool]) -> bool:
    """Whether a top-level package is ours or the user's; found without importing anything."""
    if top not in memo:
        if top == PACKAGE:
            memo[top] = True
        else:
            try:
                spec = importlib.util.find_spec(top)
            except (ImportError, ValueError):
                spec = None
            locations = list(spec.submodule_search_locations or []) if spec is not None else []
            if spec is not None and spec.has_location and spec.origin:
                locations.append(spec.origin)
            memo[top] = bool(locations) and not any(_is_installed(p, installed) for p in locations)
    return memo[top]


def _source_file(name: str) -> str | None:
    """The .py file of module ``name`` (None if it is not a module, e.g. ``pkg.Class``)."""
    module = sys.modules.get(name)
    if module is not None:
        return getattr(module, "__file__", None)
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError, AttributeError):  # `pkg.Class` from `from pkg import Class`, say
        return None
    return spec.origin if spec is not None and spec.has_location else None


def _imports_of(name: str, file: str) -> set[str]:
    """Modules named by the import statements of a module's source (function-level ones included)."""
    tree = ast.parse(Path(file).read_bytes())
    is_package = Path(file).name == "__init__.py"
    package = name if is_package else name.rpartition(".")[0]
    names: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parent = package.split(".")
                parent = parent[: len(parent) - node.level + 1]
                base = ".".join([*parent, base] if base else parent)
            names.add(base)
            names.update(f"{base}.{alias.name}" for alias in node.names)  # `from pkg import submodule`
    names.discard("")
    return names


def code_closure(roots: Iterable[str | ModuleType | type]) -> list[tuple[str, str]]:
    """(module name, source file) of the tracked modules reachable from ``roots`` through their imports.

    Roots are dotted ``_target_`` paths, modules or classes. Imports are read from the source, never
    executed, so the result does not depend on what this process happened to import before.
    """
    installed = _installed_roots()
    queue: list[str] = []
    for root in roots:
        if isinstance(root, ModuleType):
            queue.append(root.__name__)
        elif isinstance(root, str):
            queue.append(locate_module(root).__name__)
        else:
            queue += [k.__module__ for k in inspect.getmro(root)]
    seen: dict[str, str] = {}
    visited: set[str] = set()
    tops: dict[str, bool] = {}
    while queue:
        name = queue.pop()
        if name in visited:
            continue
        visited.add(name)
        if not _tracked_top(name.split(".")[0], installed, tops):
            continue  # third-party and standard library: covered by their installed versions
        file = _source_file(name)
        if not file or not file.endswith(".py"):
            continue
        seen[name] = str(file)
        queue += sorted(_imports_of(name, str(file)) - visited)
    return sorted(seen.items())


def code_fingerprint(roots: Iterable[str | ModuleType | type]) -> str:
    """16-hex hash of the tracked source files reachable from ``roots``, and the package version."""
    digest = hashlib.sha256(f"{PACKAGE}=={package_version()}".encode())
    for name, file in code_closure(roots):
        digest.update(name.encode() + b"\0")
        digest.update(Path(file).read_bytes())
        digest.update(b"\0")
    return digest.hexdigest()[:16]
