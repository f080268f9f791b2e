"""The Segment panel's model list: installed packages first, then catalog entries not installed yet. Stdlib only.

Each choice carries what the panel shows: a title for the combo box and a detail line (description, labels, size,
expected time and memory), so the user can judge a model before downloading it. ``ModelList`` keeps the list and
tells when the registry has changed since it was read, so a model that MiMPretrain registers (or anything else
installs, replaces or deletes) appears when the Segment panel is next shown, without anyone touching the panel.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from mim3d import registry


@dataclass(frozen=True)
class ModelChoice:
    id: str
    title: str  # combo-box text
    detail: str  # one paragraph under the combo box
    installed: bool
    usable: bool  # installed and readable (a broken folder is listed, with its problem, but cannot be used)
    downloadable: bool  # in the catalog and not installed at the catalog's version


def _size(n_bytes: int) -> str:
    return f"{n_bytes / 1e6:.0f} MB" if n_bytes < 1e9 else f"{n_bytes / 1e9:.1f} GB"


def _expected(entry: registry.CatalogEntry) -> str:
    e = entry.expected
    parts = []
    if e.get("gpu_seconds") is not None:
        memory = f", {e['gpu_memory_gb']:g} GB GPU memory" if e.get("gpu_memory_gb") is not None else ""
        parts.append(f"about {e['gpu_seconds']:g} s on a GPU{memory}")
    if e.get("cpu_seconds") is not None:
        memory = f", {e['cpu_memory_gb']:g} GB RAM" if e.get("cpu_memory_gb") is not None else ""
        parts.append(f"about {e['cpu_seconds'] / 60:.0f} min on a CPU{memory}")
    return "; ".join(parts)


def model_choices(home: Path | None = None, catalog: Path | None = None) -> list[ModelChoice]:
    """Installed models (sorted by id), then downloadable catalog models that are not installed."""
    installed = registry.list_installed(home)
    available = registry.list_available(catalog or registry.DEFAULT_CATALOG)
    versions = {m.id: m.info.version for m in installed if m.info is not None}
    choices = []
    for model in installed:
        if model.info is None:
            choices.append(ModelChoice(model.id, f"{model.id} (unreadable)", f"{model.path}: {model.problem}",
                                       True, False, False))
            continue
        info = model.info
        labels = ", ".join(info.labels.names)
        detail = f"{info.description} Segments: {labels}.".strip() if info.description else f"Segments: {labels}."
        choices.append(ModelChoice(model.id, f"{model.id} {info.version}", detail, True, True, False))
    for entry in available:
        if versions.get(entry.id) == entry.version:
            continue
        update = " (update)" if entry.id in versions else ""
        labels = entry.extra.get("labels")
        facts = [f"download {_size(entry.size)}", f"weights licence {entry.licence}", _expected(entry)]
        detail = " ".join(filter(None, [entry.description, f"Segments: {', '.join(labels)}." if labels else ""]))
        detail = f"{detail} ({'; '.join(filter(None, facts))})"
        if entry.id in versions:
            choices = [c for c in choices if c.id != entry.id]
        choices.append(ModelChoice(entry.id, f"{entry.name} {entry.version} — download{update}", detail,
                                   entry.id in versions, entry.id in versions, True))
    return choices


def registry_stamp(home: Path | None = None) -> tuple:
    """What changes when a model is installed, replaced or deleted: the models folder (``$MIM3D_HOME`` may change) and
    each model folder's name with its model.json's modification time and size. Nothing is parsed."""
    folder = home or registry.models_home()
    entries = []
    for child in sorted(folder.iterdir()) if folder.is_dir() else []:
        try:
            stat = (child / "model.json").stat()
            entries.append((child.name, stat.st_mtime_ns, stat.st_size))
        except OSError:
            entries.append((child.name, None, None))
    return (str(folder), *entries)


class ModelList:
    """The panel's model choices, read again by ``refresh()``; ``stale()`` says whether the registry changed since."""

    def __init__(self, home: Path | None = None, catalog: Path | None = None):
        self.home, self.catalog = home, catalog
        self.choices: list[ModelChoice] = []
        self._stamp: tuple | None = None

    def stale(self) -> bool:
        return self._stamp != registry_stamp(self.home)

    def refresh(self) -> list[ModelChoice]:
        self._stamp = registry_stamp(self.home)
        self.choices = model_choices(self.home, self.catalog)
        return self.choices
