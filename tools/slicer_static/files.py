"""Module folders and their files, and parsing Python files for the checks."""

from __future__ import annotations

import ast
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

# Besides hidden folders (.ruff_cache) and *.egg-info: generated files that are never part of a module's file lists.
_SKIPPED_PARTS = ("__pycache__",)


def module_folders(root: Path, required: Sequence[str] = ()) -> list[str]:
    """The module folders: each ``required`` name, plus every top-level folder ``X`` that holds ``X/X.py``."""
    found = {d.name for d in root.iterdir() if d.is_dir() and (d / f"{d.name}.py").is_file()}
    return sorted(found | set(required))


def _skipped(rel: Path) -> bool:
    """Caches, build metadata and hidden files (.ruff_cache, *.egg-info, __pycache__) are not part of the module."""
    return any(part.startswith(".") or part in _SKIPPED_PARTS or part.endswith(".egg-info") for part in rel.parts)


def module_files(module_dir: Path) -> list[str]:
    """Every file of the module folder, relative to it, sorted; caches and build metadata left out."""
    files = []
    for path in module_dir.rglob("*"):
        rel = path.relative_to(module_dir)
        if path.is_file() and not _skipped(rel):
            files.append(rel.as_posix())
    return sorted(files)


def slicer_facing_python(module_dir: Path) -> list[Path]:
    """Every .py file of the module folder: the module file, its glue package, the bundled mim3d, its Testing/."""
    return [module_dir / rel for rel in module_files(module_dir) if rel.endswith(".py")]


def glue_packages(module_dir: Path) -> list[str]:
    """The Slicer glue packages of a module folder (``MiMSegmentationLib``): its packages other than mim3d."""
    return sorted(d.name for d in module_dir.iterdir()
                  if d.is_dir() and (d / "__init__.py").is_file() and d.name != "mim3d" and not _skipped(Path(d.name)))


def package_modules(module_dir: Path, package: str) -> list[str]:
    """Dotted names of the package and every module in it."""
    names = []
    for path in sorted((module_dir / package).rglob("*.py")):
        rel = path.relative_to(module_dir)
        if _skipped(rel):
            continue
        parts = list(rel.with_suffix("").parts)
        if parts[-1] == "__init__":
            parts.pop()
        names.append(".".join(parts))
    return names


def _parse(path: Path) -> tuple[ast.Module | None, str | None]:
    try:
        return ast.parse(path.read_text(encoding="utf-8"), filename=str(path)), None
    except SyntaxError as e:
        return None, f"{path}: line {e.lineno}: {e.msg} (the host Python cannot parse it)"


def _parsed(files: Iterable[Path], problems: list[str]) -> Iterator[tuple[Path, ast.Module]]:
    """(path, syntax tree) of each file that parses; a file that does not adds its problem instead."""
    for path in files:
        tree, error = _parse(path)
        if tree is None:
            problems.append(error)
        else:
            yield path, tree


