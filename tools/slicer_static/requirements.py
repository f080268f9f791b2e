"""Resources/requirements.txt (what Slicer installs on request) against pyproject.toml and the lock file."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path

SHIPPED_WITH_SLICER = ("torch", "numpy", "simpleitk", "requests")  # torch: from the PyTorch extension


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def check_requirements(requirements_file: Path, pyproject: Path, lock: Path) -> list[str]:
    """Every non-Slicer dependency of pyproject.toml is listed with its floor and a ceiling that admits the lock."""
    from packaging.requirements import Requirement
    from packaging.version import Version

    problems = []
    listed: dict[str, Requirement] = {}
    for line in requirements_file.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            requirement = Requirement(line)
            listed[_canonical(requirement.name)] = requirement
    declared = {_canonical(r.name): r for r in map(Requirement,
                                                    tomllib.loads(pyproject.read_text(encoding="utf-8"))["project"]
                                                    ["dependencies"])}
    pinned = {}
    for line in lock.read_text(encoding="utf-8").splitlines():
        if "==" in line and not line.startswith("#"):
            name, version = line.split("#", 1)[0].strip().split("==")
            pinned[_canonical(name)] = Version(version)

    for name, requirement in listed.items():
        if name in SHIPPED_WITH_SLICER:
            problems.append(f"{requirements_file}: lists {requirement.name}, which Slicer (or the PyTorch extension) "
                            "provides; installing it would replace Slicer's copy")
            continue
        floors = sorted(s.version for s in requirement.specifier if s.operator in (">=", ">"))
        ceilings = [s for s in requirement.specifier if s.operator in ("<", "<=")]
        if not floors or not ceilings:
            problems.append(f"{requirements_file}: {requirement} needs both a floor (>=) and a ceiling (<)")
        if name not in declared:
            problems.append(f"{requirements_file}: {requirement.name} is not a dependency in {pyproject.name}")
        else:
            declared_floors = sorted(s.version for s in declared[name].specifier if s.operator in (">=", ">"))
            if floors != declared_floors:
                problems.append(f"{requirements_file}: {requirement} has floor {', '.join(floors) or 'none'}, but "
                                f"{pyproject.name} says {declared[name]}")
        if name in pinned and not requirement.specifier.contains(pinned[name], prereleases=True):
            problems.append(f"{requirements_file}: {requirement} excludes {requirement.name}=={pinned[name]}, the "
                            f"version {lock.name} tests")
    for name, requirement in declared.items():
        if name not in listed and name not in SHIPPED_WITH_SLICER:
            problems.append(f"{requirements_file}: does not list {requirement}, which {pyproject.name} needs and "
                            "Slicer does not ship")
    return problems
