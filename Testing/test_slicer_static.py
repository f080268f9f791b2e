"""Static checks of what only Slicer can run: module files, .ui files, CMake lists and the ExtensionsIndex entry.

The first half runs the checkers of ``slicer_static`` on this repository, once per module folder (MiMSegmentation,
and MiMPretrain as soon as MiMPretrain/MiMPretrain.py exists). The second half shows that each checker can fail: it
writes a small, correct extension ("Demo") to a temporary folder, breaks one thing at a time and expects the checker
to name it. What these checks cannot prove (that Slicer's widgets behave) is left to the CTest self-tests in Slicer.
"""

from __future__ import annotations

import hashlib
import struct
import zlib
from collections.abc import Callable
from pathlib import Path

import pytest
from slicer_static import (
    ALWAYS_HEAVY,
    check_byte_compile,
    check_extension_cmake,
    check_imports_without,
    check_index_entry,
    check_module_cmake,
    check_module_file,
    check_no_heavy_module_level_imports,
    check_removed_modules,
    check_requirements,
    check_ui,
    check_widget_connections,
    find_python312,
    glue_packages,
    image_kind,
    light_modules_of_module_file,
    module_folders,
    package_modules,
    requirement_names,
    slicer_facing_python,
)

ROOT = Path(__file__).resolve().parents[1]
SCHEMA = Path(__file__).parent / "data" / "slicer-extension-catalog-entry-schema-v1.0.2.json"
INDEX_ENTRY = ROOT / "Resources" / "ExtensionsIndex" / "MiM.json"
MODULES = module_folders(ROOT, required=("MiMSegmentation",))


def heavy_packages(root: Path, modules: list[str]) -> tuple[str, ...]:
    """torch plus every package the modules install on request (their Resources/requirements.txt)."""
    names = [name for module in modules for name in requirement_names(root / module / "Resources" / "requirements.txt")]
    return tuple(dict.fromkeys([*ALWAYS_HEAVY, *names]))


def glue_files(module_dir: Path) -> list[Path]:
    """The module file and its glue packages: what Slicer's GUI process imports."""
    files = [module_dir / f"{module_dir.name}.py"]
    for package in glue_packages(module_dir):
        files += sorted((module_dir / package).rglob("*.py"))
    return [f for f in files if f.is_file() and "__pycache__" not in f.parts]


def light_import_problems(root: Path, module_dir: Path, modules: list[str]) -> list[str]:
    """Import the glue packages and the mim3d modules the module file imports, with the heavy packages unavailable."""
    names = [name for package in glue_packages(module_dir) for name in package_modules(module_dir, package)]
    names += light_modules_of_module_file(module_dir)
    first_party = ["mim3d", *(package for m in modules for package in glue_packages(root / m))]
    return check_imports_without(root, [root / m for m in modules], names, heavy_packages(root, modules), first_party)


def python312_or_skip() -> tuple:
    python = find_python312()
    if python is None:
        pytest.skip("no Python 3.12 found (python3.12 on PATH, ~/.pyenv/versions/3.12*/bin/python3.12 or this "
                    "interpreter); Slicer 5.10+ runs Python 3.12, so install one to run this check")
    return python


def report(problems: list[str]) -> str:
    return "\n" + "\n".join(problems)


# ---------------------------------------------------------------------------------------------------------------------
# The repository


@pytest.mark.parametrize("module", MODULES)
def test_module_file_defines_the_slicer_classes_and_imports_only_light_modules(module: str) -> None:
    problems = check_module_file(ROOT / module, heavy_packages(ROOT, MODULES))
    assert not problems, report(problems)


@pytest.mark.parametrize("module", MODULES)
def test_slicer_facing_python_avoids_modules_removed_in_python_3_12(module: str) -> None:
    problems = check_removed_modules(slicer_facing_python(ROOT / module))
    assert not problems, report(problems)


@pytest.mark.parametrize("module", MODULES)
def test_slicer_facing_python_compiles_under_python_3_12(module: str) -> None:
    problems = check_byte_compile(slicer_facing_python(ROOT / module), python312_or_skip())
    assert not problems, report(problems)


@pytest.mark.parametrize("module", MODULES)
def test_glue_imports_neither_torch_nor_the_packages_installed_on_request(module: str) -> None:
    heavy = heavy_packages(ROOT, MODULES)
    problems = check_no_heavy_module_level_imports(glue_files(ROOT / module), heavy)
    problems += light_import_problems(ROOT, ROOT / module, MODULES)
    assert not problems, report(problems)


@pytest.mark.parametrize("module", MODULES)
def test_ui_file_matches_the_module_code(module: str) -> None:
    problems = check_ui(ROOT / module)
    assert not problems, report(problems)


@pytest.mark.parametrize("module", MODULES)
def test_every_widget_the_user_changes_re_evaluates_the_form(module: str) -> None:
    problems = check_widget_connections(ROOT / module)
    assert not problems, report(problems)


@pytest.mark.parametrize("module", MODULES)
def test_cmake_lists_name_every_module_file(module: str) -> None:
    problems = check_module_cmake(ROOT / module)
    assert not problems, report(problems)


def test_icons_are_128_pixel_pngs() -> None:
    icons = [ROOT / "Resources" / "MiM.png"] + [ROOT / m / "Resources" / "Icons" / f"{m}.png"
                                                for m in ("MiMSegmentation", "MiMPretrain", *MODULES)]
    problems = [f"{icon}: missing" if not icon.is_file() else f"{icon}: {image_kind(icon)}, expected a 128×128 PNG"
                for icon in dict.fromkeys(icons) if not icon.is_file() or image_kind(icon) != ("png", (128, 128))]
    assert not problems, report(problems)


def test_extension_cmake_agrees_with_the_index_entry() -> None:
    problems = check_extension_cmake(ROOT, INDEX_ENTRY, MODULES)
    assert not problems, report(problems)


def test_index_entry_passes_the_extensions_index_checks() -> None:
    problems = check_index_entry(INDEX_ENTRY, SCHEMA, ROOT)
    assert not problems, report(problems)


def test_requirements_txt_matches_pyproject_and_lock() -> None:
    problems = check_requirements(ROOT / "MiMSegmentation" / "Resources" / "requirements.txt",
                                  ROOT / "pyproject.toml", ROOT / "requirements" / "lock.txt")
    assert not problems, report(problems)


# ---------------------------------------------------------------------------------------------------------------------
# The checkers on a small extension written for the test: correct as written, then broken one way at a time

DEMO_MODULE = '''\
import logging

import slicer
import vtk
from slicer.parameterNodeWrapper import parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)

from DemoLib.state import describe
from mim3d.labels import NAMES

UNBOUND_PARAMETERS = (
    "lastRun",  # written by the logic, shown nowhere
)


@parameterNodeWrapper
class DemoParameterNode:
    inputVolume: slicer.vtkMRMLScalarVolumeNode
    threshold: float = 0.5
    lastRun: str = ""


class Demo(ScriptedLoadableModule):
    pass


class DemoWidget(ScriptedLoadableModuleWidget):
    def setup(self):
        self.ui = slicer.util.childWidgetVariables(slicer.util.loadUI(self.resourcePath("UI/Demo.ui")))
        self.ui.applyButton.connect("clicked(bool)", self.onApply)
        self.ui.segmentationsSelector.connect("checkedNodesChanged()", self.updateGUI)
        self.setParameterNode(DemoLogic().getParameterNode())

    def setParameterNode(self, parameterNode):
        self._parameterNode = parameterNode
        self._parameterNode.connectGui(self.ui)
        self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        self.updateGUI()

    def updateGUI(self, caller=None, event=None):
        self.ui.applyButton.enabled = bool(self.ui.segmentationsSelector.checkedNodes())

    def onApply(self):
        logging.info(describe(self.ui.inputSelector.currentNode()), NAMES)


class DemoLogic(ScriptedLoadableModuleLogic):
    def run(self):
        import torch  # inside a function: only the worker path pays for it

        return torch


class DemoTest(ScriptedLoadableModuleTest):
    def runTest(self):
        pass
'''

DEMO_UI = '''\
<?xml version="1.0" encoding="UTF-8"?>
<ui version="4.0">
 <class>Demo</class>
 <widget class="qMRMLWidget" name="Demo">
  <layout class="QVBoxLayout" name="verticalLayout">
   <item>
    <widget class="qMRMLNodeComboBox" name="inputSelector">
     <property name="SlicerParameterName" stdset="0">
      <string>inputVolume</string>
     </property>
    </widget>
   </item>
   <item>
    <widget class="ctkSliderWidget" name="thresholdSlider">
     <property name="SlicerParameterName" stdset="0">
      <string>threshold</string>
     </property>
    </widget>
   </item>
   <item>
    <widget class="qMRMLCheckableNodeComboBox" name="segmentationsSelector"/>
   </item>
   <item>
    <widget class="QPushButton" name="applyButton"/>
   </item>
  </layout>
 </widget>
 <customwidgets>
  <customwidget>
   <class>ctkSliderWidget</class>
   <extends>QWidget</extends>
   <header>ctkSliderWidget.h</header>
  </customwidget>
  <customwidget>
   <class>qMRMLCheckableNodeComboBox</class>
   <extends>qMRMLNodeComboBox</extends>
   <header>qMRMLCheckableNodeComboBox.h</header>
  </customwidget>
  <customwidget>
   <class>qMRMLNodeComboBox</class>
   <extends>QWidget</extends>
   <header>qMRMLNodeComboBox.h</header>
  </customwidget>
  <customwidget>
   <class>qMRMLWidget</class>
   <extends>QWidget</extends>
   <header>qMRMLWidget.h</header>
   <container>1</container>
  </customwidget>
 </customwidgets>
 <connections>
  <connection>
   <sender>Demo</sender>
   <signal>mrmlSceneChanged(vtkMRMLScene*)</signal>
   <receiver>inputSelector</receiver>
   <slot>setMRMLScene(vtkMRMLScene*)</slot>
  </connection>
  <connection>
   <sender>Demo</sender>
   <signal>mrmlSceneChanged(vtkMRMLScene*)</signal>
   <receiver>segmentationsSelector</receiver>
   <slot>setMRMLScene(vtkMRMLScene*)</slot>
  </connection>
 </connections>
</ui>
'''

DEMO_MODULE_CMAKE = '''\
set(MODULE_NAME Demo)

set(MODULE_PYTHON_SCRIPTS
  ${MODULE_NAME}.py
  DemoLib/__init__.py
  DemoLib/state.py
  mim3d/__init__.py
  mim3d/heavy.py
  mim3d/labels.py
  )

set(MODULE_PYTHON_RESOURCES
  Resources/Icons/${MODULE_NAME}.png
  Resources/UI/${MODULE_NAME}.ui
  mim3d/catalog.json
  )

slicerMacroBuildScriptedModule(
  NAME ${MODULE_NAME}
  SCRIPTS ${MODULE_PYTHON_SCRIPTS}
  RESOURCES ${MODULE_PYTHON_RESOURCES}
  WITH_GENERIC_TESTS
  )

if(BUILD_TESTING)
  slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)
endif()
'''

RAW = "https://raw.githubusercontent.com/example/SlicerDemo/main"
DEMO_EXTENSION_CMAKE = f'''\
cmake_minimum_required(VERSION 3.16.3...3.28)

project(Demo)

set(EXTENSION_HOMEPAGE "https://github.com/example/SlicerDemo")
set(EXTENSION_CATEGORY "Segmentation")
set(EXTENSION_CONTRIBUTORS "Jane Doe (Example Lab)")
set(EXTENSION_DESCRIPTION "Segments things.")
set(EXTENSION_ICONURL "{RAW}/Resources/Demo.png")
set(EXTENSION_SCREENSHOTURLS "{RAW}/Resources/Screenshots/1.png")
set(EXTENSION_DEPENDS "PyTorch") # a list, or "NA"

find_package(Slicer REQUIRED)
include(${{Slicer_USE_FILE}})

add_subdirectory(Demo)
## NEXT_MODULE

include(${{Slicer_EXTENSION_GENERATE_CONFIG}})
include(${{Slicer_EXTENSION_CPACK}})
'''

DEMO_INDEX_ENTRY = '''\
{
  "$schema": "https://raw.githubusercontent.com/Slicer/Slicer/main/Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json#",
  "build_dependencies": ["PyTorch"],
  "build_subdirectory": ".",
  "category": "Segmentation",
  "scm_revision": "main",
  "scm_url": "https://github.com/example/SlicerDemo",
  "tier": 1
}
'''


def png(width: int, height: int) -> bytes:
    """A grey RGB PNG, written by hand so the fixture needs no imaging library."""
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    rows = b"".join(b"\x00" + b"\x80\x80\x80" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


def write(path: Path, content: str | bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content, encoding="utf-8", newline="\n")


def edit(path: Path, old: str, new: str) -> None:
    text = path.read_text(encoding="utf-8")
    assert old in text, f"{old!r} not in {path}"
    path.write_text(text.replace(old, new, 1), encoding="utf-8", newline="\n")


@pytest.fixture
def demo(tmp_path: Path) -> Path:
    """A correct minimal extension with one scripted module, Demo."""
    root = tmp_path / "SlicerDemo"
    files: dict[str, str | bytes] = {
        "CMakeLists.txt": DEMO_EXTENSION_CMAKE,
        "LICENSE": "Apache License 2.0\n",
        "Resources/Demo.png": png(128, 128),
        "Resources/Screenshots/1.png": png(64, 48),
        "Resources/ExtensionsIndex/Demo.json": DEMO_INDEX_ENTRY,
        "Demo/CMakeLists.txt": DEMO_MODULE_CMAKE,
        "Demo/Demo.py": DEMO_MODULE,
        "Demo/DemoLib/__init__.py": '"""Glue."""\n',
        "Demo/DemoLib/state.py": "import json\n\n\ndef describe(node):\n    return json.dumps(str(node))\n",
        "Demo/mim3d/__init__.py": "",
        "Demo/mim3d/labels.py": 'NAMES = ("liver",)\n',
        "Demo/mim3d/heavy.py": "import torch\n",
        "Demo/mim3d/catalog.json": "{}\n",
        "Demo/Resources/Icons/Demo.png": png(128, 128),
        "Demo/Resources/UI/Demo.ui": DEMO_UI,
        "Demo/__pycache__/Demo.cpython-312.pyc": b"cache, not a module file",
        "Demo/.ruff_cache/CACHEDIR.TAG": "cache, not a module file\n",
    }
    for rel, content in files.items():
        write(root / rel, content)
    return root


DEMO_HEAVY = ("torch", "monai")
CHECKS: dict[str, Callable[[Path], list[str]]] = {
    "module file": lambda root: check_module_file(root / "Demo", DEMO_HEAVY),
    "removed modules": lambda root: check_removed_modules(slicer_facing_python(root / "Demo")),
    "heavy imports": lambda root: check_no_heavy_module_level_imports(glue_files(root / "Demo"), DEMO_HEAVY),
    "light import": lambda root: light_import_problems(root, root / "Demo", ["Demo"]),
    "ui": lambda root: check_ui(root / "Demo"),
    "widget connections": lambda root: check_widget_connections(root / "Demo"),
    "module cmake": lambda root: check_module_cmake(root / "Demo"),
    "extension cmake": lambda root: check_extension_cmake(
        root, next((root / "Resources" / "ExtensionsIndex").glob("*.json")), ["Demo"]),
    "index entry": lambda root: check_index_entry(
        next((root / "Resources" / "ExtensionsIndex").glob("*.json")), SCHEMA, root),
}


@pytest.mark.parametrize("check", CHECKS)
def test_each_checker_passes_the_correct_demo_extension(demo: Path, check: str) -> None:
    assert CHECKS[check](demo) == []


def _rename_index_entry(root: Path, name: str) -> None:
    entry = root / "Resources" / "ExtensionsIndex" / "Demo.json"
    entry.rename(entry.with_name(name))


def _rewrite_index_entry(root: Path, old: str, new: str) -> None:
    edit(root / "Resources" / "ExtensionsIndex" / "Demo.json", old, new)


M = "Demo/Demo.py"
SELECTOR = 'self.ui.segmentationsSelector.connect("checkedNodesChanged()", self.updateGUI)'
UI = "Demo/Resources/UI/Demo.ui"
MODULE_CMAKE = "Demo/CMakeLists.txt"
SCREENSHOT = f'"{RAW}/Resources/Screenshots/1.png"'
# name: (break the demo, the checker that must notice, a phrase its report must contain)
BREAKAGES: dict[str, tuple[Callable[[Path], None], str, str]] = {
    "module file missing": (lambda r: (r / M).unlink(), "module file", "Demo.py does not exist"),
    "logic class misnamed": (lambda r: edit(r / M, "class DemoLogic(", "class DemoLogik("), "module file",
                             "no top-level class DemoLogic"),
    "test class not a ScriptedLoadableModuleTest": (
        lambda r: edit(r / M, "class DemoTest(ScriptedLoadableModuleTest)", "class DemoTest(object)"),
        "module file", "DemoTest must subclass ScriptedLoadableModuleTest"),
    "second top-level .py": (lambda r: write(r / "Demo/helpers.py", ""), "module file",
                             "helpers.py: Slicer loads every top-level .py"),
    "torch imported at module level in the module file": (
        lambda r: edit(r / M, "import logging\n", "import logging\n\nimport torch\n"), "module file",
        "imports torch at module level"),
    "third-party package imported by the module file": (
        lambda r: edit(r / M, "import logging\n", "import logging\n\nimport pandas\n"), "module file",
        "imports pandas at module level; the module file may import only"),
    "imp imported": (lambda r: edit(r / "Demo/DemoLib/state.py", "    return", "    import imp\n\n    return"),
                     "removed modules", "imports imp, which Python 3.12"),
    "torch imported at module level by the glue": (
        lambda r: edit(r / "Demo/DemoLib/state.py", "import json\n", "import json\n\nimport torch\n"),
        "light import", "DemoLib.state: cannot be imported with torch unavailable: ModuleNotFoundError"),
    "glue imports a package Slicer does not ship": (
        lambda r: edit(r / "Demo/DemoLib/state.py", "import json\n", "import json\n\nimport iniconfig\n"),
        "light import", "DemoLib.state: importing it imports iniconfig, which Slicer does not ship"),
    "torch imported through a mim3d module": (
        lambda r: edit(r / M, "from mim3d.labels import NAMES\n", "from mim3d.heavy import torch as NAMES\n"),
        "light import", "(via Demo/mim3d/heavy.py:1)"),
    "torch import guarded by try/except in the glue": (
        lambda r: edit(r / "Demo/DemoLib/state.py", "import json\n",
                       "import json\n\ntry:\n    import torch\nexcept ImportError:\n    torch = None\n"),
        "heavy imports", "state.py: line 4: imports torch at module level"),
    "self.ui name missing from the .ui": (
        lambda r: edit(r / M, "self.ui.applyButton", "self.ui.runButton"), "ui",
        "self.ui.runButton has no widget of that objectName"),
    "parameter bound to no widget": (
        lambda r: edit(r / M, "    threshold: float = 0.5\n", "    threshold: float = 0.5\n    sigma: float = 1.0\n"),
        "ui", "DemoParameterNode.sigma is bound to no widget"),
    "template bug: dynamic property named after the parameter": (
        lambda r: edit(r / UI, '<property name="SlicerParameterName" stdset="0">\n      <string>threshold',
                       '<property name="threshold" stdset="0">\n      <string>threshold'),
        "ui", "DemoParameterNode.threshold is bound to no widget"),
    "binding names no field": (
        lambda r: edit(r / UI, "<string>threshold</string>", "<string>thresh</string>"), "ui",
        "binds SlicerParameterName 'thresh', which is not a field of DemoParameterNode"),
    "parameter bound to two widgets": (
        lambda r: edit(r / UI, '<widget class="QPushButton" name="applyButton"/>',
                       '<widget class="QPushButton" name="applyButton"><property name="SlicerParameterName" '
                       'stdset="0"><string>threshold</string></property></widget>'),
        "ui", "parameter 'threshold' is bound to several widgets: thresholdSlider, applyButton"),
    "binding without stdset=0": (
        lambda r: edit(r / UI, '<property name="SlicerParameterName" stdset="0">\n      <string>threshold',
                       '<property name="SlicerParameterName">\n      <string>threshold'),
        "ui", 'widget thresholdSlider: the SlicerParameterName property needs stdset="0"'),
    "stale UNBOUND_PARAMETERS entry": (
        lambda r: edit(r / M, '    "lastRun",  #', '    "lastRun",\n    "oldName",  #'), "ui",
        "UNBOUND_PARAMETERS names 'oldName', which is not a field"),
    "UNBOUND_PARAMETERS entry without a reason": (
        lambda r: edit(r / M, '"lastRun",  # written by the logic, shown nowhere', '"lastRun",'), "ui",
        "entry 'lastRun' needs a comment"),
    "custom widget not declared": (
        lambda r: edit(r / UI, "<class>ctkSliderWidget</class>", "<class>ctkRangeWidget</class>"), "ui",
        "class ctkSliderWidget is used but not declared in <customwidgets>"),
    "MRML widget never gets the scene": (
        lambda r: edit(r / UI, "<receiver>inputSelector</receiver>", "<receiver>thresholdSlider</receiver>"), "ui",
        "qMRMLNodeComboBox inputSelector gets no scene"),
    "malformed .ui": (lambda r: edit(r / UI, "</customwidgets>", ""), "ui", "not well-formed XML"),
    "checkable selector that nothing hears (issue 16 item 6)": (
        lambda r: edit(r / M, f"        {SELECTOR}\n", ""), "widget connections",
        "qMRMLCheckableNodeComboBox segmentationsSelector: the user can change it, but nothing hears it; connect "
        'self.ui.segmentationsSelector.connect("checkedNodesChanged()"'),
    "checkable selector heard through a signal that ticking does not send": (
        lambda r: edit(r / M, '"checkedNodesChanged()"', '"currentNodeChanged(vtkMRMLNode*)"'), "widget connections",
        "segmentationsSelector: the user can change it, but it is connected only through currentNodeChanged"),
    "slot that never re-evaluates the form": (
        lambda r: edit(r / M, SELECTOR, SELECTOR.replace("self.updateGUI", "self.onApply")), "widget connections",
        "segmentationsSelector: the user can change it, but its slot never re-evaluates the form"),
    "bound widgets without a parameter-node observer": (
        lambda r: edit(r / M, "        self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, "
                              "self.updateGUI)\n", ""), "widget connections",
        "ctkSliderWidget thresholdSlider: the user can change it, but it is bound to 'threshold', but the widget does "
        "not re-evaluate the form"),
    "parameter-node observer that re-evaluates nothing": (
        lambda r: edit(r / M, "self.ui.applyButton.enabled =", "self.ui.applyButton.toolTip ="), "widget connections",
        "qMRMLNodeComboBox inputSelector: the user can change it, but it is bound to 'inputVolume'"),
    "binding on a widget Slicer cannot bind": (
        lambda r: edit(r / UI, '<widget class="qMRMLCheckableNodeComboBox" name="segmentationsSelector"/>',
                       '<widget class="qMRMLCheckableNodeComboBox" name="segmentationsSelector"><property '
                       'name="SlicerParameterName" stdset="0"><string>segmentations</string></property></widget>'),
        "widget connections", "Slicer's parameter node cannot bind a qMRMLCheckableNodeComboBox"),
    "button connected to nothing": (
        lambda r: edit(r / M, '        self.ui.applyButton.connect("clicked(bool)", self.onApply)\n', ""),
        "widget connections", "QPushButton applyButton is connected to nothing"),
    "editable text box that nothing reads": (
        lambda r: edit(r / UI, '<widget class="QPushButton" name="applyButton"/>',
                       '<widget class="QPushButton" name="applyButton"/><widget class="QPlainTextEdit" name="log"/>'),
        "widget connections", "QPlainTextEdit log: the user can change it, but nothing hears it"),
    "widget class the check does not know": (
        lambda r: edit(r / UI, '<widget class="QPushButton" name="applyButton"/>',
                       '<widget class="QPushButton" name="applyButton"/><widget class="QDial" name="dial"/>'),
        "widget connections", "QDial dial: unknown widget class"),
    "glue file not in SCRIPTS": (lambda r: write(r / "Demo/DemoLib/extra.py", ""), "module cmake",
                                 "SCRIPTS does not list DemoLib/extra.py"),
    "SCRIPTS names a missing file": (
        lambda r: edit(r / MODULE_CMAKE, "  DemoLib/state.py\n", "  DemoLib/state.py\n  DemoLib/gone.py\n"),
        "module cmake", "SCRIPTS lists DemoLib/gone.py, which does not exist"),
    "resource not in RESOURCES": (lambda r: write(r / "Demo/Resources/Icons/Other.png", png(8, 8)), "module cmake",
                                  "RESOURCES does not list Resources/Icons/Other.png"),
    "library data file not in RESOURCES": (
        lambda r: edit(r / MODULE_CMAKE, "  mim3d/catalog.json\n", ""), "module cmake",
        "RESOURCES does not list mim3d/catalog.json"),
    "no generic tests": (lambda r: edit(r / MODULE_CMAKE, "  WITH_GENERIC_TESTS\n", ""), "module cmake",
                         "needs WITH_GENERIC_TESTS"),
    "module test not registered": (
        lambda r: edit(r / MODULE_CMAKE, "  slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)\n", ""),
        "module cmake", "needs slicer_add_python_unittest(SCRIPT Demo.py)"),
    "Testing .py not registered": (lambda r: write(r / "Demo/Testing/Python/DemoWidgetTest.py", ""),
                                   "module cmake", "DemoWidgetTest.py: not registered"),
    "Testing CMakeLists.txt with only a comment": (
        lambda r: (edit(r / MODULE_CMAKE, "  slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)\n",
                        "  slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)\n  add_subdirectory(Testing)\n"),
                   write(r / "Demo/Testing/CMakeLists.txt", "\n#slicer_add_python_unittest(SCRIPT DemoTest.py)\n")),
        "module cmake", "Testing/CMakeLists.txt: holds no CMake command"),
    "Testing folder not added": (
        lambda r: write(r / "Demo/Testing/CMakeLists.txt", "slicer_add_python_unittest(SCRIPT DemoWidgetTest.py)\n"),
        "module cmake", "if(BUILD_TESTING) needs add_subdirectory(Testing)"),
    "Testing subfolder not added": (
        lambda r: (edit(r / MODULE_CMAKE, "  slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)\n",
                        "  slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)\n  add_subdirectory(Testing)\n"),
                   write(r / "Demo/Testing/CMakeLists.txt", "message(STATUS Demo)\n"),
                   write(r / "Demo/Testing/Python/CMakeLists.txt", "message(STATUS Python)\n")),
        "module cmake", "Testing/CMakeLists.txt: needs add_subdirectory(Python)"),
    "Testing added but missing": (
        lambda r: edit(r / MODULE_CMAKE, "  slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)\n",
                       "  slicer_add_python_unittest(SCRIPT ${MODULE_NAME}.py)\n  add_subdirectory(Testing)\n"),
        "module cmake", "add_subdirectory(Testing), but Testing/CMakeLists.txt does not exist"),
    "project name differs from the index entry": (
        lambda r: edit(r / "CMakeLists.txt", "project(Demo)", "project(DemoExtension)"), "extension cmake",
        "the ExtensionsIndex requires project(Demo)"),
    "EXTENSION_DEPENDS differs from build_dependencies": (
        lambda r: edit(r / "CMakeLists.txt", 'set(EXTENSION_DEPENDS "PyTorch")', 'set(EXTENSION_DEPENDS "NA")'),
        "extension cmake", "EXTENSION_DEPENDS [] differs from build_dependencies ['PyTorch']"),
    "module folder not added": (lambda r: edit(r / "CMakeLists.txt", "add_subdirectory(Demo)\n", ""),
                                "extension cmake", "add_subdirectory(Demo) is missing"),
    "NEXT_MODULE marker gone": (lambda r: edit(r / "CMakeLists.txt", "## NEXT_MODULE\n", ""), "extension cmake",
                                "'## NEXT_MODULE' marker"),
    "icon not in the repository": (lambda r: (r / "Resources/Demo.png").unlink(), "extension cmake",
                                   "Resources/Demo.png does not exist in the repository"),
    "screenshot in another repository": (
        lambda r: edit(r / "CMakeLists.txt", SCREENSHOT, SCREENSHOT.replace("example/", "someone/")),
        "extension cmake", "points into someone/SlicerDemo at main, expected example/SlicerDemo"),
    "screenshot not an image": (lambda r: write(r / "Resources/Screenshots/1.png", "not an image"),
                                "extension cmake", "is not a PNG or JPEG"),
    "index entry with CRLF": (
        lambda r: write(r / "Resources/ExtensionsIndex/Demo.json", DEMO_INDEX_ENTRY.replace("\n", "\r\n").encode()),
        "index entry", "CR or CRLF line endings"),
    "index entry with an unknown category": (
        lambda r: _rewrite_index_entry(r, '"Segmentation"', '"Deep Learning"'), "index entry",
        "category 'Deep Learning' is not one the ExtensionsIndex accepts"),
    "index entry with a key the schema forbids": (
        lambda r: _rewrite_index_entry(r, '"tier": 1', '"tier": 1,\n  "homepage": "https://example.org"'),
        "index entry", "Additional properties are not allowed ('homepage' was unexpected)"),
    "index entry without scm_url": (
        lambda r: _rewrite_index_entry(r, '  "scm_url": "https://github.com/example/SlicerDemo",\n', ""),
        "index entry", "'scm_url' is a required property"),
    "index entry with tier 7": (lambda r: _rewrite_index_entry(r, '"tier": 1', '"tier": 7'), "index entry",
                                "schema: tier: 7 is greater than the maximum of 5"),
    "extension name starting with Slicer": (lambda r: _rename_index_entry(r, "SlicerDemo.json"), "index entry",
                                            "must not start with 'Slicer'"),
    "no licence file": (lambda r: (r / "LICENSE").unlink(), "index entry", "no licence file"),
}


@pytest.mark.parametrize("breakage", BREAKAGES)
def test_each_checker_names_what_is_broken(demo: Path, breakage: str) -> None:
    apply, check, phrase = BREAKAGES[breakage]
    apply(demo)
    problems = CHECKS[check](demo)
    assert any(phrase in problem for problem in problems), report(problems)


def test_unbound_parameters_reason_may_stand_above_the_tuple(demo: Path) -> None:
    edit(demo / M, '\nUNBOUND_PARAMETERS = (\n    "lastRun",  # written by the logic, shown nowhere\n)',
         '\n# lastRun is written by the logic and shown nowhere\nUNBOUND_PARAMETERS = ("lastRun",)')
    assert check_ui(demo / "Demo") == []


def test_read_only_text_box_and_slot_behind_a_lambda_count_as_wired(demo: Path) -> None:
    edit(demo / UI, '<widget class="QPushButton" name="applyButton"/>',
         '<widget class="QPushButton" name="applyButton"/><widget class="QPlainTextEdit" name="log"><property '
         'name="readOnly"><bool>true</bool></property></widget>')
    edit(demo / M, SELECTOR, SELECTOR.replace("self.updateGUI", "lambda: self.refresh()"))
    edit(demo / M, "    def onApply(self):",
         "    def refresh(self):\n        self.updateGUI()\n\n    def onApply(self):")
    assert check_widget_connections(demo / "Demo") == []


def test_module_folders_include_a_new_module_once_its_module_file_exists(tmp_path: Path) -> None:
    (tmp_path / "Other" / "Resources").mkdir(parents=True)
    assert module_folders(tmp_path, required=("Demo",)) == ["Demo"]
    write(tmp_path / "Other" / "Other.py", "")
    assert module_folders(tmp_path, required=("Demo",)) == ["Demo", "Other"]


def test_byte_compile_passes_good_code_and_names_each_python_3_12_error(tmp_path: Path) -> None:
    python = python312_or_skip()
    good = tmp_path / "good.py"
    write(good, "def f(x: int | None):\n    match x:\n        case None:\n            return 0\n    return f'{x!r}'\n")
    assert check_byte_compile([good], python) == []
    old_syntax = tmp_path / "old_syntax.py"
    write(old_syntax, 'print "hello"\n')
    bad_escape = tmp_path / "bad_escape.py"
    write(bad_escape, 'import re\n\nPATTERN = re.compile("\\d+")\n')
    problems = check_byte_compile([good, old_syntax, bad_escape], python)
    assert len(problems) == 2, report(problems)
    assert problems[0].startswith(f"{old_syntax}: line 1: SyntaxError")
    # Python 3.12 only warns about an invalid escape; the check turns the warning into an error
    assert problems[1].startswith(f"{bad_escape}: line 3: SyntaxError: invalid escape sequence")


REQUIREMENTS_FILES = {
    "pyproject.toml": '[project]\ndependencies = ["torch>=2.4", "numpy>=1.26", "monai>=1.4", "einops>=0.7"]\n',
    "lock.txt": "einops==0.8.2\nmonai==1.6.1\nnumpy==2.4.6\ntorch==2.13.0\n",
    "requirements.txt": "# installed on request\nmonai>=1.4,<2\neinops>=0.7,<1\n",
}
REQUIREMENT_BREAKAGES = {
    "lists torch": ("einops>=0.7,<1\n", "einops>=0.7,<1\ntorch>=2.4,<3\n", "lists torch, which Slicer"),
    "no ceiling": ("monai>=1.4,<2", "monai>=1.4", "monai>=1.4 needs both a floor (>=) and a ceiling (<)"),
    "floor differs from pyproject": ("monai>=1.4,<2", "monai>=1.3,<2", "but pyproject.toml says monai>=1.4"),
    "excludes the locked version": ("monai>=1.4,<2", "monai>=1.4,<1.6", "excludes monai==1.6.1"),
    "forgets a dependency": ("einops>=0.7,<1\n", "", "does not list einops>=0.7"),
}


@pytest.mark.parametrize("breakage", [None, *REQUIREMENT_BREAKAGES])
def test_requirements_check_names_each_inconsistency(tmp_path: Path, breakage: str | None) -> None:
    for name, text in REQUIREMENTS_FILES.items():
        write(tmp_path / name, text)
    paths = (tmp_path / "requirements.txt", tmp_path / "pyproject.toml", tmp_path / "lock.txt")
    if breakage is None:
        assert check_requirements(*paths) == []
        return
    old, new, phrase = REQUIREMENT_BREAKAGES[breakage]
    edit(paths[0], old, new)
    problems = check_requirements(*paths)
    assert any(phrase in problem for problem in problems), report(problems)


def test_schema_copy_is_byte_for_byte_the_upstream_file() -> None:
    # SHA-256 of Slicer/Slicer Schemas/slicer-extension-catalog-entry-schema-v1.0.2.json (Testing/data/README.md)
    digest = hashlib.sha256(SCHEMA.read_bytes()).hexdigest()
    assert digest == "07107db15382ab027bf00dcffdd03ae859a43a4ea167a522b5fcaee5c14641a2"
