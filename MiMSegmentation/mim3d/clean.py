"""Remove what mim3d downloaded or cached outside run folders: model packages, the example data, the data cache.

    mim3d clean                      list each folder and its size; nothing is removed
    mim3d clean --models --cache     remove those folders
    mim3d clean --all [--dry-run]    all three (--dry-run: say what would go, remove nothing)

Folders (under $MIM3D_HOME when it is set):
    models        model packages, partial downloads  $MIM3D_HOME/models, else ~/.mim3d/models
    example-data  the example CT scans               $MIM3D_HOME/example-data, else ~/.cache/mim3d/example-data
    cache         pre-processed training volumes     $MIM3D_HOME/cache, else ~/.cache/mim3d/cache

Symbolic links (and Windows junctions) inside a folder are removed as links; what they point to is never touched.
A folder that is itself a link (e.g. a cache moved to another disk) is emptied and the link kept. Run folders and a
cache given with --cache to a training command are not touched. mim3d keeps no list of running trainings, so
stopping them before removing the cache is the user's part: a run whose cache entry vanishes while it reads or writes
it fails and can be resumed; on Windows a file a run has open cannot be removed and the command stops (exit 2).
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import stat
import sys
from pathlib import Path

from . import example_data, registry, run_options
from .errors import BadInputError
from .protocol import Emitter

log = logging.getLogger("mim3d.clean")
_ON_ERROR = "onexc" if sys.version_info >= (3, 12) else "onerror"  # onerror is deprecated from Python 3.12


def folders() -> dict[str, Path]:
    """Each removable folder by name (it may not exist)."""
    return {"models": registry.models_home(), "example-data": example_data.default_cache_dir(),
            "cache": run_options.default_cache_dir()}


def add_arguments(parser: argparse.ArgumentParser) -> None:
    for name in folders():
        parser.add_argument(f"--{name}", action="store_true", help=f"remove the {name} folder")
    parser.add_argument("--all", action="store_true", help="remove all three folders")
    parser.add_argument("--dry-run", action="store_true", help="say what would be removed; remove nothing")


def run(args: argparse.Namespace, emitter: Emitter) -> None:
    selected = [name for name in folders() if args.all or getattr(args, name.replace("-", "_"))]
    report, removed_bytes = [], 0
    for name, path in folders().items():
        exists, size = path.is_dir(), folder_bytes(path)
        report.append({"name": name, "path": str(path), "exists": exists, "bytes": size, "selected": name in selected})
        if name in selected and exists and not args.dry_run:
            remove_contents(path)
            removed_bytes += size
            log.info("%-12s removed %s  %s", name, _human(size), path)
        else:
            log.info("%-12s %10s  %s%s", name, _human(size) if exists else "-", path,
                     "" if name not in selected else " (would be removed)" if exists else " (nothing to remove)")
    if not selected:
        log.info("nothing removed; choose with --models, --example-data, --cache or --all")
    emitter.result(dry_run=args.dry_run, folders=report, removed_bytes=removed_bytes)


def folder_bytes(folder: Path) -> int:
    """Bytes of the regular files under ``folder``, links not followed (0 when it does not exist)."""
    total = 0
    for parent, _, files in os.walk(folder):  # does not enter linked folders
        for name in files:
            try:
                st = os.lstat(os.path.join(parent, name))
            except OSError:
                continue  # removed meanwhile
            total += st.st_size if stat.S_ISREG(st.st_mode) else 0
    return total


def remove_contents(folder: Path) -> None:
    """Remove everything in ``folder`` (links as links), then the folder itself unless it is a link.

    Raises:
        BadInputError: naming the file or folder that could not be removed.
    """
    try:
        for entry in os.scandir(folder):
            if entry.is_dir(follow_symlinks=False) and not _is_link(entry.path):
                shutil.rmtree(entry.path, **{_ON_ERROR: _name_the_full_path})
            else:
                os.unlink(entry.path)  # a file, a link, or (Windows) a junction
        if not _is_link(folder):
            folder.rmdir()
    except OSError as e:
        raise BadInputError(f"{e.filename or folder}: cannot remove ({e.strerror or e}); part of {folder} "
                            "may remain. Check its permissions (or close the program using it) and run the same "
                            "`mim3d clean` again.") from e


def _name_the_full_path(_function, path: str, error) -> None:
    """rmtree's error callback: its own OSError can carry only the last part of the path."""
    error = error[1] if isinstance(error, tuple) else error  # onerror gets sys.exc_info(), onexc the exception
    raise OSError(error.errno, error.strerror, path) from error


def _is_link(path: str | Path) -> bool:
    """A symbolic link or a Windows directory junction (os.path.isjunction: Python 3.12+)."""
    return os.path.islink(path) or getattr(os.path, "isjunction", lambda _: False)(path)


def _human(size: float) -> str:
    for unit in ("bytes", "kB", "MB"):
        if size < 1000:
            return f"{size:.0f} {unit}" if unit == "bytes" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"
