"""Static checks of the Slicer-facing files, as plain functions that return a list of problems (empty: all good).

What needs Slicer's Qt GUI cannot run on the host, so these checks read the files instead (SLICER_NOTES B4):
Python 3.12 byte-compilation, an AST lint of the module file, an import of the glue packages with torch (and the
packages installed on request) made unavailable, the `.ui` file against the module code, the CMake file lists against
the folders, and the ExtensionsIndex entry against its schema and the top-level CMakeLists. Each problem names the
file and what to change.
``test_slicer_static.py`` runs them on the repository and, to show that each one can fail, on broken copies of a small
module written to a temporary folder.
"""

from __future__ import annotations

import ast
import functools
import json
import os
import re
import shutil
import struct
import subprocess
import sys
import tomllib
import urllib.parse
import xml.etree.ElementTree as ET
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

# ---------------------------------------------------------------------------------------------------------------------
# Module folders and their files

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


# ---------------------------------------------------------------------------------------------------------------------
# a. Python 3.12 byte-compilation

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


# ---------------------------------------------------------------------------------------------------------------------
# b. The .ui file against the module file

# Qt Widgets classes (and Designer's "Line") that Qt Designer and Slicer's loader know without a <customwidget>.
QT_STANDARD_CLASSES = frozenset((
    "QWidget", "QFrame", "Line", "QLabel", "QPushButton", "QToolButton", "QRadioButton", "QCheckBox",
    "QCommandLinkButton", "QDialogButtonBox", "QComboBox", "QFontComboBox", "QLineEdit", "QTextEdit",
    "QPlainTextEdit", "QTextBrowser", "QSpinBox", "QDoubleSpinBox", "QTimeEdit", "QDateEdit", "QDateTimeEdit",
    "QDial", "QScrollBar", "QSlider", "QKeySequenceEdit", "QProgressBar", "QLCDNumber", "QCalendarWidget",
    "QGraphicsView", "QOpenGLWidget", "QGroupBox", "QScrollArea", "QToolBox", "QTabWidget", "QStackedWidget",
    "QMdiArea", "QDockWidget", "QListView", "QTreeView", "QTableView", "QColumnView", "QUndoView", "QListWidget",
    "QTreeWidget", "QTableWidget", "QSplitter", "QMainWindow", "QDialog", "QMenuBar", "QMenu", "QStatusBar",
    "QToolBar", "QWizard", "QWizardPage", "QVBoxLayout", "QHBoxLayout", "QGridLayout", "QFormLayout",
    "QStackedLayout", "QBoxLayout"))
MRML_SCENE_SIGNAL = "mrmlSceneChanged(vtkMRMLScene*)"
MRML_SCENE_SLOT = "setMRMLScene(vtkMRMLScene*)"
UNBOUND_CONSTANT = "UNBOUND_PARAMETERS"


def _property_text(prop: ET.Element) -> str | None:
    for tag in ("string", "cstring"):
        child = prop.find(tag)
        if child is not None:
            return child.text or ""
    return None


def ui_attribute_names(tree: ast.Module) -> dict[str, int]:
    """``self.ui.<name>`` attributes used in the code, with the first line of each."""
    names: dict[str, int] = {}
    for node in ast.walk(tree):
        if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
                and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"):
            names.setdefault(node.attr, node.lineno)
    return names


def _is_parameter_node_wrapper(decorator: ast.expr) -> bool:
    target = decorator.func if isinstance(decorator, ast.Call) else decorator
    return ((isinstance(target, ast.Name) and target.id == "parameterNodeWrapper")
            or (isinstance(target, ast.Attribute) and target.attr == "parameterNodeWrapper"))


def parameter_node_fields(tree: ast.Module, module_name: str) -> tuple[str | None, list[str]]:
    """(class name, annotated field names) of the module's @parameterNodeWrapper class (None when there is none)."""
    wrapped = [node for node in tree.body if isinstance(node, ast.ClassDef)
               and any(_is_parameter_node_wrapper(d) for d in node.decorator_list)]
    if not wrapped:
        return None, []
    chosen = next((c for c in wrapped if c.name == f"{module_name}ParameterNode"), wrapped[0])
    fields = [stmt.target.id for stmt in chosen.body
              if isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)]
    return chosen.name, fields


def unbound_parameters(tree: ast.Module, source: str, path: Path) -> tuple[list[str], list[str]]:
    """(names, problems) from the module-level ``UNBOUND_PARAMETERS`` tuple of string literals, each with a comment."""
    lines = source.splitlines()
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [node.target] if isinstance(node, ast.AnnAssign) \
            else []
        if not any(isinstance(t, ast.Name) and t.id == UNBOUND_CONSTANT for t in targets):
            continue
        value = node.value
        if not isinstance(value, ast.Tuple | ast.List) or not all(
                isinstance(e, ast.Constant) and isinstance(e.value, str) for e in value.elts):
            return [], [f"{path}: line {node.lineno}: {UNBOUND_CONSTANT} must be a tuple of string literals"]
        # the reason: a comment on the entry's line, or on the line just above the assignment
        commented_above = node.lineno >= 2 and lines[node.lineno - 2].lstrip().startswith("#")
        problems = [f"{path}: line {e.lineno}: {UNBOUND_CONSTANT} entry {e.value!r} needs a comment saying why it "
                    "has no widget" for e in value.elts if "#" not in lines[e.lineno - 1] and not commented_above]
        return [e.value for e in value.elts], problems
    return [], []


def check_ui(module_dir: Path) -> list[str]:
    """The module's .ui file: well-formed, custom widgets declared, names and parameter bindings match the code."""
    name = module_dir.name
    ui_path = module_dir / "Resources" / "UI" / f"{name}.ui"
    module_file = module_dir / f"{name}.py"
    problems = [f"{p} does not exist" for p in (ui_path, module_file) if not p.is_file()]
    if problems:
        return problems
    try:
        root = ET.parse(ui_path).getroot()
    except ET.ParseError as e:
        return [f"{ui_path}: not well-formed XML: {e}"]
    tree, error = _parse(module_file)
    if tree is None:
        return [error]
    source = module_file.read_text(encoding="utf-8")
    problems = []

    top = root.find("widget")
    if top is None:
        return [f"{ui_path}: no top-level <widget>"]
    widgets = list(top.iter("widget"))
    declared = {c.findtext("class") for c in root.iter("customwidget")}
    used_classes = {w.get("class") for w in widgets} | {lay.get("class") for lay in top.iter("layout")}
    for cls in sorted(c for c in used_classes - declared - QT_STANDARD_CLASSES if c):
        problems.append(f"{ui_path}: class {cls} is used but not declared in <customwidgets>")

    object_names = {e.get("name") for tag in ("widget", "layout", "action") for e in root.iter(tag)}
    for attr, line in sorted(ui_attribute_names(tree).items()):
        if attr not in object_names:
            problems.append(f"{module_file}: line {line}: self.ui.{attr} has no widget of that objectName in "
                            f"{ui_path.name}")

    bindings: dict[str, list[str]] = {}
    for widget in widgets:
        for prop in widget.findall("property"):
            if prop.get("name") != "SlicerParameterName":
                continue
            value = _property_text(prop)
            if prop.get("stdset") != "0":
                problems.append(f"{ui_path}: widget {widget.get('name')}: the SlicerParameterName property needs "
                                'stdset="0" (it is a dynamic property)')
            if value is None:
                problems.append(f"{ui_path}: widget {widget.get('name')}: SlicerParameterName has no <string> value")
            else:
                bindings.setdefault(value, []).append(widget.get("name"))

    wrapper, fields = parameter_node_fields(tree, name)
    unbound, unbound_problems = unbound_parameters(tree, source, module_file)
    problems += unbound_problems
    if wrapper is None:
        if bindings:
            problems.append(f"{module_file}: the .ui binds {sorted(bindings)} but no @parameterNodeWrapper class "
                            "is defined")
    else:
        for value, bound in sorted(bindings.items()):
            if value.split(".")[0] not in fields:  # "pack.member" binds a member of a parameterPack field
                problems.append(f"{ui_path}: widget {', '.join(bound)} binds SlicerParameterName {value!r}, which is "
                                f"not a field of {wrapper} (fields: {', '.join(fields)})")
            if len(bound) > 1:
                problems.append(f"{ui_path}: parameter {value!r} is bound to several widgets: {', '.join(bound)}")
        bound_fields = {value.split(".")[0] for value in bindings}
        for field in fields:
            if field not in bound_fields and field not in unbound:
                problems.append(f"{module_file}: {wrapper}.{field} is bound to no widget in {ui_path.name}; bind it "
                                f"(SlicerParameterName) or list it in {UNBOUND_CONSTANT} with the reason")
            if field in bound_fields and field in unbound:
                problems.append(f"{module_file}: {field} is listed in {UNBOUND_CONSTANT} but is bound in "
                                f"{ui_path.name}")
        for entry in unbound:
            if entry not in fields:
                problems.append(f"{module_file}: {UNBOUND_CONSTANT} names {entry!r}, which is not a field of "
                                f"{wrapper}")

    top_name = top.get("name")
    connected = {c.findtext("receiver") for c in root.iter("connection")
                 if c.findtext("sender") == top_name and c.findtext("signal") == MRML_SCENE_SIGNAL
                 and c.findtext("slot") == MRML_SCENE_SLOT}
    for widget in widgets[1:]:
        if (widget.get("class") or "").startswith("qMRML") and widget.get("name") not in connected:
            problems.append(f"{ui_path}: {widget.get('class')} {widget.get('name')} gets no scene: add the connection "
                            f"{top_name}.{MRML_SCENE_SIGNAL} -> {widget.get('name')}.{MRML_SCENE_SLOT}")
    return problems


# ---------------------------------------------------------------------------------------------------------------------
# c. CMake

_CMAKE_TOKENS = re.compile(r"""
    (?P<bracket_comment>\#\[(?P<eq>=*)\[.*?\](?P=eq)\]) |
    (?P<comment>\#[^\n]*) |
    (?P<quoted>"(?:\\.|[^"\\])*") |
    (?P<open>\() | (?P<close>\)) |
    (?P<word>[^\s()#"]+) |
    (?P<space>\s+)
""", re.VERBOSE | re.DOTALL)
_VARIABLE = re.compile(r"\$\{(\w+)\}")


def parse_cmake(text: str, variables: dict[str, str] | None = None) -> list[tuple[str, list[str], list[str]]]:
    """The commands of a CMake file in order: (lower-case name, expanded arguments, raw arguments).

    Enough CMake for our lists: comments, quoted arguments, ``set()`` and ``${VAR}`` expansion (unquoted values split
    on ``;``). No scopes, functions or generator expressions.
    """
    variables = dict(variables or {})
    tokens = [(m.lastgroup, m.group()) for m in _CMAKE_TOKENS.finditer(text)
              if m.lastgroup not in ("space", "comment", "bracket_comment")]
    commands = []
    i = 0
    while i < len(tokens):
        kind, value = tokens[i]
        if kind == "word" and i + 1 < len(tokens) and tokens[i + 1][0] == "open":
            depth, j, raw = 1, i + 2, []
            while j < len(tokens) and depth:
                depth += {"open": 1, "close": -1}.get(tokens[j][0], 0)
                if depth:
                    raw.append(tokens[j])
                j += 1
            expanded = []
            for arg_kind, arg in raw:
                if arg_kind == "quoted":
                    expanded.append(_VARIABLE.sub(lambda m: variables.get(m.group(1), ""), arg[1:-1]))
                elif arg_kind == "word":
                    text_value = _VARIABLE.sub(lambda m: variables.get(m.group(1), ""), arg)
                    expanded.extend(v for v in text_value.split(";") if v)
            name = value.lower()
            if name == "set" and expanded:
                values = expanded[1:]
                if "CACHE" in values:
                    values = values[:values.index("CACHE")]
                variables[expanded[0]] = ";".join(v for v in values if v != "PARENT_SCOPE")
            commands.append((name, expanded, [arg for _, arg in raw]))
            i = j
        else:
            i += 1
    return commands


def cmake_variables(commands: list[tuple[str, list[str], list[str]]]) -> dict[str, str]:
    return {args[0]: ";".join(args[1:]) for name, args, _ in commands if name == "set" and args}


def _keyword_lists(args: list[str], keywords: Sequence[str], flags: Sequence[str]) -> dict[str, list[str]]:
    lists: dict[str, list[str]] = {}
    current = None
    for arg in args:
        if arg in keywords:
            current = arg
            lists.setdefault(arg, [])
        elif arg in flags:
            lists[arg] = []
            current = None
        elif current is not None:
            lists[current].append(arg)
    return lists


def _duplicates(items: Sequence[str]) -> list[str]:
    return sorted({item for item in items if items.count(item) > 1})


def check_module_cmake(module_dir: Path) -> list[str]:
    """The module's SCRIPTS and RESOURCES list exactly its files (only listed files are installed); tests registered."""
    name = module_dir.name
    cmake_path = module_dir / "CMakeLists.txt"
    if not cmake_path.is_file():
        return [f"{cmake_path} does not exist"]
    commands = parse_cmake(cmake_path.read_text(encoding="utf-8"))
    calls = [args for command, args, _ in commands if command == "slicermacrobuildscriptedmodule"]
    if len(calls) != 1:
        return [f"{cmake_path}: expected one slicerMacroBuildScriptedModule(...), found {len(calls)}"]
    lists = _keyword_lists(calls[0], ("NAME", "SCRIPTS", "RESOURCES"), ("WITH_GENERIC_TESTS", "WITH_SUBDIR", "VERBOSE"))
    problems = []
    if lists.get("NAME") != [name]:
        problems.append(f"{cmake_path}: slicerMacroBuildScriptedModule NAME is {lists.get('NAME')}, expected {name}")
    if "WITH_GENERIC_TESTS" not in lists:
        problems.append(f"{cmake_path}: slicerMacroBuildScriptedModule needs WITH_GENERIC_TESTS")
    scripts, resources = lists.get("SCRIPTS", []), lists.get("RESOURCES", [])
    on_disk = [rel for rel in module_files(module_dir)
               if not rel.startswith("Testing/") and Path(rel).name != "CMakeLists.txt"]
    expected = {"SCRIPTS": [rel for rel in on_disk if rel.endswith(".py")],
                "RESOURCES": [rel for rel in on_disk if not rel.endswith(".py")]}
    for keyword, listed in (("SCRIPTS", scripts), ("RESOURCES", resources)):
        for rel in expected[keyword]:
            if rel not in listed:
                problems.append(f"{cmake_path}: {keyword} does not list {rel} (it would not be installed)")
        for rel in listed:
            if not (module_dir / rel).is_file():
                problems.append(f"{cmake_path}: {keyword} lists {rel}, which does not exist")
            elif rel not in expected[keyword]:
                problems.append(f"{cmake_path}: {keyword} lists {rel}, which belongs in "
                                f"{'RESOURCES' if keyword == 'SCRIPTS' else 'SCRIPTS'}" if rel in on_disk
                                else f"{cmake_path}: {keyword} lists {rel}, which is not a module file")
        for rel in _duplicates(listed):
            problems.append(f"{cmake_path}: {keyword} lists {rel} more than once")

    problems += _check_testing_block(cmake_path, commands, name)
    problems += _check_testing_scripts(module_dir)
    return problems


def _check_testing_block(cmake_path: Path, commands: list, name: str) -> list[str]:
    """``if(BUILD_TESTING) slicer_add_python_unittest(SCRIPT <Name>.py) add_subdirectory(Testing) endif()``."""
    names = [command for command, _, _ in commands]
    try:
        start = next(i for i, (command, args, _) in enumerate(commands)
                     if command == "if" and args == ["BUILD_TESTING"])
        end = names.index("endif", start)
    except (StopIteration, ValueError):
        return [f"{cmake_path}: no if(BUILD_TESTING) ... endif() block"]
    block = commands[start + 1:end]
    problems = []
    if ("slicer_add_python_unittest", ["SCRIPT", f"{name}.py"]) not in [(c, a) for c, a, _ in block]:
        problems.append(f"{cmake_path}: if(BUILD_TESTING) needs slicer_add_python_unittest(SCRIPT {name}.py)")
    if ("add_subdirectory", ["Testing"]) not in [(c, a) for c, a, _ in block]:
        problems.append(f"{cmake_path}: if(BUILD_TESTING) needs add_subdirectory(Testing)")
    return problems


def _check_testing_scripts(module_dir: Path) -> list[str]:
    """Testing/CMakeLists.txt adds Python/; each Testing .py is registered with slicer_add_python_unittest."""
    testing = module_dir / "Testing"
    problems = []
    for cmake in (testing / "CMakeLists.txt", testing / "Python" / "CMakeLists.txt"):
        if not cmake.is_file():
            problems.append(f"{cmake} does not exist")
    if problems:
        return problems
    if ("add_subdirectory", ["Python"]) not in [(c, a) for c, a, _ in
                                                parse_cmake((testing / "CMakeLists.txt").read_text(encoding="utf-8"))]:
        problems.append(f"{testing / 'CMakeLists.txt'}: needs add_subdirectory(Python)")
    registered = set()
    for cmake in testing.rglob("CMakeLists.txt"):
        variables = {"MODULE_NAME": module_dir.name, "CMAKE_CURRENT_SOURCE_DIR": str(cmake.parent)}
        for command, args, _ in parse_cmake(cmake.read_text(encoding="utf-8"), variables):
            if command in ("slicer_add_python_unittest", "slicer_add_python_test") and "SCRIPT" in args:
                script = Path(args[args.index("SCRIPT") + 1])
                path = script if script.is_absolute() else cmake.parent / script
                if not path.is_file():
                    problems.append(f"{cmake}: registers {script}, which does not exist")
                registered.add(path.resolve())
    for path in testing.rglob("*.py"):
        if not _skipped(path.relative_to(module_dir)) and path.resolve() not in registered:
            problems.append(f"{path}: not registered with slicer_add_python_unittest in a Testing CMakeLists.txt")
    return problems


# ---------------------------------------------------------------------------------------------------------------------
# c/d. The extension: top-level CMakeLists against the ExtensionsIndex entry

EXTENSION_VARIABLES = ("EXTENSION_HOMEPAGE", "EXTENSION_CATEGORY", "EXTENSION_CONTRIBUTORS", "EXTENSION_DESCRIPTION",
                       "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS", "EXTENSION_DEPENDS")
LICENSE_FILE_NAMES = ("LICENSE", "LICENCE", "License.txt", "license.txt", "LICENSE.txt", "COPYING", "COPYING.txt")
# Slicer/ExtensionsIndex scripts/check_description_files.py, ACCEPTED_EXTENSION_CATEGORIES (2026).
ACCEPTED_EXTENSION_CATEGORIES = frozenset((
    "Active Learning", "Analysis", "Auto3dgm", "BigImage", "Cardiac", "Chest Imaging Platform", "Conda", "Converters",
    "DICOM", "DSCI", "Developer Tools", "Diffusion", "Examples", "Exporter", "FTV Segmentation", "Filtering",
    "Filtering.Morphology", "Filtering.Vesselness", "Holographic Display", "Image Synthesis", "IGT", "Informatics",
    "Netstim", "Neuroimaging", "Nuclear Medicine", "Orthodontics", "Osteotomy Planning", "Otolaryngology",
    "Photogrammetry", "Pipelines", "Planning", "Printing", "Quantification", "Radiotherapy", "Registration", "Remote",
    "Rendering", "SPHARM", "Segmentation", "Sequences", "Shape Analysis", "Shape Regression", "Shape Visualization",
    "Simulation", "SlicerCMF", "SlicerMorph", "Spectral Imaging", "Supervisely", "Surface Models", "SurfaceLearner",
    "Tomographic Reconstruction", "Tracking", "Tractography", "Training", "Ultrasound", "Utilities",
    "Vascular Modeling Toolkit", "Virtual Reality", "VisSimTools", "Web System Tools", "Wizards"))
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def image_kind(path: Path) -> tuple[str | None, tuple[int, int] | None]:
    """("png", (width, height)) or ("jpeg", None) from the file's header, or (None, None) for anything else."""
    head = path.read_bytes()[:32]
    if head.startswith(_PNG_SIGNATURE) and head[12:16] == b"IHDR":
        return "png", struct.unpack(">II", head[16:24])
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg", None
    return None, None


def _load_json(path: Path) -> tuple[dict | None, str | None]:
    try:
        return json.loads(path.read_text(encoding="utf-8")), None
    except (OSError, ValueError) as e:
        return None, f"{path}: {e}"


def _repository_url_path(root: Path, url: str, owner_repo: str, revision: str, what: str) -> tuple[Path | None, str]:
    """The repository file a raw.githubusercontent.com URL names, after checking repository and branch."""
    parts = urllib.parse.urlsplit(url)
    segments = parts.path.strip("/").split("/")
    if parts.scheme != "https" or parts.netloc != "raw.githubusercontent.com" or len(segments) < 4:
        return None, f"{what} {url} is not a https://raw.githubusercontent.com/<owner>/<repo>/<branch>/<path> URL"
    if "/".join(segments[:2]) != owner_repo or segments[2] != revision:
        return None, (f"{what} {url} points into {'/'.join(segments[:2])} at {segments[2]}, expected {owner_repo} at "
                      f"{revision} (scm_url / scm_revision)")
    path = root.joinpath(*segments[3:])
    if not path.is_file():
        return None, f"{what} {url}: {'/'.join(segments[3:])} does not exist in the repository"
    return path, ""


def check_extension_cmake(root: Path, index_json: Path, modules: Sequence[str]) -> list[str]:
    """The top-level CMakeLists: the template's parts, each module added, and agreement with the index entry."""
    cmake_path = root / "CMakeLists.txt"
    if not cmake_path.is_file():
        return [f"{cmake_path} does not exist"]
    text = cmake_path.read_text(encoding="utf-8")
    commands = parse_cmake(text)
    variables = cmake_variables(commands)
    entry, error = _load_json(index_json)
    if entry is None:
        return [error]
    problems = []
    projects = [args for command, args, _ in commands if command == "project"]
    if not projects or projects[0][:1] != [index_json.stem]:
        problems.append(f"{cmake_path}: project() is {projects[0] if projects else None}, but the index entry is "
                        f"{index_json.name}; the ExtensionsIndex requires project({index_json.stem})")
    for variable in EXTENSION_VARIABLES:
        if not variables.get(variable):
            problems.append(f"{cmake_path}: set({variable} ...) is missing or empty")
    raw_calls = [(command, raw) for command, _, raw in commands]
    for command, raw in (("cmake_minimum_required", None), ("find_package", ["Slicer", "REQUIRED"]),
                         ("include", ["${Slicer_USE_FILE}"]), ("include", ["${Slicer_EXTENSION_GENERATE_CONFIG}"]),
                         ("include", ["${Slicer_EXTENSION_CPACK}"])):
        if not any(c == command and (raw is None or r == raw) for c, r in raw_calls):
            problems.append(f"{cmake_path}: {command}({' '.join(raw or ['...'])}) is missing")
    if "## NEXT_MODULE" not in text:
        problems.append(f"{cmake_path}: the '## NEXT_MODULE' marker (used by the extension wizard) is missing")
    subdirectories = [args[0] for command, args, _ in commands if command == "add_subdirectory" and args]
    for module in modules:
        if module not in subdirectories:
            problems.append(f"{cmake_path}: add_subdirectory({module}) is missing")
    for subdirectory in subdirectories:
        if not (root / subdirectory / "CMakeLists.txt").is_file():
            problems.append(f"{cmake_path}: add_subdirectory({subdirectory}) but {subdirectory}/CMakeLists.txt does "
                            "not exist")

    depends = [d for d in re.split(r"[;\s]+", variables.get("EXTENSION_DEPENDS", "")) if d and d != "NA"]
    if sorted(depends) != sorted(entry.get("build_dependencies", [])):
        problems.append(f"{cmake_path}: EXTENSION_DEPENDS {depends} differs from build_dependencies "
                        f"{entry.get('build_dependencies', [])} in {index_json.name}")
    if variables.get("EXTENSION_CATEGORY") != entry.get("category"):
        problems.append(f"{cmake_path}: EXTENSION_CATEGORY {variables.get('EXTENSION_CATEGORY')!r} differs from "
                        f"category {entry.get('category')!r} in {index_json.name}")
    if not variables.get("EXTENSION_HOMEPAGE", "").startswith("https://"):
        problems.append(f"{cmake_path}: EXTENSION_HOMEPAGE must start with https://")

    owner_repo = urllib.parse.urlsplit(entry.get("scm_url", "")).path.strip("/").removesuffix(".git")
    revision = entry.get("scm_revision", "main")
    icon, problem = _repository_url_path(root, variables.get("EXTENSION_ICONURL", ""), owner_repo, revision,
                                         "EXTENSION_ICONURL")
    if icon is None:
        problems.append(f"{cmake_path}: {problem}")
    elif image_kind(icon)[0] is None:
        problems.append(f"{cmake_path}: EXTENSION_ICONURL names {icon.relative_to(root)}, which is not a PNG or JPEG")
    screenshots = variables.get("EXTENSION_SCREENSHOTURLS", "").split()
    for url in screenshots:
        shot, problem = _repository_url_path(root, url, owner_repo, revision, "EXTENSION_SCREENSHOTURLS")
        if shot is None:
            problems.append(f"{cmake_path}: {problem}")
        elif image_kind(shot)[0] is None:
            problems.append(f"{cmake_path}: screenshot {shot.relative_to(root)} is not a PNG or JPEG")
    return problems


def check_index_entry(index_json: Path, schema_path: Path, root: Path) -> list[str]:
    """The ExtensionsIndex entry passes the index's own checks that need no network (check_description_files.py)."""
    import jsonschema

    data = index_json.read_bytes()
    problems = []
    if b"\r" in data:
        problems.append(f"{index_json}: has CR or CRLF line endings; the ExtensionsIndex accepts LF only")
    entry, error = _load_json(index_json)
    if entry is None:
        return problems + [error]
    schema = json.loads(schema_path.read_text(encoding="utf-8"))
    if str(entry.get("$schema", "")).rstrip("#") != schema["$id"].rstrip("#"):
        problems.append(f"{index_json}: $schema is {entry.get('$schema')!r}; the local schema copy is "
                        f"{schema['$id']!r}")
    validator = jsonschema.Draft7Validator(schema)
    for e in sorted(validator.iter_errors(entry), key=lambda e: list(e.absolute_path)):
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        problems.append(f"{index_json}: schema: {where}: {e.message}")
    if entry.get("category") not in ACCEPTED_EXTENSION_CATEGORIES:
        problems.append(f"{index_json}: category {entry.get('category')!r} is not one the ExtensionsIndex accepts")
    name = index_json.stem
    if name.lower().startswith("slicer"):
        problems.append(f"{index_json}: the extension name {name!r} must not start with 'Slicer' (use {name[6:]!r})")
    scm_url = str(entry.get("scm_url", ""))
    parts = urllib.parse.urlsplit(scm_url)
    if parts.scheme not in ("git", "https") or "://" not in scm_url:
        problems.append(f"{index_json}: scm_url {scm_url!r} must be a git:// or https:// URL")
    repo_name = parts.path.rstrip("/").split("/")[-1].removesuffix(".git")
    if "slicer" not in repo_name.lower():
        problems.append(f"{index_json}: the repository name {repo_name!r} should start with Slicer "
                        f"(e.g. Slicer{repo_name})")
    if not any((root / license_name).is_file() for license_name in LICENSE_FILE_NAMES):
        problems.append(f"{root}: no licence file ({', '.join(LICENSE_FILE_NAMES)}) in the repository root")
    return problems


# ---------------------------------------------------------------------------------------------------------------------
# Resources/requirements.txt against pyproject.toml and the lock file

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
