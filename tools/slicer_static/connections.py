"""Every widget the user can change is wired to code that re-evaluates the form.

A widget whose change nobody hears leaves the form in a stale state: ticking segmentations in a checkable node selector
that no signal reports keeps Start disabled (issue 16, item 6). For each widget of the module's ``.ui`` file this
check asks the module code (an AST read, nothing runs) for one of:

- a connection of one of the signals that report a change of the widget's value (``self.ui.w.connect("sig(...)",
  slot)`` or ``self.ui.w.sig.connect(slot)``) to a slot that re-evaluates the form;
- a parameter-node binding (``SlicerParameterName``) of a widget class Slicer can bind, in a module whose widget
  connects the GUI (``connectGui``) and observes the parameter node's ``ModifiedEvent`` with a method that re-evaluates
  the form (the binding writes the node, the node's ModifiedEvent calls that method).

"Re-evaluates the form" means: the slot, or a method of the module it reaches through ``self.<method>``, sets a
widget's enabled state (``x.enabled = ...`` or ``x.setEnabled(...)``). Buttons need a connection of a click signal;
read-only text boxes and the widgets that only show what the code puts there need nothing.
"""

from __future__ import annotations

import ast
import xml.etree.ElementTree as ET
from collections.abc import Iterable
from pathlib import Path

from .files import _parse
from .ui import _property_text

_CHECK = ("toggled(bool)", "stateChanged(int)", "clicked(bool)")
_COMBO = ("currentIndexChanged(int)", "currentTextChanged(QString)", "activated(int)", "textActivated(QString)")
_SPIN = ("valueChanged(double)", "editingFinished()")
_BUTTON = ("clicked(bool)", "toggled(bool)", "pressed()", "released()")
# The signals that report a change of a widget's value (Qt 5/6 widget docs; CTK and Slicer's qMRML headers); the
# first is the one a problem report suggests. Connections are matched by signal name.
VALUE_SIGNALS: dict[str, tuple[str, ...]] = {
    "QCheckBox": _CHECK, "ctkCheckBox": _CHECK, "QRadioButton": ("toggled(bool)", "clicked(bool)"),
    "QComboBox": _COMBO, "ctkComboBox": _COMBO,
    "QLineEdit": ("textChanged(QString)", "textEdited(QString)", "editingFinished()"),
    "QTextEdit": ("textChanged()",), "QPlainTextEdit": ("textChanged()",),
    "QSpinBox": ("valueChanged(int)", "editingFinished()"), "QDoubleSpinBox": _SPIN, "ctkDoubleSpinBox": _SPIN,
    "QSlider": ("valueChanged(int)", "sliderReleased()"),
    "ctkSliderWidget": ("valueChanged(double)", "valueIsChanging(double)"),
    "ctkRangeWidget": ("valuesChanged(double,double)", "minimumValueChanged(double)", "maximumValueChanged(double)"),
    "ctkPathLineEdit": ("currentPathChanged(QString)", "validInputChanged(bool)"),
    "ctkDirectoryButton": ("directoryChanged(QString)", "directorySelected(QString)"),
    "qMRMLNodeComboBox": ("currentNodeChanged(vtkMRMLNode*)", "currentNodeIDChanged(QString)",
                          "nodeActivated(vtkMRMLNode*)"),
    "qMRMLCheckableNodeComboBox": ("checkedNodesChanged()",),
    "qMRMLSegmentSelectorWidget": ("currentNodeChanged(vtkMRMLNode*)", "currentSegmentChanged(QString)",
                                   "segmentSelectionChanged(QStringList)"),
    "qMRMLSubjectHierarchyTreeView": ("currentItemChanged(vtkIdType)", "currentItemsChanged(QList<vtkIdType>)"),
}
ACTION_SIGNALS: dict[str, tuple[str, ...]] = {"QPushButton": _BUTTON, "QToolButton": _BUTTON}
# Containers, and widgets that show what the code puts there (item views are filled and read by code; their edits
# come through buttons or connected cell signals): nothing to connect.
PASSIVE_CLASSES = frozenset((
    "QWidget", "QFrame", "Line", "QLabel", "QProgressBar", "QGroupBox", "QTabWidget", "QStackedWidget", "QScrollArea",
    "QToolBox", "QSplitter", "QListWidget", "QTableWidget", "QTreeWidget", "QListView", "QTableView", "QTreeView",
    "ctkCollapsibleButton", "ctkCollapsibleGroupBox", "qMRMLWidget", "qSlicerWidget"))
# The widget classes the parameter node can bind: Slicer's Base/Python/slicer/parameterNodeWrapper/guiConnectors.py
# (Slicer main, 2026) matches on these exact types; any other binding fails in connectGui.
BINDABLE_CLASSES = frozenset((
    "QCheckBox", "QPushButton", "QSlider", "QSpinBox", "QDoubleSpinBox", "ctkSliderWidget", "QComboBox", "QLineEdit",
    "QTextEdit", "ctkPathLineEdit", "ctkDirectoryButton", "qMRMLNodeComboBox", "qMRMLSubjectHierarchyTreeView"))


def _is_self_ui(node: ast.expr) -> str | None:
    """``w`` for the expression ``self.ui.w``, else None."""
    if (isinstance(node, ast.Attribute) and isinstance(node.value, ast.Attribute) and node.value.attr == "ui"
            and isinstance(node.value.value, ast.Name) and node.value.value.id == "self"):
        return node.attr
    return None


def signal_connections(tree: ast.AST) -> list[tuple[str, str, ast.expr, int]]:
    """(widget, signal name, slot expression, line) for each ``self.ui.w.connect("sig(...)", slot)`` and
    ``self.ui.w.sig.connect(slot)``."""
    found = []
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "connect"):
            continue
        target, args = node.func.value, node.args
        widget = _is_self_ui(target)
        if widget and len(args) >= 2 and isinstance(args[0], ast.Constant) and isinstance(args[0].value, str):
            found.append((widget, args[0].value.split("(")[0].strip(), args[1], node.lineno))
        elif isinstance(target, ast.Attribute) and _is_self_ui(target.value) and args:
            found.append((_is_self_ui(target.value), target.attr, args[0], node.lineno))
    return found


def _method_references(node: ast.AST, methods: dict[str, ast.FunctionDef]) -> set[str]:
    """The methods of the class that ``node`` calls or passes on (``self.m(...)``, ``self.m`` as a callback)."""
    return {n.attr for n in ast.walk(node) if isinstance(n, ast.Attribute) and isinstance(n.value, ast.Name)
            and n.value.id == "self" and n.attr in methods}


def _sets_enabled(node: ast.AST) -> bool:
    for n in ast.walk(node):
        if isinstance(n, ast.Assign) and any(isinstance(t, ast.Attribute) and t.attr == "enabled" for t in n.targets):
            return True
        if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "setEnabled":
            return True
    return False


def reevaluates_form(slot: ast.expr, methods: dict[str, ast.FunctionDef]) -> bool:
    """Whether the slot, or a method it reaches through ``self.<method>``, sets a widget's enabled state."""
    seen: set[str] = set()
    pending = list(_method_references(slot, methods))
    while pending:
        name = pending.pop()
        if name in seen:
            continue
        seen.add(name)
        if _sets_enabled(methods[name]):
            return True
        pending += _method_references(methods[name], methods)
    return False


def parameter_node_observers(widget_class: ast.ClassDef) -> list[ast.expr]:
    """Callbacks of ``addObserver(<...parameterNode...>, <...ModifiedEvent>, callback)``, when the class also calls
    ``connectGui`` (without it, no binding writes the node)."""
    calls = [n for n in ast.walk(widget_class) if isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute)]
    if not any(call.func.attr == "connectGui" for call in calls):
        return []
    return [call.args[2] for call in calls if call.func.attr == "addObserver" and len(call.args) >= 3
            and "parameterNode" in ast.unparse(call.args[0]) and ast.unparse(call.args[1]).endswith("ModifiedEvent")]


def _bool_property(widget: ET.Element, name: str) -> bool:
    prop = next((p for p in widget.findall("property") if p.get("name") == name), None)
    return prop is not None and (prop.findtext("bool") or "").strip() == "true"


def _binding(widget: ET.Element) -> str | None:
    prop = next((p for p in widget.findall("property") if p.get("name") == "SlicerParameterName"), None)
    return _property_text(prop) if prop is not None else None


def check_widget_connections(module_dir: Path) -> list[str]:
    """Each widget of the module's .ui that the user can change is heard by code that re-evaluates the form."""
    name = module_dir.name
    ui_path = module_dir / "Resources" / "UI" / f"{name}.ui"
    module_file = module_dir / f"{name}.py"
    missing = [f"{p} does not exist" for p in (ui_path, module_file) if not p.is_file()]
    if missing:
        return missing
    try:
        top = ET.parse(ui_path).getroot().find("widget")
    except ET.ParseError as e:
        return [f"{ui_path}: not well-formed XML: {e}"]
    tree, error = _parse(module_file)
    if tree is None:
        return [error]
    widget_class = next((n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == f"{name}Widget"), None)
    if top is None or widget_class is None:
        return []  # check_ui and check_module_file report these
    methods = {n.name: n for n in widget_class.body if isinstance(n, ast.FunctionDef)}
    connections: dict[str, list[tuple[str, ast.expr]]] = {}
    for widget, signal, slot, _ in signal_connections(tree):
        connections.setdefault(widget, []).append((signal, slot))
    observed = any(reevaluates_form(callback, methods) for callback in parameter_node_observers(widget_class))
    problems = []
    for widget in list(top.iter("widget"))[1:]:
        problems += _widget_problems(widget, connections.get(widget.get("name"), []), methods, observed, ui_path,
                                     module_file)
    return problems


def _names(signals: Iterable[str]) -> set[str]:
    return {signal.split("(")[0] for signal in signals}


def _widget_problems(widget: ET.Element, connected: Iterable[tuple[str, ast.expr]], methods: dict, observed: bool,
                     ui_path: Path, module_file: Path) -> list[str]:
    cls, name = widget.get("class") or "", widget.get("name")
    binding = _binding(widget)
    what = f"{ui_path.name}: {cls} {name}"
    problems = []
    if binding is not None and cls not in BINDABLE_CLASSES:
        problems.append(f"{ui_path}: {cls} {name} binds SlicerParameterName {binding!r}, but Slicer's parameter node "
                        f"cannot bind a {cls} (no GUI connector); connect its signals in {module_file.name} instead")
    if cls in PASSIVE_CLASSES:
        return problems
    if cls in ACTION_SIGNALS:
        if binding is None and not any(signal in _names(ACTION_SIGNALS[cls]) for signal, _ in connected):
            problems.append(f"{module_file}: {what} is connected to nothing; connect its clicked(bool) signal")
        return problems
    if cls not in VALUE_SIGNALS:
        return problems + [f"{ui_path}: {cls} {name}: unknown widget class; add it to VALUE_SIGNALS (with the "
                           "signals that report a change of its value) or PASSIVE_CLASSES in "
                           "tools/slicer_static/connections.py"]
    if _bool_property(widget, "readOnly"):
        return problems
    signals = VALUE_SIGNALS[cls]
    heard = [slot for signal, slot in connected if signal in _names(signals)]
    if any(reevaluates_form(slot, methods) for slot in heard):
        return problems
    if binding is not None and cls in BINDABLE_CLASSES and observed:
        return problems
    if heard:
        reason = "its slot never re-evaluates the form (no widget's enabled state is set on the way)"
    elif connected:
        reason = (f"it is connected only through {', '.join(sorted({s for s, _ in connected}))}, which does not "
                  f"report a change of its value")
    elif binding is not None:
        reason = (f"it is bound to {binding!r}, but the widget does not re-evaluate the form when the parameter node "
                  "changes (connectGui plus a ModifiedEvent observer on the parameter node whose method sets the "
                  "buttons' enabled state)")
    else:
        reason = "nothing hears it"
    return problems + [f"{module_file}: {what}: the user can change it, but {reason}; connect "
                       f"self.ui.{name}.connect(\"{signals[0]}\", <method that re-evaluates the form>)"
                       + (", or make it read-only" if cls in ("QLineEdit", "QTextEdit", "QPlainTextEdit") else "")]
