"""The extension's metadata for the ExtensionsIndex: URLs from one place, licence, maintainers, description.

The repository URL, homepage, icon and screenshot URLs come only from Resources/ExtensionsIndex/publication.json
("repository": null until the extension is published); tools/publish_extension.py writes them into the top-level
CMakeLists.txt and the index entry. These tests check the real files, and publish a copy of them into a temporary
folder to show that a filled-in publication.json gives files that pass the index's checks.
"""

from __future__ import annotations

import ast
import json
import shutil
import subprocess
import sys
from pathlib import Path

from slicer_static import check_extension_cmake, check_index_entry, module_folders
from slicer_static.publication import PUBLICATION_FILE, check_publication, cmake_literal, read_publication

ROOT = Path(__file__).resolve().parents[1]
INDEX_ENTRY = ROOT / "Resources" / "ExtensionsIndex" / "MiM.json"
SCHEMA = Path(__file__).parent / "data" / "slicer-extension-catalog-entry-schema-v1.0.2.json"
MODULES = module_folders(ROOT, required=("MiMSegmentation",))
MAINTAINERS = "MiM for 3D Slicer maintainers"
PUBLISH = [sys.executable, str(ROOT / "tools" / "publish_extension.py")]


def published_copy(tmp_path: Path, repository: str | None) -> Path:
    """The files the index reads, copied to a temporary folder, with publication.json's repository set."""
    root = tmp_path / "SlicerMiM"
    for rel in ("CMakeLists.txt", "LICENSE.txt", "Resources", *(f"{m}/CMakeLists.txt" for m in MODULES)):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (shutil.copytree if (ROOT / rel).is_dir() else shutil.copy)(ROOT / rel, root / rel)
    publication = json.loads((root / PUBLICATION_FILE).read_text(encoding="utf-8"))
    (root / PUBLICATION_FILE).write_text(json.dumps({**publication, "repository": repository}), encoding="utf-8")
    return root


def run_publish(root: Path, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run([*PUBLISH, "--root", str(root), *args], capture_output=True, text=True, timeout=60)


def test_cmake_and_index_entry_hold_the_urls_publication_json_derives() -> None:
    assert check_publication(ROOT, INDEX_ENTRY) == []


def test_while_unpublished_no_url_names_a_repository_that_does_not_exist_yet() -> None:
    publication, problems = read_publication(ROOT)
    assert problems == []
    if publication.repository is not None:  # published: the derived URLs are checked above
        return
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert [cmake_literal(text, v) for v in ("EXTENSION_HOMEPAGE", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS")] \
        == ["", "", ""]
    assert "scm_url" not in json.loads(INDEX_ENTRY.read_text(encoding="utf-8"))
    # the tests publish copies to example repositories; everywhere else no such URL may exist yet
    tracked = subprocess.run(["git", "grep", "-l", "-I", "-E", r"github(usercontent)?\.com/[A-Za-z0-9-]+/SlicerMiM",
                              "--", ".", ":!Testing"], cwd=ROOT, capture_output=True, text=True)
    assert tracked.stdout == "", f"URLs of the unpublished repository in:\n{tracked.stdout}"


def test_publishing_writes_urls_that_pass_the_index_checks(tmp_path: Path) -> None:
    root = published_copy(tmp_path, "https://github.com/someone/SlicerMiM")
    assert run_publish(root, "--check").returncode == 1  # not written yet: the copy still has empty URLs
    result = run_publish(root)
    assert result.returncode == 0, result.stderr
    text = (root / "CMakeLists.txt").read_text(encoding="utf-8")
    assert cmake_literal(text, "EXTENSION_HOMEPAGE") == "https://github.com/someone/SlicerMiM"
    assert cmake_literal(text, "EXTENSION_ICONURL") == \
        "https://raw.githubusercontent.com/someone/SlicerMiM/main/Resources/MiM.png"
    entry = root / "Resources" / "ExtensionsIndex" / "MiM.json"
    assert json.loads(entry.read_text(encoding="utf-8"))["scm_url"] == "https://github.com/someone/SlicerMiM"
    assert check_extension_cmake(root, entry, MODULES) == []
    assert check_index_entry(entry, SCHEMA, root) == []
    assert run_publish(root, "--check").returncode == 0


def test_a_hand_edited_url_is_named_by_the_check(tmp_path: Path) -> None:
    root = published_copy(tmp_path, "https://github.com/someone/SlicerMiM")
    assert run_publish(root).returncode == 0
    cmake = root / "CMakeLists.txt"
    cmake.write_text(cmake.read_text(encoding="utf-8").replace("someone/SlicerMiM/main", "other/SlicerMiM/main"),
                     encoding="utf-8")
    result = run_publish(root, "--check")
    assert result.returncode == 1
    assert "set(EXTENSION_ICONURL \"https://raw.githubusercontent.com/other/SlicerMiM/main" in result.stderr
    assert "should be \"https://raw.githubusercontent.com/someone/SlicerMiM/main/Resources/MiM.png\"" in result.stderr


def test_a_repository_outside_github_is_refused_and_nothing_is_written(tmp_path: Path) -> None:
    root = published_copy(tmp_path, "https://example.org/SlicerMiM")
    before = (root / "CMakeLists.txt").read_text(encoding="utf-8")
    result = run_publish(root)
    assert result.returncode == 1
    assert "publication.json: repository 'https://example.org/SlicerMiM' is not https://github.com/" in result.stderr
    assert (root / "CMakeLists.txt").read_text(encoding="utf-8") == before


def test_the_licence_is_apache_2_in_license_txt_alone() -> None:
    text = (ROOT / "LICENSE.txt").read_text(encoding="utf-8")
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    others = [p.name for p in ROOT.iterdir() if p.is_file() and p.name.upper().startswith(("LICEN", "COPYING"))]
    assert others == ["LICENSE.txt"]


def test_contributors_are_the_maintainers_everywhere() -> None:
    text = (ROOT / "CMakeLists.txt").read_text(encoding="utf-8")
    assert cmake_literal(text, "EXTENSION_CONTRIBUTORS") == MAINTAINERS
    for module in MODULES:
        tree = ast.parse((ROOT / module / f"{module}.py").read_text(encoding="utf-8"))
        contributors = [ast.literal_eval(node.value) for node in ast.walk(tree) if isinstance(node, ast.Assign)
                        and any(ast.unparse(t) == "self.parent.contributors" for t in node.targets)]
        assert contributors == [[MAINTAINERS]], module


def test_the_description_says_the_network_is_used_only_on_explicit_action() -> None:
    description = cmake_literal((ROOT / "CMakeLists.txt").read_text(encoding="utf-8"), "EXTENSION_DESCRIPTION")
    assert "network is used only on an explicit user action" in description
