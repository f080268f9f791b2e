"""What the worker needs installed in Slicer's Python, checked without importing it. Standard library only.

torch comes from the PyTorch extension (it picks the CUDA build for the installed driver); the rest is listed in the
module's ``Resources/requirements.txt`` and installed with pip. Slicer's own numpy, SimpleITK and requests are never
replaced: ``protected_constraints`` pins them to the installed versions for pip.
"""

from __future__ import annotations

import importlib.metadata
from pathlib import Path

# The module's Resources/requirements.txt (beside this package in the source tree and in an installed extension).
REQUIREMENTS_FILE = Path(__file__).resolve().parents[1] / "Resources" / "requirements.txt"
TORCH_VERSION = ">=2.4"  # what the worker supports; the PyTorch extension installs it
# Packages Slicer ships (or the PyTorch extension installs); pip must keep the installed versions.
PROTECTED_PACKAGES = ("numpy", "SimpleITK", "requests", "torch")


def _packaging():
    """The ``packaging`` library: standalone when installed, else the copy vendored in pip (always in Slicer)."""
    try:
        from packaging import requirements, version
    except ImportError:
        from pip._vendor.packaging import requirements, version
    return requirements, version


def read_requirements(path: str | Path) -> list[str]:
    """The requirement lines of a requirements file (comments and blank lines dropped)."""
    lines = Path(path).read_text(encoding="utf-8").splitlines()
    return [line.split("#", 1)[0].strip() for line in lines if line.split("#", 1)[0].strip()]


def installed_version(name: str) -> str | None:
    """The installed distribution's version from its metadata (nothing is imported), or None."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def unmet(requirements: list[str]) -> list[str]:
    """The requirements that are not installed, or installed at a version outside their specifier."""
    requirement_class, version_module = _packaging()
    missing = []
    for line in requirements:
        requirement = requirement_class.Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate():
            continue
        found = installed_version(requirement.name)
        if found is None or not requirement.specifier.contains(version_module.Version(found), prereleases=True):
            missing.append(line)
    return missing


def torch_installed() -> bool:
    """True when torch's metadata says it is installed at a version the worker supports."""
    return not unmet([f"torch{TORCH_VERSION}"])


def unmet_requirements() -> list[str]:
    """The lines of ``REQUIREMENTS_FILE`` that are not met."""
    return unmet(read_requirements(REQUIREMENTS_FILE))


def worker_ready() -> bool:
    """True when torch and every package of ``REQUIREMENTS_FILE`` are installed at supported versions."""
    return torch_installed() and not unmet_requirements()


def protected_constraints() -> list[str]:
    """pip constraints ``name==version`` for each protected package that is installed."""
    return [f"{name}=={found}" for name in PROTECTED_PACKAGES if (found := installed_version(name)) is not None]


def describe(requirements: list[str]) -> str:
    """One line for a confirmation dialog: "monai>=1.4,<2, safetensors>=0.4"."""
    return ", ".join(requirements)
