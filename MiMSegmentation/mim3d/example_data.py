"""Real example CT / MR volumes for tests and the demo, from the TotalSegmentator 2.18.0 sdist. Standard library only.

The sdist of ``totalsegmentator==2.18.0`` on PyPI (Apache-2.0) ships small reference volumes. ``ensure()`` fetches it
once with the ordinary ``pip download``, refuses it unless its SHA-256 is ``SDIST_SHA256``, and extracts only the files
below (about 19 MB) into ``$MIM3D_HOME/example-data`` when MIM3D_HOME is set, else ``~/.cache/mim3d/example-data``.
Extraction goes to a temporary folder renamed into place when complete, with a ``manifest.json`` of each file's size
and SHA-256: every ``ensure()`` checks the sizes, the first one in a process (or ``full_check=True``) the hashes. A
folder extracted by an earlier version, whose manifest lacks files listed here, is fetched again and replaced.

Command line: ``python -m mim3d.example_data fetch [--cache DIR]`` prints the folder. Exit code 1: the download failed
(no network, pip error); 2: a file does not match its checksum.
"""

import argparse
import ast
import contextlib
import hashlib
import json
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

REQUIREMENT = "totalsegmentator==2.18.0"
SDIST = "totalsegmentator-2.18.0.tar.gz"
SDIST_SHA256 = "5d4223ef93973bc36d710869d11e7742ead2c154c72f7f9edcaaadd5b6c4bd03"
VOLUMES = ("example_ct.nii.gz", "example_ct_sm.nii.gz", "example_seg.nii.gz", "example_seg_fast_force_split.nii.gz",
           "example_seg_dicom.nii.gz", "example_mr_sm.nii.gz", "example_seg_mr.nii.gz")
DICOM_DIR = "example_ct_dicom"  # 20 JPEG 2000 lossless slices with empty UIDs (TEST_DATA.md §5)
# More real CTs, unlabelled here, for pre-training (TEST_DATA.md §3): cache name -> sdist member below reference_files
PRETRAIN_CTS = {"aorta_report_ct.nii.gz": "aorta_report/example_ct.nii.gz",  # chest + upper abdomen, 1.5 mm
                "pulmonary_report_ct.nii.gz": "pulmonary_report/models/ct_cropped.nii.gz"}  # thorax, 1.5 mm
# sdist member (below its top folder) -> name in the cache; the DICOM slices are matched by _cache_name
_MEMBERS = {f"tests/reference_files/{name}": name for name in VOLUMES} | {
    f"tests/reference_files/{member}": name for name, member in PRETRAIN_CTS.items()} | {
    "LICENSE": "LICENSE", "totalsegmentator/map_to_binary.py": "map_to_binary.py"}
_TOP = SDIST.removesuffix(".tar.gz") + "/"
_DICOM_PREFIX = f"tests/reference_files/{DICOM_DIR}/"
_fully_checked: set[Path] = set()  # folders already hashed in this process
log = logging.getLogger("mim3d.example_data")  # also when run as __main__


class ExampleDataError(RuntimeError):
    """The example data could not be obtained (``exit_code`` 1) or fails its checksums (2)."""

    def __init__(self, message: str, exit_code: int = 2):
        super().__init__(message)
        self.exit_code = exit_code


def default_cache_dir() -> Path:
    home = os.environ.get("MIM3D_HOME")
    return Path(home) / "example-data" if home else Path.home() / ".cache" / "mim3d" / "example-data"


def _sha256(file: Path) -> str:
    with open(file, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def verify_sdist(sdist: Path) -> None:
    """Raise ExampleDataError, naming the file, unless ``sdist`` has the pinned SHA-256."""
    actual = _sha256(sdist)
    if actual != SDIST_SHA256:
        raise ExampleDataError(f"{sdist}: SHA-256 is {actual}, expected {SDIST_SHA256} for {REQUIREMENT}; "
                               "the file is corrupt or not the pinned release, so nothing was extracted.")


def _cache_name(member: tarfile.TarInfo) -> str | None:
    """The member's name in the cache, or None for a member we do not extract."""
    if not member.isfile() or not member.name.startswith(_TOP):
        return None
    inner = member.name[len(_TOP):]
    slice_name = inner.removeprefix(_DICOM_PREFIX)
    if inner.startswith(_DICOM_PREFIX) and slice_name not in ("", ".", "..") and "/" not in slice_name:
        return f"{DICOM_DIR}/{slice_name}"
    return _MEMBERS.get(inner)


def install_sdist(sdist: Path, cache_dir: Path) -> Path:
    """Verify ``sdist``, extract the example files into ``cache_dir`` atomically with a manifest; return the folder."""
    verify_sdist(sdist)
    cache_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{cache_dir.name}-", dir=cache_dir.parent))
    try:
        staging.chmod(0o755)
        with tarfile.open(sdist, "r:gz") as tar:
            for member in tar:  # renamed out of the sdist's layout; the data filter still vets each member
                if (name := _cache_name(member)) is not None:
                    tar.extract(member.replace(name=name, deep=False), staging, filter="data")
        files = sorted(p for p in staging.rglob("*") if p.is_file())
        manifest = {"source": REQUIREMENT, "sdist_sha256": SDIST_SHA256, "files": {
            p.relative_to(staging).as_posix(): {"size": p.stat().st_size, "sha256": _sha256(p)} for p in files}}
        (staging / "manifest.json").write_text(json.dumps(manifest, indent=1) + "\n", encoding="utf-8")
        if cache_dir.exists() and not _complete(cache_dir):  # an earlier version's extraction: set it aside
            with contextlib.suppress(FileNotFoundError):  # unless another process already did
                cache_dir.rename(staging.with_name(staging.name + "-old"))
        try:
            staging.rename(cache_dir)
        except OSError:  # another process finished first: use its folder if it is complete
            if not _complete(cache_dir):
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        shutil.rmtree(staging.with_name(staging.name + "-old"), ignore_errors=True)
    _fully_checked.add(cache_dir.resolve())
    return cache_dir


def _download(into: Path) -> Path:
    log.info("downloading the %s sdist (38 MB) for the example data", REQUIREMENT)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", "--disable-pip-version-check",
           "-d", str(into), REQUIREMENT]
    done = subprocess.run(cmd, stdin=subprocess.DEVNULL, capture_output=True, text=True)
    if done.returncode != 0 or not (into / SDIST).is_file():
        tail = "\n".join((done.stdout + done.stderr).strip().splitlines()[-8:])
        raise ExampleDataError(f"could not download {REQUIREMENT} with pip (is PyPI reachable?):\n{tail}", exit_code=1)
    return into / SDIST


def _expected() -> set[str]:
    """The file names a complete extraction holds (the DICOM slices apart)."""
    return set(_MEMBERS.values())


def _complete(cache_dir: Path) -> bool:
    """Whether ``cache_dir`` holds a finished extraction by this version (its manifest lists every file we need)."""
    try:
        files = json.loads((cache_dir / "manifest.json").read_text(encoding="utf-8"))["files"]
    except (OSError, ValueError, KeyError):
        return False
    return _expected() <= set(files)


def verify(cache_dir: Path, full_check: bool = False) -> None:
    """Check each file in ``cache_dir`` against manifest.json: its size, and its SHA-256 when ``full_check``."""
    if not (cache_dir / "manifest.json").is_file():
        raise ExampleDataError(f"{cache_dir}: has no manifest.json; delete the folder and fetch again.")
    for name, entry in json.loads((cache_dir / "manifest.json").read_text(encoding="utf-8"))["files"].items():
        file = cache_dir / name
        size = file.stat().st_size if file.is_file() else None
        if size != entry["size"] or (full_check and _sha256(file) != entry["sha256"]):
            problem = "is missing" if size is None else "does not match its checksum in manifest.json"
            raise ExampleDataError(f"{file}: {problem}; delete {cache_dir} and fetch again "
                                   "(`python -m mim3d.example_data fetch`).")


def ensure(cache_dir: Path | str | None = None, full_check: bool = False) -> Path:
    """Return the folder holding the example files, downloading and extracting them first if it does not exist."""
    cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
    if not cache_dir.exists() or ((cache_dir / "manifest.json").is_file() and not _complete(cache_dir)):
        with tempfile.TemporaryDirectory(prefix="mim3d-sdist-") as tmp:
            return install_sdist(_download(Path(tmp)), cache_dir)
    verify(cache_dir, full_check=full_check or cache_dir.resolve() not in _fully_checked)
    _fully_checked.add(cache_dir.resolve())
    return cache_dir


def path(name: str, cache_dir: Path | str | None = None) -> Path:
    """Path of one example file or of the DICOM folder, e.g. ``path("example_ct.nii.gz")``."""
    names = (*VOLUMES, *PRETRAIN_CTS, DICOM_DIR, "LICENSE")
    if name not in names:
        raise ValueError(f"unknown example file {name!r}; choose from {', '.join(names)}")
    return ensure(cache_dir) / name


def class_names(task: str = "total", cache_dir: Path | str | None = None) -> dict[int, str]:
    """TotalSegmentator's label id -> class name for ``task``, parsed from map_to_binary.py as literals, never run."""
    body = ast.parse((ensure(cache_dir) / "map_to_binary.py").read_text(encoding="utf-8")).body
    node = next((n for n in body if isinstance(n, ast.Assign) and ast.unparse(n.targets[0]) == "class_map"), None)
    if node is None:
        raise ExampleDataError("map_to_binary.py: has no top-level `class_map = {...}` literal.")
    class_map = ast.literal_eval(node.value)
    if task not in class_map:
        raise ValueError(f"unknown TotalSegmentator task {task!r}; choose from {', '.join(sorted(class_map))}")
    return dict(class_map[task])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m mim3d.example_data", description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=["fetch"], help="download if needed, verify, and print the folder")
    parser.add_argument("--cache", type=Path, help=f"cache folder (default: {default_cache_dir()})")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    try:
        print(ensure(args.cache, full_check=True))
    except (ExampleDataError, OSError) as e:
        print(f"mim3d.example_data: error: {e}", file=sys.stderr)
        return getattr(e, "exit_code", 1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
