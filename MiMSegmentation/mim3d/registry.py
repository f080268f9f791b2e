"""The model registry: installed model packages, the catalog of downloadable ones, verified downloads. Stdlib only
(the Slicer GUI imports it before torch is installed).

Installed models live in ``models_home()``: ``$MIM3D_HOME/models`` when MIM3D_HOME is set, else
``~/.mim3d/models``; one folder per model id, each a package (``model.json`` + ``weights.safetensors``, see
``mim3d.package``). Folders starting with "." are work in progress (downloads, staging) and never listed.

The catalog (``mim3d/catalog/Models.json``, schema ``mim3d/catalog/Models.schema.json``; inside the package so that
pip installs and the Slicer extension both carry it) lists downloadable packages as
``{"models": [entry, ...]}``; ``check_entry`` is the schema written out in code, so no jsonschema is needed at run
time. A download is:

1. resumable: bytes go to ``.downloads/<id>-<version>.zip.part``; an interrupted download continues from there with an
   HTTP Range request (a server that ignores Range sends the whole file again, which is also handled);
2. verified before any use: size and SHA-256 of the archive against the catalog, then, after extraction to a staging
   folder, ``model.json`` and the weights' SHA-256 recorded in it; anything that fails is deleted and refused;
3. atomic: the checked staging folder is renamed to ``<home>/<id>``; an existing version is replaced only then.
"""

from __future__ import annotations

import http.client
import json
import os
import re
import shutil
import tempfile
import urllib.error
import urllib.request
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from . import __version__
from .errors import BadInputError, Cancelled
from .package import MODEL_JSON, WEIGHTS, ModelInfo, file_sha256, read_model_json, verify_package

ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9._-]{0,63}$")
CHUNK_BYTES = 1 << 16
TIMEOUT_S = 30
DEFAULT_CATALOG = Path(__file__).resolve().parent / "catalog" / "Models.json"
# The catalog entry, as catalog/Models.schema.json states it: field -> (kind, required).
ENTRY_FIELDS: dict[str, tuple[type, bool]] = {
    "id": (str, True), "name": (str, True), "version": (str, True), "url": (str, True), "sha256": (str, True),
    "size": (int, True), "description": (str, True), "licence": (str, True), "expected": (dict, True),
    "modality": (str, False), "labels": (list, False), "homepage": (str, False)}
EXPECTED_FIELDS = ("gpu_seconds", "cpu_seconds", "gpu_memory_gb", "cpu_memory_gb")
Progress = Callable[[str, float, str], None]


class DownloadError(BadInputError):
    """A download that could not be completed or verified; the message says what to do."""


@dataclass(frozen=True)
class CatalogEntry:
    """One downloadable model package (fields as in Models.schema.json)."""

    id: str
    name: str
    version: str
    url: str
    sha256: str
    size: int
    description: str
    licence: str
    expected: dict[str, float | None]
    extra: dict[str, Any] = field(default_factory=dict)  # modality, labels, homepage


@dataclass(frozen=True)
class InstalledModel:
    """A folder in the models home: its package description, or the problem that keeps it from being read."""

    id: str
    path: Path
    info: ModelInfo | None
    problem: str | None = None


# ---- places -------------------------------------------------------------------------------------------------------

def models_home() -> Path:
    """``$MIM3D_HOME/models``, or ``~/.mim3d/models`` when MIM3D_HOME is not set (not created here)."""
    home = os.environ.get("MIM3D_HOME")
    return (Path(home) if home else Path.home() / ".mim3d") / "models"


def check_id(model_id: str) -> str:
    if not isinstance(model_id, str) or not ID_PATTERN.match(model_id):
        raise BadInputError(f"model id {model_id!r}: use 1-64 lower-case letters, digits, '.', '_' or '-', starting "
                            "with a letter or digit (e.g. abdomen-small).")
    return model_id


def list_installed(home: Path | None = None) -> list[InstalledModel]:
    """Every model folder in the home, sorted by id; a broken one is listed with its problem, not skipped."""
    home = home or models_home()
    found = []
    for folder in sorted(home.iterdir()) if home.is_dir() else []:
        if folder.name.startswith(".") or not folder.is_dir():
            continue
        try:
            found.append(InstalledModel(folder.name, folder, read_model_json(folder)))
        except BadInputError as e:
            found.append(InstalledModel(folder.name, folder, None, str(e)))
    return found


def resolve_model(name_or_path: str, home: Path | None = None) -> Path:
    """A package folder from ``--model``: an existing folder path, or the id of an installed model."""
    home = home or models_home()
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if ID_PATTERN.match(name_or_path) and (home / name_or_path).is_dir():
        return home / name_or_path
    if path.exists():
        raise BadInputError(f"{path}: is a file; give a model package folder (model.json + {WEIGHTS}) or the id of an "
                            "installed model (`mim3d models import FILE.zip` installs a zipped package).")
    installed = ", ".join(m.id for m in list_installed(home)) or "none"
    raise BadInputError(f"--model {name_or_path}: no such folder and no installed model with that id in {home} "
                        f"(installed: {installed}); see `mim3d models list`.")


# ---- catalog ------------------------------------------------------------------------------------------------------

def list_available(catalog_path: str | Path = DEFAULT_CATALOG) -> list[CatalogEntry]:
    """The checked entries of a catalog file; [] when the file does not exist.

    Raises:
        BadInputError: unreadable JSON or an entry that breaks the schema (naming the entry and field).
    """
    path = Path(catalog_path)
    if not path.is_file():
        return []
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise BadInputError(f"{path}: not readable JSON ({e})") from e
    if not isinstance(data, dict) or not isinstance(data.get("models"), list):
        raise BadInputError(f'{path}: expected {{"models": [...]}}')
    entries = [check_entry(entry, f"{path}: models[{i}]") for i, entry in enumerate(data["models"])]
    ids = [e.id for e in entries]
    if len(set(ids)) != len(ids):
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        raise BadInputError(f"{path}: model ids must be unique; repeated: {repeated}")
    return entries


def check_entry(entry: Any, where: str) -> CatalogEntry:
    """A catalog entry checked against the schema (``ENTRY_FIELDS``); BadInputError names ``where`` and the field."""
    if not isinstance(entry, dict):
        raise BadInputError(f"{where}: expected an object, got {entry!r}")
    unknown = sorted(set(entry) - set(ENTRY_FIELDS))
    if unknown:
        raise BadInputError(f"{where}: unknown field(s) {unknown}; allowed: {', '.join(ENTRY_FIELDS)}")
    for name, (kind, required) in ENTRY_FIELDS.items():
        if name not in entry:
            if required:
                raise BadInputError(f"{where}: field '{name}' is missing")
            continue
        if not isinstance(entry[name], kind) or isinstance(entry[name], bool):
            raise BadInputError(f"{where}.{name}: {entry[name]!r} is not a {kind.__name__}")
    check_id(entry["id"])
    if not re.fullmatch(r"\d+\.\d+\.\d+([-+.][0-9A-Za-z.-]+)?", entry["version"]):
        raise BadInputError(f"{where}.version: {entry['version']!r} is not a semantic version like 1.0.0")
    if not entry["url"].startswith(("https://", "http://")):
        raise BadInputError(f"{where}.url: {entry['url']!r} must be an http(s) URL")
    if not re.fullmatch(r"[0-9a-f]{64}", entry["sha256"]):
        raise BadInputError(f"{where}.sha256: must be 64 lower-case hexadecimal digits")
    if entry["size"] <= 0:
        raise BadInputError(f"{where}.size: {entry['size']} must be the archive's size in bytes (> 0)")
    expected = entry["expected"]
    for name in EXPECTED_FIELDS:
        if name not in expected:
            raise BadInputError(f"{where}.expected: field '{name}' is missing (null if not measured)")
        value = expected[name]
        if value is not None and (not isinstance(value, int | float) or isinstance(value, bool) or value < 0):
            raise BadInputError(f"{where}.expected.{name}: {value!r} must be a number >= 0, or null if not measured")
    if set(expected) - set(EXPECTED_FIELDS):
        raise BadInputError(f"{where}.expected: unknown field(s) {sorted(set(expected) - set(EXPECTED_FIELDS))}")
    return CatalogEntry(**{k: entry[k] for k in ENTRY_FIELDS if ENTRY_FIELDS[k][1]},
                        extra={k: entry[k] for k in ENTRY_FIELDS if not ENTRY_FIELDS[k][1] and k in entry})


def catalog_entry(model_id: str, catalog_path: str | Path = DEFAULT_CATALOG) -> CatalogEntry:
    entries = list_available(catalog_path)
    match = next((e for e in entries if e.id == model_id), None)
    if match is None:
        listed = ", ".join(e.id for e in entries) or "none"
        raise BadInputError(f"{catalog_path}: lists no model '{model_id}' (available: {listed}).")
    return match


# ---- download -----------------------------------------------------------------------------------------------------

def download(entry: CatalogEntry, progress: Progress | None = None, cancel: Callable[[], bool] | None = None,
             home: Path | None = None) -> Path:
    """Download, verify and install ``entry`` as ``<home>/<id>``; returns that folder (module docstring: steps).

    ``progress("download", fraction, message)`` follows the bytes; ``cancel()`` is polled between chunks and stops
    with ``Cancelled``, keeping the partial file for the next call to resume.

    Raises:
        DownloadError: network failure or interruption (run again to resume), wrong size or SHA-256 (the file is
            deleted), an archive that is not a valid package.
        Cancelled: ``cancel()`` returned True.
    """
    home = home or models_home()
    progress = progress or (lambda stage, fraction, message: None)
    if _is_installed(entry, home):
        progress("verify", 1.0, f"{entry.id} {entry.version} is already installed and verified")
        return home / entry.id
    part = home / ".downloads" / f"{entry.id}-{entry.version}.zip.part"
    part.parent.mkdir(parents=True, exist_ok=True)
    if part.exists() and part.stat().st_size > entry.size:
        part.unlink()
    if not part.exists() or part.stat().st_size < entry.size:
        _fetch(entry, part, progress, cancel)
    progress("verify", 0.0, "checking size and SHA-256")
    size, digest = part.stat().st_size, file_sha256(part)
    if size != entry.size or digest != entry.sha256:
        part.unlink()
        found = f"{size} bytes" if size != entry.size else f"SHA-256 {digest}"
        raise DownloadError(f"{entry.url}: the download does not match the catalog ({found}; expected "
                            f"{entry.size} bytes, SHA-256 {entry.sha256}); it is corrupt or was altered, and was "
                            "deleted. Try again later or report it.")
    try:
        target = _install_archive(part, entry.id, home, replace=True)
    except BadInputError as e:
        part.unlink()
        raise DownloadError(f"{entry.url}: verified download is not a usable model package: {e}") from e
    part.unlink()
    progress("verify", 1.0, f"installed {entry.id} {entry.version}")
    return target


def _is_installed(entry: CatalogEntry, home: Path) -> bool:
    try:
        return verify_package(home / entry.id).version == entry.version
    except BadInputError:
        return False


def _fetch(entry: CatalogEntry, part: Path, progress: Progress, cancel: Callable[[], bool] | None) -> None:
    have = part.stat().st_size if part.exists() else 0
    headers = {"User-Agent": f"mim3d/{__version__}"}
    if have:
        headers["Range"] = f"bytes={have}-"
    try:
        with urllib.request.urlopen(urllib.request.Request(entry.url, headers=headers), timeout=TIMEOUT_S) as resp:
            resumed = have > 0 and resp.status == 206 and resp.headers.get("Content-Range", "").startswith(
                f"bytes {have}-")
            have = have if resumed else 0  # a 200 answer is the whole file again
            with open(part, "ab" if resumed else "wb") as f:
                while chunk := resp.read(CHUNK_BYTES):
                    f.write(chunk)
                    have += len(chunk)
                    progress("download", min(1.0, have / entry.size),
                             f"{have / 1e6:.1f} of {entry.size / 1e6:.1f} MB{' (resumed)' if resumed else ''}")
                    if cancel is not None and cancel():
                        raise Cancelled(f"download of {entry.id} stopped at {have} of {entry.size} bytes; run it "
                                        "again to resume")
            if have < entry.size:  # urllib reports a connection closed early as a short read, not an error
                raise http.client.IncompleteRead(b"", entry.size - have)
    except urllib.error.HTTPError as e:
        if e.code == 416:  # nothing beyond what we have: the file is shorter than the catalog says
            part.unlink(missing_ok=True)
        raise DownloadError(f"{entry.url}: the server answered {e.code} {e.reason}.") from e
    except (urllib.error.URLError, http.client.HTTPException, OSError) as e:
        raise DownloadError(f"{entry.url}: download interrupted after {have} of {entry.size} bytes ({e}); run the "
                            "same command again to resume, or download the file by hand and `mim3d models import` "
                            "it.") from e


# ---- install, import, verify, delete ------------------------------------------------------------------------------

def import_package(path: str | Path, model_id: str | None = None, home: Path | None = None) -> Path:
    """Install a package folder or ``.zip`` as ``<home>/<id>`` (id: ``model_id``, else the package's name).

    Raises:
        BadInputError: not a package, weights that fail their checksum, an unsafe zip, an id already installed.
    """
    home = home or models_home()
    path = Path(path)
    if path.is_file() and zipfile.is_zipfile(path):
        return _install_archive(path, model_id, home, replace=False)
    if path.is_dir():
        info = verify_package(path)
        model_id = check_id(model_id or info.name)
        staging = _staging(home, model_id)
        try:
            for name in (MODEL_JSON, WEIGHTS):
                shutil.copy2(path / name, staging / name)
            verify_package(staging)
            return _move_into_place(staging, home / model_id, replace=False)
        finally:
            shutil.rmtree(staging, ignore_errors=True)
    raise BadInputError(f"{path}: not a model package folder or a .zip of one.")


def verify(model_id: str, home: Path | None = None) -> ModelInfo:
    """Check an installed model (``verify_package``)."""
    return verify_package(_installed_folder(model_id, home))


def info(model_id: str, home: Path | None = None) -> dict[str, Any]:
    """An installed model's description for people: label table, provenance, settings, files."""
    folder = _installed_folder(model_id, home)
    model = read_model_json(folder)
    weights = folder / WEIGHTS
    return {"id": model_id, "path": str(folder), "name": model.name, "version": model.version,
            "description": model.description, "license": model.license, "labels": model.labels.to_dict()["labels"],
            "provenance": model.provenance, "architecture": model.architecture, "preprocessing": model.preprocessing,
            "inference": model.inference, "weights_sha256": model.weights_sha256,
            "weights_bytes": weights.stat().st_size if weights.is_file() else None}


def delete(model_id: str, home: Path | None = None) -> None:
    """Remove an installed model (renamed aside first, so a failure never leaves half a package under its id)."""
    folder = _installed_folder(model_id, home)
    trash = Path(tempfile.mkdtemp(dir=folder.parent, prefix=f".{model_id}.deleted."))
    os.replace(folder, trash / model_id)
    shutil.rmtree(trash)


def _installed_folder(model_id: str, home: Path | None) -> Path:
    home = home or models_home()
    folder = home / check_id(model_id)
    if not folder.is_dir():
        installed = ", ".join(m.id for m in list_installed(home)) or "none"
        raise BadInputError(f"model '{model_id}' is not installed in {home} (installed: {installed}).")
    return folder


def _staging(home: Path, model_id: str) -> Path:
    home.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(dir=home, prefix=f".{model_id}.staging."))


def _install_archive(archive: Path, model_id: str | None, home: Path, replace: bool) -> Path:
    staging = _staging(home, model_id or "import")
    try:
        root = _extract(archive, staging)
        info = verify_package(root)
        model_id = check_id(model_id or info.name)
        return _move_into_place(root, home / model_id, replace)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _extract(archive: Path, staging: Path) -> Path:
    """Extract a zip into ``staging`` after refusing absolute paths, '..' and links; returns the package folder
    (the archive's top level or its single top folder)."""
    try:
        with zipfile.ZipFile(archive) as zf:
            for member in zf.infolist():
                name = member.filename
                parts = Path(name.replace("\\", "/")).parts
                is_link = (member.external_attr >> 16) & 0o170000 == 0o120000
                if name.startswith(("/", "\\")) or ".." in parts or (parts and ":" in parts[0]) or is_link:
                    raise BadInputError(f"{archive}: member '{name}' would be written outside the package folder "
                                        "(absolute path, '..' or a link); the archive is refused.")
            zf.extractall(staging)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise BadInputError(f"{archive}: not a readable zip archive ({e})") from e
    if (staging / MODEL_JSON).is_file():
        return staging
    tops = [p for p in staging.iterdir() if not p.name.startswith("__MACOSX")]
    if len(tops) == 1 and (tops[0] / MODEL_JSON).is_file():
        return tops[0]
    raise BadInputError(f"{archive}: holds no {MODEL_JSON} at its top level or in a single top folder.")


def _move_into_place(source: Path, target: Path, replace: bool) -> Path:
    if target.exists():
        if not replace:
            raise BadInputError(f"model '{target.name}' is already installed in {target.parent}; delete it first "
                                f"(`mim3d models delete {target.name}`) or import it under another id (--id).")
        old = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.old."))
        os.replace(target, old / target.name)
        os.replace(source, target)
        shutil.rmtree(old)
    else:
        os.replace(source, target)
    return target

