"""What the worker needs installed in Slicer's Python, checked without importing it. Standard library only.

torch comes from the PyTorch extension (it picks the CUDA build for the installed driver); the rest is listed in the
module's ``Resources/requirements.txt`` and installed with pip. Slicer's own numpy, SimpleITK and requests are never
replaced: ``protected_constraints`` pins them to the installed versions for pip.

``install_requirements`` decides how: on Slicer 5.12+ through ``slicer.packaging.pip_ensure`` (found by
``slicer_packaging``), on 5.10 through ``slicer.util.pip_install``; after one confirmation of ours in both cases, so
that a refusal is a quiet cancel (``pip_ensure``'s own prompt raises a bare RuntimeError, like a failure).
"""

from __future__ import annotations

import importlib
import importlib.metadata
from collections.abc import Callable
from pathlib import Path
from types import ModuleType

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


def confirmation_text(requirements: list[str]) -> str:
    """The question asked once before pip installs ``requirements``."""
    return f"MiM needs these Python packages, which will be installed now:\n{describe(requirements)}"


def slicer_packaging() -> ModuleType | None:
    """Slicer's ``slicer.packaging`` (Slicer 5.12+), or None (5.10). Imported here: Slicer does not import that
    submodule at start-up (``slicer.util.pip_install`` imports it when called), so ``hasattr(slicer, "packaging")``
    stays False until someone does."""
    try:
        return importlib.import_module("slicer.packaging")
    except ImportError:
        return None


def install_requirements(confirm: Callable[[str], bool], pip_install: Callable[[list[str]], object],
                         constraints_dir: str | Path, packaging: ModuleType | None = None,
                         requirements_file: str | Path = REQUIREMENTS_FILE) -> bool:
    """Install the unmet lines of ``requirements_file`` after one confirmation; True when all are met (nothing is
    asked when they already are), False when the user declined: a cancel, nothing installed, nothing to report.

    ``confirm(text)`` asks the user (``slicer.util.confirmOkCancelDisplay``). With ``packaging`` (``slicer_packaging()``
    on Slicer 5.12+) the install is ``packaging.pip_ensure(..., prompt_install=False)``, with its progress dialog and
    restart prompt; without (5.10) ``pip_install(["-c", constraints, *missing])`` (``slicer.util.pip_install``). Both
    get the constraints file written into ``constraints_dir`` that keeps Slicer's own packages at their versions.

    Raises:
        RuntimeError: a requirement is still unmet after the install (restart Slicer and try again); what the
            installer raises when pip fails.
    """
    missing = unmet(read_requirements(requirements_file))
    if not missing:
        return True
    if not confirm(confirmation_text(missing)):
        return False
    constraints = Path(constraints_dir) / "constraints.txt"
    constraints.write_text("\n".join(protected_constraints()) + "\n", encoding="utf-8")
    if packaging is not None:
        packaging.pip_ensure(missing, constraints=str(constraints), prompt_install=False, requester="MiM")
    else:
        pip_install(["-c", str(constraints), *missing])
    still = unmet(read_requirements(requirements_file))
    if still:
        raise RuntimeError(f"These packages are still missing after the install: {describe(still)}. Restart Slicer "
                           "and try again.")
    return True
