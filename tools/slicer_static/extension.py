"""The extension: the top-level CMakeLists against the ExtensionsIndex entry, and the entry against the index's own
checks that need no network (Slicer/ExtensionsIndex scripts/check_description_files.py)."""

from __future__ import annotations

import json
import re
import struct
import urllib.parse
from collections.abc import Sequence
from pathlib import Path

from .cmake import cmake_variables, parse_cmake
from .publication import URL_VARIABLES, check_publication, read_publication

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


def _unpublished(root: Path) -> bool:
    """publication.json says "repository": null: no URL exists yet, and none may be written."""
    publication, _ = read_publication(root)
    return publication is not None and publication.repository is None


def check_extension_cmake(root: Path, index_json: Path, modules: Sequence[str]) -> list[str]:
    """The top-level CMakeLists: the template's parts, each module added, and agreement with the index entry and with
    publication.json (where there is one; while it says "not yet published", the URL variables stay empty)."""
    cmake_path = root / "CMakeLists.txt"
    if not cmake_path.is_file():
        return [f"{cmake_path} does not exist"]
    text = cmake_path.read_text(encoding="utf-8")
    commands = parse_cmake(text)
    variables = cmake_variables(commands)
    entry, error = _load_json(index_json)
    if entry is None:
        return [error]
    unpublished = _unpublished(root)
    problems = check_publication(root, index_json)
    projects = [args for command, args, _ in commands if command == "project"]
    if not projects or projects[0][:1] != [index_json.stem]:
        problems.append(f"{cmake_path}: project() is {projects[0] if projects else None}, but the index entry is "
                        f"{index_json.name}; the ExtensionsIndex requires project({index_json.stem})")
    for variable in EXTENSION_VARIABLES:
        if not variables.get(variable) and not (unpublished and variable in URL_VARIABLES):
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
    if unpublished:
        return problems
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
    """The ExtensionsIndex entry passes the index's own checks that need no network (check_description_files.py).

    While publication.json says "not yet published", the entry has no scm_url: the one schema error accepted.
    """
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
    unpublished = _unpublished(root)
    validator = jsonschema.Draft7Validator(schema)
    for e in sorted(validator.iter_errors(entry), key=lambda e: list(e.absolute_path)):
        if unpublished and e.validator == "required" and e.message == "'scm_url' is a required property":
            continue
        where = "/".join(str(p) for p in e.absolute_path) or "(top level)"
        problems.append(f"{index_json}: schema: {where}: {e.message}")
    if entry.get("category") not in ACCEPTED_EXTENSION_CATEGORIES:
        problems.append(f"{index_json}: category {entry.get('category')!r} is not one the ExtensionsIndex accepts")
    name = index_json.stem
    if name.lower().startswith("slicer"):
        problems.append(f"{index_json}: the extension name {name!r} must not start with 'Slicer' (use {name[6:]!r})")
    if not any((root / license_name).is_file() for license_name in LICENSE_FILE_NAMES):
        problems.append(f"{root}: no licence file ({', '.join(LICENSE_FILE_NAMES)}) in the repository root")
    if unpublished:
        return problems
    scm_url = str(entry.get("scm_url", ""))
    parts = urllib.parse.urlsplit(scm_url)
    if parts.scheme not in ("git", "https") or "://" not in scm_url:
        problems.append(f"{index_json}: scm_url {scm_url!r} must be a git:// or https:// URL")
    repo_name = parts.path.rstrip("/").split("/")[-1].removesuffix(".git")
    if "slicer" not in repo_name.lower():
        problems.append(f"{index_json}: the repository name {repo_name!r} should start with Slicer "
                        f"(e.g. Slicer{repo_name})")
    return problems

