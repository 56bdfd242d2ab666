"""The house rules of docs/architecture.md, checked on the source: one-way imports, no hidden cycles, small
modules, one atomic writer, one cached-artifact mechanism, and modules built by one uniform call."""

from __future__ import annotations

import ast
import importlib
import re
from pathlib import Path

import pytest

from kd_lightning.cli.main import STAGE_FUNCTIONS
from kd_lightning.stages.registry import ARTIFACTS, KINDS, STORES

PACKAGE = Path(__file__).resolve().parents[1] / "kd_lightning"

LAYERS = {
    "cli": 5,
    "stages": 4,
    "modules": 3,
    "estimation": 3,
    "generation": 3,
    "teachers": 3,
    "rollout": 3,
    "evaluation": 3,
    "report": 3,
    "losses": 2,
    "data": 2,
    "models": 2,
    "artifacts": 2,
    "code_fingerprint": 2,
    "distributed": 2,
    "environment": 1,
    "atomic": 1,
    "memory": 1,
    "assets": 5,
}
"""Top-level part of kd_lightning → layer. A module imports its own layer or lower, never higher."""

DEFERRED_IMPORTS = {
    "cli/kdl.py": "kdl --help answers before torch and Hydra are imported",
    "generation/backends.py": "an API-only teacher backend never imports torch or transformers",
    "teachers/server.py": "the server's argument errors come before the model imports",
}

ALLOWED_RENAMES = {"artifacts.py": "rebuild= moves a cached artifact aside before deleting it"}
"""Modules allowed an import of kd_lightning inside a function, and why (never to hide a cycle)."""


def sources() -> dict[str, ast.Module]:
    return {
        str(path.relative_to(PACKAGE)): ast.parse(path.read_text(), str(path))
        for path in PACKAGE.rglob("*.py")
    }


def part(module: str) -> str:
    """``kd_lightning.stages.train`` → ``stages``."""
    return module.split(".")[1] if module.count(".") else ""


def imports(tree: ast.Module, module_level: bool) -> list[str]:
    """kd_lightning modules imported at module level (or, with ``module_level=False``, inside functions)."""
    nodes = (
        tree.body
        if module_level
        else [n for f in ast.walk(tree) if isinstance(f, ast.FunctionDef) for n in ast.walk(f)]
    )
    found = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kd_lightning"):
            found += [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        elif isinstance(node, ast.Import):
            found += [a.name for a in node.names if a.name.startswith("kd_lightning")]
    return found


def test_every_part_has_a_layer():
    parts = {Path(name).parts[0].removesuffix(".py") for name in sources()} - {"__init__"}
    assert parts <= set(LAYERS), f"add {sorted(parts - set(LAYERS))} to LAYERS (and docs/architecture.md)"


@pytest.mark.parametrize("module_level", [True, False], ids=["module-level", "in-functions"])
def test_imports_flow_one_way(module_level):
    wrong = []
    for name, tree in sources().items():
        own = Path(name).parts[0].removesuffix(".py")
        if own not in LAYERS:
            continue
        for target in imports(tree, module_level):
            other = part(target)
            if other in LAYERS and LAYERS[other] > LAYERS[own]:
                wrong.append(f"{name} ({own}, layer {LAYERS[own]}) imports {target} (layer {LAYERS[other]})")
    assert not wrong, "\n".join(wrong)


def test_no_cycles_between_packages():
    edges: dict[str, set[str]] = {}
    for name, tree in sources().items():
        own = Path(name).parts[0].removesuffix(".py")
        for target in imports(tree, True):
            other = part(target)
            if other and other != own and other in LAYERS:
                edges.setdefault(own, set()).add(other)

    def reaches(start: str, goal: str, seen: set[str]) -> bool:
        for nxt in edges.get(start, ()):
            if nxt == goal or (nxt not in seen and reaches(nxt, goal, seen | {nxt})):
                return True
        return False

    cycles = sorted(f"{a} ↔ {b}" for a in edges for b in edges[a] if reaches(b, a, {b}))
    assert not cycles, cycles


def test_imports_inside_functions_only_where_documented():
    found = {name for name, tree in sources().items() if imports(tree, module_level=False)}
    assert found <= set(DEFERRED_IMPORTS), (
        f"move these imports to module level: {sorted(found - set(DEFERRED_IMPORTS))}"
    )


def test_no_module_over_400_lines():
    long = {
        name: len(text.splitlines()) for name, text in ((n, (PACKAGE / n).read_text()) for n in sources())
    }
    assert not {n: c for n, c in long.items() if c > 400}, long


def test_one_atomic_writer_and_one_cached_artifact_mechanism():
    """Write-temp-then-rename (of a file or a folder) lives in atomic.py; artifacts are made by Workspace.cached."""
    offenders = []
    for name in sources():
        text = (PACKAGE / name).read_text()
        writes = re.search(r"os\.replace\(|mkdtemp|mkstemp|NamedTemporaryFile", text)
        if writes and name not in ("atomic.py", *ALLOWED_RENAMES):
            offenders.append(
                f"{name}: a temp-then-rename write outside kd_lightning.atomic ({writes.group(0)})"
            )
        if name != "artifacts.py" and "artifact_lock(" in text:
            offenders.append(f"{name}: takes an artifact lock itself instead of Workspace.cached")
    assert not offenders, offenders


def test_modules_are_built_by_one_call_that_signatures_only_check():
    """Which keywords a module gets follows from its class attributes (the teacher plan); its signature is
    read in one place only, to name the keywords an __init__ lacks in the error."""
    readers = sorted(name for name in sources() if "inspect.signature" in (PACKAGE / name).read_text())
    assert readers == ["stages/teacher_plan.py"], readers
    plan = (PACKAGE / "stages/teacher_plan.py").read_text()
    assert plan.count("unaccepted(") == 2  # defined once, called once: to build the message


def test_no_test_module_imports_another():
    """Tests share code through tests/helpers/ only: a test module importing another runs its collection
    side effects and ties the two together."""
    tests = Path(__file__).resolve().parent
    offenders = []
    for path in sorted(tests.glob("test_*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            names = [node.module] if isinstance(node, ast.ImportFrom) and node.module else []
            names += [a.name for a in node.names] if isinstance(node, ast.Import) else []
            offenders += [f"{path.name}: {n}" for n in names if n.startswith(("tests.test_", "test_"))]
            if isinstance(node, ast.ImportFrom) and node.module == "tests":
                offenders += [
                    f"{path.name}: tests.{a.name}" for a in node.names if a.name.startswith("test_")
                ]
    assert not offenders, offenders


def test_every_cached_artifact_kind_has_its_one_registry_entry():
    """Each ``Workspace.cached("<kind>", ...)`` in the package names a kind of stages/registry.py, and each
    entry is real: its builder modules import, its store is read through ``stores_for``, its stage is a
    ``kdl`` stage. No other module lists the kinds (the registry is the one place to add one)."""
    used = set()
    for name in sources():
        text = (PACKAGE / name).read_text()
        used |= set(re.findall(r"\.cached\(\s*\"(\w+)\"", text))
    assert used and used <= set(KINDS), sorted(used - set(KINDS))
    for kind in ARTIFACTS:
        for module in kind.code:
            importlib.import_module(module)
        assert kind.cli_stage is None or kind.cli_stage in STAGE_FUNCTIONS, kind
    assert set(STORES) == {
        "prior", "posterior", "proxy_agreement", "offline_teacher", "teacher_logprobs", "teacher:", "teacher_mixture"
    }  # fmt: skip
    assert all(entry.kind in KINDS for entry in STORES.values())
    listing = re.compile(r"\(\s*\"corpus\",\s*\"prior\",|\"teacher_logprobs\":\s*\(")
    lists = [n for n in sources() if n != "stages/registry.py" and listing.search((PACKAGE / n).read_text())]
    assert not lists, f"artifact kinds listed outside stages/registry.py: {lists}"


def test_soft_label_names_are_registry_entries_not_string_cases():
    """``teacher:<name>``, ``teacher_mixture`` and the others are entries of stages/registry.py: no module
    matches a soft-label name by hand (``name == "teacher_mixture"``, ``startswith("teacher:")``), so a new
    store name is one entry, and ``kdl plan`` and ``--help`` know it."""
    case = re.compile(
        r"==\s*\"teacher_mixture\"|startswith\(\s*\"teacher:\"|\"teacher_mixture\"\s*(?:==|in\b)"
    )
    offenders = [n for n in sources() if n != "stages/registry.py" and case.search((PACKAGE / n).read_text())]
    assert not offenders, f"soft-label names matched outside stages/registry.py: {offenders}"
    from kd_lightning.stages.registry import soft_label_entry

    assert (
        soft_label_entry("teacher:b").kind == "teacher_logits" and soft_label_entry("teacher_mixture").mixed
    )
    with pytest.raises(KeyError, match=r"'teacher_mix'.*known: prior, .*teacher:<name>, teacher_mixture"):
        soft_label_entry("teacher_mix")


def test_the_wire_forms_are_branched_on_in_one_module():
    """vLLM's ``prompt_logprobs`` and the completions echo are two strategies in teachers/wire.py; nothing
    else asks which form a teacher speaks (``api == "vllm"``, ``"prompt_logprobs" in body``)."""
    branch = re.compile(
        r"""\bapi\s*[!=]=\s*["'](?:vllm|openai_completions)["']|["'](?:vllm|openai_completions)["']\s*[!=]=|"""
        r"""["']prompt_logprobs["']\s+(?:not\s+)?in\b|\.get\(\s*["']echo["']"""
    )
    offenders = [n for n in sources() if n != "teachers/wire.py" and branch.search((PACKAGE / n).read_text())]
    assert not offenders, f"wire-form branches outside teachers/wire.py: {offenders}"


def test_a_teachers_kind_is_decided_where_it_is_built():
    """No ``isinstance`` against teacher classes outside kd_lightning/teachers/ (callers ask the
    TeacherSource or ``gives_rows``), and a config node's kind is read in one function
    (``cli/build.py: teacher_source``), not sniffed (``"base_url" in node``) elsewhere."""
    classes = r"(?:ServedTeacher|ServedTeacherRows|TeacherRows|TeacherSource)"
    check = re.compile(rf"isinstance\([^)]*\b{classes}\b")
    sniff = re.compile(r"[\"']base_url[\"']\s+in\b")
    checks = [
        n for n in sources() if not n.startswith("teachers/") and check.search((PACKAGE / n).read_text())
    ]
    assert not checks, f"isinstance on teacher classes outside kd_lightning/teachers/: {checks}"
    sniffs = {n: len(sniff.findall((PACKAGE / n).read_text())) for n in sources()}
    assert {n: c for n, c in sniffs.items() if c} == {"cli/build.py": 1}, sniffs
