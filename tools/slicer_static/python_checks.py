"""The Python that Slicer loads: Python 3.12 byte-compilation, an AST lint of the module file, and an import of the
glue packages with torch (and the packages installed on request) made unavailable."""

from __future__ import annotations

import ast
import functools
import json
import os
import re
import shutil
import subprocess
import sys
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

from .files import _parse, _parsed, glue_packages, module_files

_COMPILE_SCRIPT = r"""
import json, sys, warnings
warnings.simplefilter("error")  # compile() then reports a SyntaxWarning (invalid escape "\d") as a SyntaxError
problems = []
for name in json.load(sys.stdin):
    try:
        with open(name, encoding="utf-8") as f:
            compile(f.read(), name, "exec", dont_inherit=True)
    except (SyntaxError, SyntaxWarning, ValueError, UnicodeDecodeError) as e:
        line = getattr(e, "lineno", None)
        problems.append(f"{name}: line {line}: {type(e).__name__}: {getattr(e, 'msg', None) or e}")
print(json.dumps(problems))
"""


def _python312_candidates() -> Iterator[tuple[list[str], dict[str, str] | None]]:
    yield [sys.executable], None
    on_path = shutil.which("python3.12")
    if on_path:
        yield [on_path], None
    pyenv_root = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv"))
    versions = sorted((pyenv_root / "versions").glob("3.12*"), reverse=True)
    for version in versions:
        if (version / "bin" / "python3.12").is_file():
            yield [str(version / "bin" / "python3.12")], None
    if on_path:  # a pyenv shim needs to be told which version
        for version in versions:
            yield [on_path], {**os.environ, "PYENV_VERSION": version.name}


@functools.lru_cache(maxsize=1)
def find_python312() -> tuple[tuple[str, ...], tuple[tuple[str, str], ...] | None] | None:
    """A command and environment that run Python 3.12 (Slicer 5.10+'s Python), or None when there is none."""
    for command, env in _python312_candidates():
        try:
            result = subprocess.run([*command, "-c", "import sys; print(sys.version_info[:2] == (3, 12))"],
                                    capture_output=True, text=True, timeout=60, env=env)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if result.returncode == 0 and result.stdout.strip() == "True":
            return tuple(command), (tuple(env.items()) if env else None)
    return None


def check_byte_compile(files: Sequence[Path], python312: tuple) -> list[str]:
    """Compile every file with Python 3.12 (nothing is written); SyntaxWarnings count as errors."""
    command, env = python312
    result = subprocess.run([*command, "-I", "-c", _COMPILE_SCRIPT], input=json.dumps([str(f) for f in files]),
                            capture_output=True, text=True, timeout=300, env=dict(env) if env else None)
    if result.returncode != 0:
        return [f"the Python 3.12 compile run failed: {result.stderr.strip()[-2000:]}"]
    return json.loads(result.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------------------------
# a. AST lint of the module file and the glue

REMOVED_IN_312 = ("imp", "distutils")
# What the module file may import at module level: Slicer's own modules, the standard library and our light packages.
SLICER_MODULES = ("slicer", "qt", "ctk", "vtk", "numpy", "__main__")  # numpy ships with Slicer
FIRST_PARTY_LIGHT = ("mim3d",)
# Never imported at module level anywhere Slicer loads when it starts: torch comes from the PyTorch extension and the
# packages in Resources/requirements.txt are installed on request, so neither may be there yet.
ALWAYS_HEAVY = ("torch",)


def _imported_modules(node: ast.AST) -> list[tuple[str, int]]:
    """(dotted module name, line) for an Import / ImportFrom node; relative imports are left out."""
    if isinstance(node, ast.Import):
        return [(alias.name, node.lineno) for alias in node.names]
    if isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
        return [(node.module, node.lineno)]
    return []


def module_level_imports(tree: ast.Module) -> list[tuple[str, int]]:
    """Imports that run when the file is imported: everywhere except inside function bodies and lambdas."""
    found: list[tuple[str, int]] = []

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef | ast.Lambda):
            return
        found.extend(_imported_modules(node))
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(tree)
    return found


def all_imports(tree: ast.Module) -> list[tuple[str, int]]:
    return [item for node in ast.walk(tree) for item in _imported_modules(node)]


def _base_names(cls: ast.ClassDef) -> list[str]:
    names = []
    for base in cls.bases:
        if isinstance(base, ast.Name):
            names.append(base.id)
        elif isinstance(base, ast.Attribute):
            names.append(base.attr)
    return names


def check_removed_modules(files: Iterable[Path]) -> list[str]:
    """No ``imp`` or ``distutils`` anywhere (both were removed in Python 3.12, Slicer 5.10's Python)."""
    problems = []
    for path, tree in _parsed(files, problems):
        for name, line in all_imports(tree):
            if name.split(".")[0] in REMOVED_IN_312:
                problems.append(f"{path}: line {line}: imports {name}, which Python 3.12 (Slicer 5.10+) no longer has")
    return problems


def check_module_file(module_dir: Path, heavy: Sequence[str] = ALWAYS_HEAVY) -> list[str]:
    """The module file exists alone at the top level, defines the four classes, and imports only light modules."""
    name = module_dir.name
    module_file = module_dir / f"{name}.py"
    problems = [f"{rel}: Slicer loads every top-level .py of a module folder as a module; move it into a package "
                f"such as {name}Lib/" for rel in module_files(module_dir)
                if "/" not in rel and rel.endswith(".py") and rel != f"{name}.py"]
    if not module_file.is_file():
        return [f"{module_file} does not exist: the module folder {module_dir.name}/ needs its module file, "
                f"defining {name}, {name}Widget, {name}Logic and {name}Test"] + problems
    tree, error = _parse(module_file)
    if tree is None:
        return [error] + problems
    classes = {node.name: node for node in tree.body if isinstance(node, ast.ClassDef)}
    for suffix in ("", "Widget", "Logic", "Test"):
        if name + suffix not in classes:
            problems.append(f"{module_file}: no top-level class {name + suffix} (Slicer looks it up by this name)")
    test = classes.get(f"{name}Test")
    if test is not None and "ScriptedLoadableModuleTest" not in _base_names(test):
        problems.append(f"{module_file}: {name}Test must subclass ScriptedLoadableModuleTest "
                        f"(its bases are {_base_names(test)})")
    # glue packages of every module folder: MiMPretrain.py imports MiMSegmentationLib (both install side by side)
    glue = {package for folder in module_dir.parent.iterdir()
            if folder == module_dir or (folder / f"{folder.name}.py").is_file() for package in glue_packages(folder)}
    allowed = set(SLICER_MODULES) | set(FIRST_PARTY_LIGHT) | glue | set(sys.stdlib_module_names)
    for imported, line in module_level_imports(tree):
        root = imported.split(".")[0]
        if root in heavy:
            problems.append(f"{module_file}: line {line}: imports {imported} at module level; import it inside the "
                            "function that needs it (Slicer loads this file at start-up, before it is installed)")
        elif root not in allowed:
            problems.append(f"{module_file}: line {line}: imports {imported} at module level; the module file may "
                            "import only slicer, qt, ctk, vtk, numpy, the standard library, the *Lib glue packages and "
                            "light mim3d modules there")
    return problems


def check_no_heavy_module_level_imports(files: Iterable[Path], heavy: Sequence[str]) -> list[str]:
    """No module-level import of a heavy package, even one guarded by try/except."""
    problems = []
    for path, tree in _parsed(files, problems):
        for imported, line in module_level_imports(tree):
            if imported.split(".")[0] in heavy:
                problems.append(f"{path}: line {line}: imports {imported} at module level; import it inside the "
                                "function that needs it")
    return problems


_IMPORT_SCRIPT = r"""
import importlib, json, os, sys, traceback
config = json.loads(sys.argv[1])
for name in config["blocked"]:
    sys.modules[name] = None  # importing it now raises ModuleNotFoundError
sys.path[:0] = config["path"]
root = os.path.realpath(config["root"])
allowed = set(config["shipped"]) | set(config["first_party"]) | set(sys.stdlib_module_names)
results = {}
for module in config["modules"]:
    before = set(sys.modules)
    try:
        importlib.import_module(module)
    except BaseException as e:
        frames = [f"{os.path.relpath(f.filename, root)}:{f.lineno}" for f in traceback.extract_tb(e.__traceback__)
                  if os.path.isfile(f.filename) and os.path.realpath(f.filename).startswith(root + os.sep)]
        results[module] = {"error": f"{type(e).__name__}: {e}" + (f" (via {' -> '.join(frames)})" if frames else "")}
        continue
    new = {name.split(".")[0] for name in set(sys.modules) - before}
    extra = sorted(name for name in new - allowed if not name.startswith("_"))
    if config["check_shipped"] and extra:
        results[module] = {"extra": extra}
print(json.dumps(results))
"""
# What Slicer's own Python has without any pip install (the ExtensionsIndex review: "anything beyond stdlib, slicer,
# vtk, SimpleITK, numpy, scipy" is non-standard), plus PythonQt's qt / ctk, requests with its dependencies, pip and
# packaging; and what the host's stand-ins pull in (slicer-core's slicer_core, VTK's vtkmodules).
SHIPPED_WITH_SLICER_IMPORTS = ("slicer", "slicer_core", "vtk", "vtkmodules", "numpy", "scipy", "SimpleITK",
                               "sitkUtils", "qt", "ctk", "requests", "urllib3", "idna", "certifi", "charset_normalizer",
                               "chardet", "packaging", "pip")


def light_modules_of_module_file(module_dir: Path) -> list[str]:
    """The mim3d modules that the module file imports at module level."""
    module_file = module_dir / f"{module_dir.name}.py"
    if not module_file.is_file():
        return []
    tree, _ = _parse(module_file)
    if tree is None:
        return []
    return sorted({name for name, _ in module_level_imports(tree) if name.split(".")[0] in FIRST_PARTY_LIGHT})


def check_imports_without(root: Path, search_path: Sequence[Path], modules: Sequence[str], blocked: Sequence[str],
                          first_party: Sequence[str] | None = None) -> list[str]:
    """Import ``modules`` in a fresh interpreter where each ``blocked`` package is made unavailable.

    With ``first_party`` (our own top-level packages), also report a module that imports anything beyond those, the
    standard library and SHIPPED_WITH_SLICER_IMPORTS: it would fail in a Slicer where nothing was pip-installed.
    """
    config = {"blocked": list(blocked), "path": [str(p) for p in search_path], "root": str(root),
              "modules": list(modules), "shipped": list(SHIPPED_WITH_SLICER_IMPORTS),
              "first_party": list(first_party or ()), "check_shipped": first_party is not None}
    result = subprocess.run([sys.executable, "-I", "-c", _IMPORT_SCRIPT, json.dumps(config)], capture_output=True,
                            text=True, timeout=300, cwd=root)
    if result.returncode != 0:
        return [f"the import run failed: {result.stderr.strip()[-2000:]}"]
    failures = json.loads(result.stdout.strip().splitlines()[-1])
    problems = []
    for module in modules:
        if "error" in failures.get(module, {}):
            problems.append(f"{module}: cannot be imported with {', '.join(blocked)} unavailable: "
                            f"{failures[module]['error']}")
        elif "extra" in failures.get(module, {}):
            problems.append(f"{module}: importing it imports {', '.join(failures[module]['extra'])}, which Slicer "
                            "does not ship; import it inside the function that needs it")
    return problems


def requirement_names(requirements_file: Path) -> list[str]:
    """Import names of the packages a requirements file lists (comments dropped)."""
    if not requirements_file.is_file():
        return []
    names = []
    for line in requirements_file.read_text(encoding="utf-8").splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(re.split(r"[\s<>=!~;\[]", line, maxsplit=1)[0].replace("-", "_").lower())
    return names

