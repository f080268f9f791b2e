"""On-disk cache of pre-processed volumes, keyed on the bytes of the source files and the pre-processing settings.

Key: SHA-256 over (settings, extra key data, the SHA-256 of each source file's bytes). A changed file therefore never
serves a stale entry, whatever its size or time stamps. Hashing every file at every start would cost as much reading as
the data itself, so each file's hash is remembered in ``<cache>/file-hashes/`` together with the file's
(size, mtime_ns, ctime_ns, inode) and reused only while all four are unchanged: ctime changes on every write and cannot
be set by user tools, so an edited file (even one whose mtime was restored) is hashed again.

Entry: a folder ``<cache>/<kind>-<settings hash>/<key>/`` with ``image.npy`` (images in [0, 1] stored as uint16,
value·65535: a step of 1.5e-5, 0.03 HU of a 2000 HU window), optional ``label.npy`` (uint8) and ``meta.json``.
It is written into a temporary folder and renamed, so readers see it complete or not at all. The same quantisation is
applied without a cache, so a run gives the same values with and without one. Old entries are never deleted here;
delete the cache folder to reclaim space.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

QUANTUM = 65535  # image value v in [0, 1] is stored as round(v * QUANTUM) in uint16


def quantize(image: np.ndarray) -> np.ndarray:
    """[0, 1] float -> uint16 steps of 1/65535 (values outside are clipped)."""
    return np.round(np.clip(image, 0.0, 1.0) * QUANTUM).astype(np.uint16)


def dequantize(stored: np.ndarray) -> np.ndarray:
    """uint16 from ``quantize`` -> float32 in [0, 1]."""
    return np.asarray(stored, dtype=np.float32) / np.float32(QUANTUM)


def _stat_key(path: Path) -> list[int]:
    st = path.stat()
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]


def file_sha256(path: Path, memo_dir: Path | None) -> str:
    """SHA-256 of the file's bytes, remembered in ``memo_dir`` while its size, mtime, ctime and inode stay the same."""
    path = Path(path).resolve()
    stat = _stat_key(path)
    memo = memo_dir / f"{hashlib.sha256(str(path).encode()).hexdigest()}.json" if memo_dir else None
    if memo is not None and memo.is_file():
        try:
            remembered = json.loads(memo.read_text(encoding="utf-8"))
            if remembered["stat"] == stat:
                return remembered["sha256"]
        except (OSError, ValueError, KeyError):
            pass  # a damaged memo: hash again
    with open(path, "rb") as f:
        digest = hashlib.file_digest(f, "sha256").hexdigest()
    if memo is not None:
        _write_atomic(memo, json.dumps({"path": str(path), "stat": stat, "sha256": digest}).encode())
    return digest


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    finally:
        Path(tmp).unlink(missing_ok=True)


def settings_digest(settings: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(settings, sort_keys=True, default=str).encode()).hexdigest()


class PreprocessedCache:
    """Pre-processed arrays by source content; ``root=None`` means no cache (build every time, same values).

    Args:
        root: the cache folder (created on first write), or None.
        kind: names the sub-folder ("pretrain", "finetune").
        settings: everything the pre-processing depends on; part of every key.
    """

    def __init__(self, root: str | Path | None, kind: str, settings: dict[str, Any]):
        self.root = Path(root) if root is not None else None
        self.settings = settings
        self.folder = self.root / f"{kind}-{settings_digest(settings)[:16]}" if self.root else None

    def key(self, files: Sequence[Path], extra: Any = None) -> str:
        """The entry key of these source files (in order) plus ``extra`` (e.g. a label map)."""
        memo = self.root / "file-hashes" if self.root else None
        digests = [file_sha256(f, memo) for f in files]
        return settings_digest({"settings": self.settings, "extra": extra, "files": digests})

    def get(self, files: Sequence[Path], build: Callable[[], dict[str, Any]], extra: Any = None,
            mmap: bool = False) -> dict[str, Any]:
        """The entry for ``files``, built with ``build()`` and stored on a miss.

        ``build`` returns {"image": float array in [0, 1], "label": uint8 array (optional), "meta": JSON-able dict}.
        The result has the image as stored (uint16, see ``dequantize``; memory-mapped when ``mmap``), the label and
        the meta.
        """
        entry = self.folder / self.key(files, extra) if self.folder else None
        if entry is not None and (entry / "meta.json").is_file():
            return self._read(entry, mmap)
        built = build()
        arrays = {"image": quantize(built["image"])}
        if built.get("label") is not None:
            arrays["label"] = np.asarray(built["label"], dtype=np.uint8)
        if entry is not None:
            self._write(entry, arrays, built["meta"])
        return {**arrays, "meta": built["meta"]}

    @staticmethod
    def _read(entry: Path, mmap: bool) -> dict[str, Any]:
        out = {"meta": json.loads((entry / "meta.json").read_text(encoding="utf-8"))}
        for name in ("image", "label"):
            if (entry / f"{name}.npy").is_file():
                out[name] = np.load(entry / f"{name}.npy", mmap_mode="r" if mmap else None)
        return out

    @staticmethod
    def _write(entry: Path, arrays: dict[str, np.ndarray], meta: dict) -> None:
        entry.parent.mkdir(parents=True, exist_ok=True)
        staging = Path(tempfile.mkdtemp(dir=entry.parent, prefix=f".{entry.name}."))
        try:
            for name, array in arrays.items():
                np.save(staging / f"{name}.npy", array)
            # meta.json is written last: its presence marks the entry complete
            (staging / "meta.json").write_text(json.dumps(meta), encoding="utf-8")
            os.replace(staging, entry)
        except OSError:
            if not (entry / "meta.json").is_file():  # not another process finishing the same entry first
                raise
        finally:
            shutil.rmtree(staging, ignore_errors=True)


__all__ = ["PreprocessedCache", "file_sha256", "quantize", "dequantize", "QUANTUM"]
