"""Static checks of the Slicer-facing files, as plain functions that return a list of problems (empty: all good).

What needs Slicer's Qt GUI cannot run on the host, so these checks read the files instead, one
module per concern:

- ``python_checks``: Python 3.12 byte-compilation, an AST lint of the module file, an import of the glue packages with
  torch (and the packages installed on request) made unavailable;
- ``ui``: the ``.ui`` file against the module code (names, parameter bindings, scene connections, and every input
  widget connected to code that re-evaluates the form);
- ``cmake``: the module CMake file lists against the folders;
- ``extension``: the ExtensionsIndex entry against its schema, the top-level CMakeLists and the publication settings;
- ``requirements``: what Slicer installs on request against pyproject.toml and the lock file.

Each problem names the file and what to change. ``Testing/test_slicer_static.py`` runs them on the repository and, to
show that each one can fail, on broken copies of a small module written to a temporary folder.
"""

from .cmake import check_module_cmake, cmake_variables, parse_cmake
from .connections import check_widget_connections
from .extension import check_extension_cmake, check_index_entry, image_kind
from .files import glue_packages, module_files, module_folders, package_modules, slicer_facing_python
from .python_checks import (
    ALWAYS_HEAVY,
    check_byte_compile,
    check_imports_without,
    check_module_file,
    check_no_heavy_module_level_imports,
    check_removed_modules,
    find_python312,
    light_modules_of_module_file,
    requirement_names,
)
from .requirements import check_requirements
from .ui import check_ui

__all__ = [
    "ALWAYS_HEAVY", "check_byte_compile", "check_extension_cmake", "check_imports_without", "check_index_entry",
    "check_module_cmake", "check_module_file", "check_no_heavy_module_level_imports", "check_removed_modules",
    "check_requirements", "check_ui", "check_widget_connections", "cmake_variables", "find_python312",
    "glue_packages", "image_kind", "light_modules_of_module_file", "module_files", "module_folders",
    "package_modules", "parse_cmake", "requirement_names", "slicer_facing_python",
]
