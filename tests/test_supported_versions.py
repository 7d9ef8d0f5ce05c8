"""The compatibility contract is stated in several files; they must agree.

pyproject.toml declares the ranges, constraints.txt locks the newest tested versions,
.ci/run tests the lower bounds, the README's "Supported versions" table states them, and
error messages name the tested transformers range.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Dict

import pytest
from packaging.requirements import Requirement
from packaging.version import Version

tomllib = pytest.importorskip("tomllib")  # Python >= 3.11

ROOT = Path(__file__).resolve().parent.parent


def _declared() -> Dict[str, Requirement]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    reqs = [Requirement(r) for group in project["optional-dependencies"].values() for r in group]
    return {r.name: r for r in reqs + [Requirement(r) for r in project["dependencies"]]}


def _locked() -> Dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, _, version = line.partition("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def _ci_variable(name: str) -> str:
    match = re.search(rf"^{name}=(\S+)", (ROOT / ".ci" / "run").read_text(), re.M)
    assert match, f".ci/run sets no {name}"
    return match.group(1)


def _lower_bound(req: Requirement) -> str:
    return next(s.version for s in req.specifier if s.operator == ">=")


@pytest.mark.parametrize("package, ci_variable", [("transformers", "OLDEST"), ("peft", "PEFT_OLDEST")])
def test_the_lock_and_the_oldest_tested_release_lie_in_the_declared_range(package, ci_variable):
    req, locked, oldest = _declared()[package], _locked()[package], _ci_variable(ci_variable)
    assert req.specifier.contains(locked), f"constraints.txt pins {package}=={locked} outside {req}"
    assert req.specifier.contains(oldest)
    # CI tests the lower bound itself (5.0 == 5.0.0), not some later release.
    assert Version(_lower_bound(req)) == Version(oldest), (req, oldest)


def test_the_lock_pins_torch_without_a_local_label():
    assert _locked()["torch"] == "2.13.0"  # '+cpu' would break machines that lack that build
    assert "torch==2.13.0" in (ROOT / "scripts" / "setup.sh").read_text()


def test_the_readme_table_states_the_tested_transformers_and_peft_releases():
    readme = (ROOT / "README.md").read_text()
    table = readme[readme.index("## Supported versions"):readme.index("## Testing another transformers")]
    locked = _locked()
    declared = _declared()
    for package, oldest in (("transformers", _ci_variable("OLDEST")), ("peft", _ci_variable("PEFT_OLDEST"))):
        row = next(line for line in table.splitlines() if line.startswith(f"| {package}"))
        assert oldest in row and locked[package] in row, row
        bounds = [f"{s.operator} {s.version}" for s in declared[package].specifier]
        assert all(bound in row for bound in bounds), (row, bounds)


def test_error_messages_name_the_tested_transformers_range():
    roles = pytest.importorskip("opendelta.integrations.transformers.roles")
    assert tuple(roles.TESTED_TRANSFORMERS) == (_ci_variable("OLDEST"), _locked()["transformers"])
