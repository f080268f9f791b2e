"""API conformance of the Slicer-facing code: every VTK-style call (``obj.Method(...)``, capitalised, as the MRML,
segmentation and VTK classes name their methods) in the module files and the Libs is looked up in the classes that
the ``slicer-core`` wheel wraps, and its positional argument count must fit one of the method's wrapped overloads
(read from the wrapper's signature lines, e.g. ``GetTag(self, tag:str, value:str) -> bool``). A one-argument
``segment.GetTag("TerminologyEntry")`` fails here, as it raised TypeError in Slicer.

Qt and CTK calls (lower-case methods) and the application are not in slicer-core; docs/SLICER_API_CHECK.md lists what
was read against Slicer's source instead, and for which versions.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import slicer
import vtk

ROOT = Path(__file__).resolve().parents[1]
FILES = [ROOT / "MiMSegmentation" / "MiMSegmentation.py", ROOT / "MiMPretrain" / "MiMPretrain.py",
         *sorted((ROOT / "MiMSegmentation" / "MiMSegmentationLib").glob("*.py")),
         *sorted((ROOT / "MiMPretrain" / "MiMPretrainLib").glob("*.py"))]
# Receivers that are not VTK objects: Python modules and libraries whose capitalised names are classes or functions.
NOT_VTK = {"sitk", "subprocess", "threading", "queue", "signal", "qt", "ctk", "enum", "requirement_class",
           "version_module"}
# VTK classes the code uses that live in vtk rather than in slicer's namespace.
VTK_CLASSES = (vtk.vtkMatrix4x4, vtk.vtkGeneralTransform, vtk.vtkStringArray, vtk.vtkDoubleArray, vtk.vtkTable,
               vtk.vtkImageData, vtk.vtkCommand)


def _vtk_calls() -> list[tuple[str, int, str | None, str, int, bool]]:
    """(file, line, class named in the call or None, method, positional arguments, has keywords or *args)."""
    calls = []
    for path in FILES:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        local_classes = {node.name for node in ast.walk(tree) if isinstance(node, ast.ClassDef)}
        for node in ast.walk(tree):
            if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr[:1].isupper() and node.func.attr not in local_classes):
                continue
            receiver = node.func.value
            root = receiver
            while isinstance(root, ast.Attribute | ast.Call):
                root = root.value if isinstance(root, ast.Attribute) else root.func
            if isinstance(root, ast.Name) and root.id in NOT_VTK:
                continue
            if isinstance(receiver, ast.Name) and receiver.id in _module_names(tree):
                continue  # a class or function of an imported module (plots.ChartLayout, PyTorchUtils, ...)
            named = (receiver.attr if isinstance(receiver, ast.Attribute) and isinstance(receiver.value, ast.Name)
                     and receiver.value.id in ("slicer", "vtk") and receiver.attr.startswith("vtk") else None)
            variadic = bool(node.keywords) or any(isinstance(a, ast.Starred) for a in node.args)
            calls.append((path.name, node.lineno, named, node.func.attr, len(node.args), variadic))
    return calls


def _module_names(tree: ast.Module) -> set[str]:
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names |= {(alias.asname or alias.name).split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            names |= {alias.asname or alias.name for alias in node.names}
    return names - {"slicer", "vtk"}


def _classes() -> dict[str, type]:
    found = {name: getattr(slicer, name) for name in dir(slicer) if name.startswith("vtk")}
    found.update({cls.__name__: cls for cls in VTK_CLASSES})
    return found


def _overloads(method) -> list[tuple[int, float]]:
    """(required, maximum) positional arguments of each wrapped overload, from its signature lines, which may wrap:
    ``TransformPoint(self, point:(float, float,\n    float)) -> (float, ...)``."""
    name, doc = getattr(method, "__name__", ""), method.__doc__ or ""
    ranges = []
    for match in re.finditer(rf"^{re.escape(name)}\(", doc, re.MULTILINE):
        depth, params, current = 1, [], ""
        for char in doc[match.end():]:
            if char in "([{":
                depth += 1
            elif char in ")]}":
                depth -= 1
            if depth == 0:
                break
            if char == "," and depth == 1:
                params.append(current.strip())
                current = ""
            else:
                current += char
        params = [p for p in [*params, current.strip()] if p and p != "self"]
        variadic = any(p.startswith("*") for p in params)
        required = sum(1 for p in params if "=" not in p and not p.startswith("*"))
        ranges.append((required, float("inf") if variadic else len(params)))
    return ranges


def _problem(classes: dict[str, type], call) -> str | None:
    file, line, named, method, n_args, variadic = call
    where = f"{file}:{line}: {named + '.' if named else ''}{method}"
    if named and named not in classes:
        return f"{where}: slicer-core has no class {named}"
    owners = [cls for cls in ([classes[named]] if named else classes.values()) if hasattr(cls, method)]
    if not owners:
        return f"{where}: no class in slicer-core has this method"
    ranges = [r for cls in owners for r in _overloads(getattr(cls, method))]
    if not ranges or any(required <= n_args <= maximum or (variadic and n_args <= maximum)
                         for required, maximum in ranges):
        return None
    return f"{where}({n_args} positional arguments): the wrapped overloads take {sorted(set(ranges))}"


def test_the_scan_finds_the_calls_it_checks():
    calls = _vtk_calls()
    methods = {method for _, _, _, method, _, _ in calls}
    assert {"GetTag", "SetTag", "ImportLabelmapToSegmentationNode", "GetIJKToRASMatrix", "AddNewNodeByClass",
            "ExportAllSegmentsToLabelmapNode"} <= methods
    assert len(calls) > 100


def test_every_vtk_style_call_exists_in_slicer_core_with_a_matching_overload():
    classes = _classes()
    problems = [p for call in _vtk_calls() if (p := _problem(classes, call))]
    assert problems == []


@pytest.mark.parametrize(("source", "expected"), [
    ('segment.GetTag("TerminologyEntry")', "the wrapped overloads take [(2, 2)]"),  # the self-test's old line
    ("node.NoSuchMethodAnywhere()", "no class in slicer-core has this method"),
    ("slicer.vtkNoSuchClass.Get()", "slicer-core has no class vtkNoSuchClass"),
])
def test_a_call_that_slicer_would_refuse_is_reported(source, expected):
    call = ast.parse(source).body[0].value
    receiver = call.func.value
    named = receiver.attr if isinstance(receiver, ast.Attribute) else None
    problem = _problem(_classes(), ("x.py", 1, named, call.func.attr, len(call.args), False))
    assert problem is not None and problem.endswith(expected)


def test_every_slicer_util_function_used_exists_in_slicer_core():
    used = {match for path in FILES for match in re.findall(r"slicer\.util\.(\w+)", path.read_text(encoding="utf-8"))}
    assert {"arrayFromVolume", "tryWithErrorDisplay", "pip_install"} <= used
    assert sorted(name for name in used if not hasattr(slicer.util, name)) == []
