"""The release's bookkeeping: the version, the changelog and the deprecations agree."""

from __future__ import annotations

import re
from pathlib import Path

import kd_lightning

ROOT = Path(__file__).resolve().parents[1]


def version_tuple(text: str) -> tuple[int, ...]:
    return tuple(int(part) for part in text.split("."))


def test_the_newest_changelog_release_is_the_package_version_under_an_unreleased_section():
    sections = re.findall(r"^## \[([^\]]+)\]", (ROOT / "CHANGELOG.md").read_text(), flags=re.M)
    assert sections[0] == "Unreleased", "CHANGELOG.md opens with ## [Unreleased] (where the next changes go)"
    project = re.search(r'^version = "([^"]+)"', (ROOT / "pyproject.toml").read_text(), flags=re.M).group(1)
    assert sections[1] == project == kd_lightning.__version__


def test_every_deprecation_names_a_version_after_this_one():
    """A shim says when it goes ("removed in v0.3.0"); one whose version has come is due for removal."""
    current = version_tuple(kd_lightning.__version__)
    found = {
        (path.relative_to(ROOT).as_posix(), match)
        for path in (ROOT / "kd_lightning").rglob("*.py")
        for match in re.findall(r"removed in v(\d+\.\d+\.\d+)", path.read_text())
    }
    assert found, "no deprecation found: the pattern no longer matches how the shims say it"
    due = sorted((path, v) for path, v in found if version_tuple(v) <= current)
    assert not due, f"deprecations due for removal in {kd_lightning.__version__}: {due}"
