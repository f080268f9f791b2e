"""The .ui file against the module code: widget classes, object names, parameter bindings, scene connections."""

from __future__ import annotations

import ast
import xml.etree.ElementTree as ET
from pathlib import Path

from .files import _parse

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

