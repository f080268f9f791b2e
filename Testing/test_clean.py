"""`mim3d clean`: list, dry-run and remove the model, example-data and cache folders under a real MIM3D_HOME; links
removed as links; a removal that fails names the path (exit 2); the command is light (no torch, no numpy)."""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from mim3d.__main__ import main
from mim3d.clean import folders
from mim3d.protocol import EXIT_BAD_INPUT, EXIT_OK, parse_line

REPO = Path(__file__).resolve().parents[1]
# bytes of each file written under MIM3D_HOME, by folder
FILES = {
    "models": {"tiny-abdomen/model.json": 100, "tiny-abdomen/weights.safetensors": 5000,
               ".downloads/tiny-abdomen-1.0.0.zip.part": 3000},
    "example-data": {"example_ct.nii.gz": 7000, "dicom/1.dcm": 600},
    "cache": {"pretrain-0123456789abcdef/key/image.npy": 4000, "file-hashes/ab.json": 50},
}
SIZES = {name: sum(files.values()) for name, files in FILES.items()}


@pytest.fixture
def filled(mim3d_home: Path) -> Path:
    """MIM3D_HOME with every folder filled, plus a file of the user's that is in none of them."""
    for name, files in FILES.items():
        for relative, size in files.items():
            path = mim3d_home / name / relative
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(b"x" * size)
    (mim3d_home / "notes.txt").write_text("mine")
    return mim3d_home


@pytest.fixture
def clean(capsys, caplog):
    """Runs `mim3d clean ARGS` in this process: (exit code, its one protocol event, its log text for stderr)."""
    caplog.set_level(logging.INFO, logger="mim3d.clean")

    def run(*argv: str) -> tuple[int, dict, str]:
        caplog.clear()
        code = main(["clean", *argv])
        events = [e for e in map(parse_line, capsys.readouterr().out.splitlines()) if e]
        assert len(events) == 1, events
        return code, events[0], caplog.text
    return run


def test_the_folders_follow_mim3d_home_else_the_home_directory(mim3d_home, monkeypatch, tmp_path):
    assert folders() == {"models": mim3d_home / "models", "example-data": mim3d_home / "example-data",
                         "cache": mim3d_home / "cache"}
    monkeypatch.delenv("MIM3D_HOME")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert folders() == {"models": tmp_path / ".mim3d" / "models",
                         "example-data": tmp_path / ".cache" / "mim3d" / "example-data",
                         "cache": tmp_path / ".cache" / "mim3d" / "cache"}


def test_without_a_selection_it_lists_each_folder_with_its_size_and_removes_nothing(filled, clean):
    shutil.rmtree(filled / "cache")
    code, result, err = clean()
    assert code == EXIT_OK and result["removed_bytes"] == 0 and result["dry_run"] is False
    assert result["folders"] == [
        {"name": "models", "path": str(filled / "models"), "exists": True, "bytes": 8100, "selected": False},
        {"name": "example-data", "path": str(filled / "example-data"), "exists": True, "bytes": 7600,
         "selected": False},
        {"name": "cache", "path": str(filled / "cache"), "exists": False, "bytes": 0, "selected": False}]
    assert "8.1 kB" in err and str(filled / "models") in err and "nothing removed" in err
    assert (filled / "models" / "tiny-abdomen" / "weights.safetensors").is_file()
    assert (filled / "example-data" / "example_ct.nii.gz").is_file()


def test_a_dry_run_says_what_would_be_removed_and_removes_nothing(filled, clean):
    code, result, err = clean("--all", "--dry-run")
    assert code == EXIT_OK and result["dry_run"] is True and result["removed_bytes"] == 0
    assert [(f["name"], f["bytes"], f["selected"]) for f in result["folders"]] == \
        [(name, SIZES[name], True) for name in FILES]
    assert err.count("(would be removed)") == 3
    assert all((filled / name / relative).is_file() for name, files in FILES.items() for relative in files)


def test_only_the_selected_folders_are_removed_then_all_and_again_nothing(filled, clean):
    code, result, err = clean("--models", "--cache")
    assert code == EXIT_OK and result["removed_bytes"] == SIZES["models"] + SIZES["cache"]
    assert [f["selected"] for f in result["folders"]] == [True, False, True]
    assert sorted(p.name for p in filled.iterdir()) == ["example-data", "notes.txt"]
    assert (filled / "example-data" / "dicom" / "1.dcm").stat().st_size == 600
    assert "removed 8.1 kB" in err

    code, result, _ = clean("--all")
    assert code == EXIT_OK and result["removed_bytes"] == SIZES["example-data"]
    assert [p.name for p in filled.iterdir()] == ["notes.txt"]

    code, result, err = clean("--all")
    assert code == EXIT_OK and result["removed_bytes"] == 0 and err.count("(nothing to remove)") == 3


def test_links_inside_are_removed_as_links_and_what_they_point_to_is_kept(filled, tmp_path, clean):
    outside = tmp_path / "outside"
    (outside / "scans").mkdir(parents=True)
    (outside / "scans" / "ct.nii.gz").write_bytes(b"y" * 9000)
    (outside / "single.npy").write_bytes(b"z" * 10)
    cache = filled / "cache"
    (cache / "linked-folder").symlink_to(outside / "scans", target_is_directory=True)
    (cache / "pretrain-0123456789abcdef" / "linked-file.npy").symlink_to(outside / "single.npy")

    code, result, _ = clean("--cache", "--dry-run")
    assert result["folders"][2]["bytes"] == SIZES["cache"]  # link targets are not counted
    code, result, _ = clean("--cache")
    assert code == EXIT_OK and result["removed_bytes"] == SIZES["cache"] and not os.path.lexists(cache)
    assert (outside / "scans" / "ct.nii.gz").stat().st_size == 9000 and (outside / "single.npy").is_file()


def test_a_folder_that_is_itself_a_link_is_emptied_and_the_link_kept(filled, tmp_path, clean):
    other_disk = tmp_path / "other-disk" / "cache"
    shutil.move(filled / "cache", other_disk)
    (filled / "cache").symlink_to(other_disk, target_is_directory=True)
    code, result, _ = clean("--cache")
    assert code == EXIT_OK and result["removed_bytes"] == SIZES["cache"]
    assert (filled / "cache").is_symlink() and other_disk.is_dir() and not list(other_disk.iterdir())


def _without_root_privileges() -> list[str]:
    """A command prefix under which permissions apply: none for a user, for root a capability-less setpriv."""
    if getattr(os, "geteuid", lambda: 1)() != 0:
        return []
    prefix = ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner"]
    if not shutil.which("setpriv") or subprocess.run([*prefix, "true"], capture_output=True).returncode != 0:
        pytest.skip("running as root, and setpriv cannot drop the capabilities that bypass permissions")
    return prefix


def test_a_removal_that_fails_exits_2_naming_the_path(filled):
    locked = filled / "cache" / "locked"
    locked.mkdir()
    (locked / "entry.npy").write_bytes(b"x")
    (locked / "entry.npy").chmod(0o444)  # stops the removal on Windows
    locked.chmod(0o555)  # and on POSIX
    env = {**os.environ, "PYTHONPATH": str(REPO / "MiMSegmentation"), "MIM3D_HOME": str(filled)}
    try:
        proc = subprocess.run([*_without_root_privileges(), sys.executable, "-m", "mim3d", "clean", "--cache"],
                              capture_output=True, text=True, env=env, timeout=60)
    finally:
        locked.chmod(0o755)
        (locked / "entry.npy").chmod(0o644)
    events = [e for e in map(parse_line, proc.stdout.splitlines()) if e]
    assert proc.returncode == EXIT_BAD_INPUT, proc.stderr
    assert events == [{"type": "error", "kind": "bad_input", "message": events[0]["message"]}]
    assert events[0]["message"].startswith(f"{locked / 'entry.npy'}: cannot remove (")
    assert str(locked / "entry.npy") in proc.stderr
    assert (locked / "entry.npy").is_file() and (filled / "models" / "tiny-abdomen").is_dir()


def test_clean_runs_without_torch_or_numpy(filled):
    code = ("import sys\n"
            "for name in ('torch', 'numpy', 'SimpleITK', 'monai'):\n"
            "    sys.modules[name] = None\n"
            "from mim3d.__main__ import main\n"
            "sys.exit(main(['clean', '--all']))\n")
    env = {**os.environ, "PYTHONPATH": str(REPO / "MiMSegmentation"), "MIM3D_HOME": str(filled)}
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert [p.name for p in filled.iterdir()] == ["notes.txt"]
