"""CMake: a small parser, and the module CMakeLists against the module folder (only listed files are installed)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path

from .files import _skipped, module_files

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
    """``if(BUILD_TESTING) slicer_add_python_unittest(SCRIPT <Name>.py) endif()``, plus ``add_subdirectory(Testing)``
    exactly when the module has a Testing/CMakeLists.txt."""
    names = [command for command, _, _ in commands]
    try:
        start = next(i for i, (command, args, _) in enumerate(commands)
                     if command == "if" and args == ["BUILD_TESTING"])
        end = names.index("endif", start)
    except (StopIteration, ValueError):
        return [f"{cmake_path}: no if(BUILD_TESTING) ... endif() block"]
    block = [(c, a) for c, a, _ in commands[start + 1:end]]
    problems = []
    if ("slicer_add_python_unittest", ["SCRIPT", f"{name}.py"]) not in block:
        problems.append(f"{cmake_path}: if(BUILD_TESTING) needs slicer_add_python_unittest(SCRIPT {name}.py)")
    has_testing = (cmake_path.parent / "Testing" / "CMakeLists.txt").is_file()
    if has_testing and ("add_subdirectory", ["Testing"]) not in block:
        problems.append(f"{cmake_path}: if(BUILD_TESTING) needs add_subdirectory(Testing)")
    if not has_testing and ("add_subdirectory", ["Testing"]) in block:
        problems.append(f"{cmake_path}: add_subdirectory(Testing), but Testing/CMakeLists.txt does not exist")
    return problems


def _check_testing_scripts(module_dir: Path) -> list[str]:
    """Each CMakeLists.txt under Testing/ does something and is added by its parent; each Testing .py is registered
    with slicer_add_python_unittest."""
    testing = module_dir / "Testing"
    problems = []
    registered = set()
    for cmake in sorted(testing.rglob("CMakeLists.txt")):
        if _skipped(cmake.relative_to(module_dir)):
            continue
        variables = {"MODULE_NAME": module_dir.name, "CMAKE_CURRENT_SOURCE_DIR": str(cmake.parent)}
        commands = parse_cmake(cmake.read_text(encoding="utf-8"), variables)
        if not commands:
            problems.append(f"{cmake}: holds no CMake command; register a test in it or remove it (and the "
                            "add_subdirectory that adds it)")
        parent = cmake.parent.parent / "CMakeLists.txt"
        if cmake.parent != testing and ("add_subdirectory", [cmake.parent.name]) not in [
                (c, a) for c, a, _ in (parse_cmake(parent.read_text(encoding="utf-8")) if parent.is_file() else [])]:
            problems.append(f"{parent}: needs add_subdirectory({cmake.parent.name}), or {cmake} is never read")
        for command, args, _ in commands:
            if command in ("slicer_add_python_unittest", "slicer_add_python_test") and "SCRIPT" in args:
                script = Path(args[args.index("SCRIPT") + 1])
                path = script if script.is_absolute() else cmake.parent / script
                if not path.is_file():
                    problems.append(f"{cmake}: registers {script}, which does not exist")
                registered.add(path.resolve())
    for path in sorted(testing.rglob("*.py")):
        if not _skipped(path.relative_to(module_dir)) and path.resolve() not in registered:
            problems.append(f"{path}: not registered with slicer_add_python_unittest in a Testing CMakeLists.txt")
    return problems
