"""Where the extension is published: one file a maintainer fills in, and the values derived from it.

``Resources/ExtensionsIndex/publication.json`` names the public repository (``https://github.com/<owner>/SlicerMiM``),
its branch, and the repository paths of the icon and screenshots. ``"repository": null`` means "not yet published":
then no URL is written anywhere. ``tools/publish_extension.py`` writes the derived values into the two files that the
ExtensionsIndex reads (the top-level CMakeLists.txt, whose ``set(EXTENSION_...)`` lines the index reads literally, and
the index entry ``Resources/ExtensionsIndex/<Name>.json``); ``check_publication`` fails when they differ.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path

PUBLICATION_FILE = Path("Resources") / "ExtensionsIndex" / "publication.json"
URL_VARIABLES = ("EXTENSION_HOMEPAGE", "EXTENSION_ICONURL", "EXTENSION_SCREENSHOTURLS")
_GITHUB = re.compile(r"https://github\.com/([A-Za-z0-9-]+/[A-Za-z0-9._-]+)")


@dataclass(frozen=True)
class Publication:
    repository: str | None  # https://github.com/<owner>/<repo>; None: not yet published
    branch: str
    icon: str  # repository paths
    screenshots: tuple[str, ...]

    def raw_url(self, path: str) -> str:
        owner_repo = _GITHUB.fullmatch(self.repository).group(1)
        return f"https://raw.githubusercontent.com/{owner_repo}/{self.branch}/{path}"

    def cmake_values(self) -> dict[str, str]:
        """The URL variables of the top-level CMakeLists ("" for each while not published)."""
        if self.repository is None:
            return dict.fromkeys(URL_VARIABLES, "")
        return {"EXTENSION_HOMEPAGE": self.repository, "EXTENSION_ICONURL": self.raw_url(self.icon),
                "EXTENSION_SCREENSHOTURLS": " ".join(self.raw_url(path) for path in self.screenshots)}

    def entry_values(self) -> dict[str, str]:
        """scm_url and scm_revision of the index entry (no scm_url while not published)."""
        return {"scm_revision": self.branch, **({"scm_url": self.repository} if self.repository else {})}


def read_publication(root: Path) -> tuple[Publication | None, list[str]]:
    """(publication, problems); (None, []) where the repository has no publication file."""
    path = root / PUBLICATION_FILE
    if not path.is_file():
        return None, []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
        publication = Publication(data["repository"], data["branch"], data["icon"], tuple(data["screenshots"]))
    except (ValueError, KeyError, TypeError) as e:
        return None, [f"{path}: expected {{\"repository\": null or \"https://github.com/<owner>/<repo>\", \"branch\", "
                      f"\"icon\", \"screenshots\": [...]}}: {e!r}"]
    problems = []
    if publication.repository is not None and not _GITHUB.fullmatch(publication.repository or ""):
        problems.append(f"{path}: repository {publication.repository!r} is not https://github.com/<owner>/<repo> "
                        "(or null while the extension is not published)")
    for rel in (publication.icon, *publication.screenshots):
        if not (root / rel).is_file():
            problems.append(f"{path}: {rel} does not exist in the repository")
    return publication, problems


def cmake_literal(text: str, variable: str) -> str | None:
    """The quoted value of ``set(VARIABLE "...")``, read the way the ExtensionsIndex reads it (literally)."""
    match = re.search(rf'set\(\s*{variable}\s+"([^"]*)"\s*\)', text)
    return match.group(1) if match else None


def check_publication(root: Path, index_json: Path) -> list[str]:
    """The CMake URL variables and the index entry's scm_url / scm_revision are those publication.json derives."""
    publication, problems = read_publication(root)
    if publication is None:
        return problems
    fix = "; run python tools/publish_extension.py"
    text = (root / "CMakeLists.txt").read_text(encoding="utf-8")
    for variable, expected in publication.cmake_values().items():
        found = cmake_literal(text, variable)
        if found != expected:
            problems.append(f"{root / 'CMakeLists.txt'}: set({variable} \"{found}\") should be \"{expected}\" "
                            f"(from {PUBLICATION_FILE.as_posix()}){fix}")
    entry = json.loads(index_json.read_text(encoding="utf-8"))
    expected = publication.entry_values()
    for key in ("scm_url", "scm_revision"):
        if entry.get(key) != expected.get(key):
            problems.append(f"{index_json}: {key} is {entry.get(key)!r}, {PUBLICATION_FILE.as_posix()} says "
                            f"{expected.get(key)!r}{fix}")
    return problems


def publish(root: Path, index_json: Path) -> list[str]:
    """Write the derived values into the top-level CMakeLists and the index entry; returns the problems instead when
    publication.json is incomplete."""
    publication, problems = read_publication(root)
    if publication is None or problems:
        return problems or [f"{root / PUBLICATION_FILE} does not exist"]
    cmake = root / "CMakeLists.txt"
    text = cmake.read_text(encoding="utf-8")
    for variable, value in publication.cmake_values().items():
        line = f'set({variable} "{value}")'
        text, count = re.subn(rf'set\(\s*{variable}\s+"[^"]*"\s*\)', lambda _, line=line: line, text)
        if count != 1:
            return [f"{cmake}: expected one set({variable} \"...\") line, found {count}"]
    entry = {key: value for key, value in json.loads(index_json.read_text(encoding="utf-8")).items()
             if key != "scm_url"}
    entry.update(publication.entry_values())
    cmake.write_text(text, encoding="utf-8", newline="\n")
    index_json.write_text(json.dumps(dict(sorted(entry.items())), indent=2) + "\n", encoding="utf-8", newline="\n")
    return []
