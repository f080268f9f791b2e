"""The label table: which voxel value means which structure, with its colour. Standard library only (Slicer reads it).

Background convention: value 0 is always the background and is never listed. A table holds the foreground labels,
values 1..255, in order; an explicit background entry in an input (``"0": "background"``, ``{"value": 0}``) is
accepted and dropped. Channel v of a segmentation network predicts value v, so it has ``num_classes = max value + 1``
outputs (a gap in the values is a channel that is never trained).

``labels.json`` schema (the file ``--label-table`` reads and ``model.json`` embeds)::

    {"labels": [
        {"value": 1, "name": "liver", "color": [221, 130, 101],
         "terminology": {"category": ["SCT", "123037004", "Anatomical Structure"],
                         "type": ["SCT", "10200004", "Liver"]}},
        {"value": 2, "name": "spleen"}
    ]}

``value`` (int 1..255) and ``name`` (non-empty, unique) are required; ``color`` ([r, g, b], each 0..255) defaults to
``DEFAULT_COLORS`` by value; ``terminology`` (optional) is a free-form dict of standard codes, as 3D Slicer's
segment terminology (``slicerio`` gives the same keys).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import BadInputError

MAX_VALUE = 255  # labels are stored as uint8 label maps

# A fixed palette of distinct colours, cycled by value (value 1 -> first entry); from 3D Slicer's generic anatomy
# colours of common abdominal structures, then clearly different hues.
DEFAULT_COLORS: tuple[tuple[int, int, int], ...] = (
    (157, 108, 162), (185, 102, 83), (221, 130, 101), (216, 101, 79), (230, 220, 70), (145, 60, 66), (255, 181, 158),
    (0, 151, 206), (250, 250, 225), (128, 174, 128), (241, 214, 145), (177, 122, 101), (111, 184, 210),
    (183, 156, 220), (47, 150, 103), (244, 214, 49), (200, 200, 235), (250, 210, 139), (55, 128, 216),
    (226, 66, 109))


def _is_rgb(color: object) -> bool:
    return (isinstance(color, tuple | list) and len(color) == 3
            and all(isinstance(c, int) and not isinstance(c, bool) and 0 <= c <= 255 for c in color))


def default_color(value: int) -> tuple[int, int, int]:
    """The palette colour of label ``value`` (1-based, cycling)."""
    return DEFAULT_COLORS[(value - 1) % len(DEFAULT_COLORS)]


@dataclass(frozen=True)
class Label:
    """One foreground label: voxel value 1..255, unique name, display colour (0..255 RGB), optional terminology."""

    value: int
    name: str
    color: tuple[int, int, int]
    terminology: dict[str, Any] | None = field(default=None, hash=False)

    def to_dict(self) -> dict[str, Any]:
        entry: dict[str, Any] = {"value": self.value, "name": self.name, "color": list(self.color)}
        if self.terminology:
            entry["terminology"] = self.terminology
        return entry


@dataclass(frozen=True)
class LabelTable:
    """Ordered foreground labels (background 0 is implicit); checked on construction.

    ``source`` names where the table came from (a file, "dataset.json labels", ...) and prefixes every error message.

    Raises:
        BadInputError: a value outside 1..255 or repeated, an empty or repeated name, a colour not three 0..255 ints.
    """

    labels: tuple[Label, ...]
    source: str = field(default="label table", compare=False)

    def __post_init__(self) -> None:
        if not self.labels:
            raise BadInputError(f"{self.source}: has no labels; list at least one foreground label (value 1..255).")
        values, names = set(), set()
        for i, label in enumerate(self.labels):
            where = f"{self.source}: labels[{i}]"
            if not isinstance(label.value, int) or isinstance(label.value, bool) or not 1 <= label.value <= MAX_VALUE:
                raise BadInputError(f"{where}.value: {label.value!r} is not an integer in 1..{MAX_VALUE} "
                                    "(0 is the implicit background).")
            if not isinstance(label.name, str) or not label.name.strip():
                raise BadInputError(f"{where}.name: {label.name!r} must be a non-empty text.")
            if label.value in values:
                raise BadInputError(f"{where}.value: {label.value} is used twice (again by '{label.name}').")
            if label.name in names:
                raise BadInputError(f"{where}.name: '{label.name}' is used twice; label names must be unique.")
            if not _is_rgb(label.color):
                raise BadInputError(f"{where}.color: {label.color!r} must be three integers 0..255 [r, g, b].")
            if label.terminology is not None and not isinstance(label.terminology, dict):
                raise BadInputError(f"{where}.terminology: must be an object, got {label.terminology!r}.")
            values.add(label.value)
            names.add(label.name)

    def __iter__(self) -> Iterator[Label]:
        return iter(self.labels)

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def values(self) -> tuple[int, ...]:
        return tuple(label.value for label in self.labels)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(label.name for label in self.labels)

    @property
    def num_classes(self) -> int:
        """Network output channels: background 0 plus one per value up to the largest."""
        return max(self.values) + 1

    def by_name(self, name: str) -> Label | None:
        return next((label for label in self.labels if label.name == name), None)

    def by_value(self, value: int) -> Label | None:
        return next((label for label in self.labels if label.value == value), None)

    def describe(self) -> str:
        """"1 liver, 2 spleen, ..." for messages."""
        return ", ".join(f"{label.value} {label.name}" for label in self.labels)

    def to_dict(self) -> dict[str, Any]:
        """The labels.json object (module docstring)."""
        return {"labels": [label.to_dict() for label in self.labels]}

    @classmethod
    def from_dict(cls, data: Any, source: str = "label table") -> LabelTable:
        """A table from a labels.json object (module docstring); ``source`` names it in messages."""
        entries = data.get("labels") if isinstance(data, dict) else None
        if not isinstance(entries, list):
            raise BadInputError(f'{source}: expected an object {{"labels": [{{"value": 1, "name": "liver"}}, ...]}}.')
        labels = []
        for i, entry in enumerate(entries):
            if not isinstance(entry, dict) or "value" not in entry or "name" not in entry:
                raise BadInputError(f'{source}: labels[{i}]: expected {{"value": ..., "name": ...}}, got {entry!r}.')
            if entry["value"] == 0:
                continue  # the implicit background
            color = entry.get("color")
            if color is None:
                color = default_color(entry["value"]) if isinstance(entry["value"], int) else (0, 0, 0)
            labels.append(Label(entry["value"], entry["name"], tuple(color) if isinstance(color, list) else color,
                                entry.get("terminology")))
        return cls(tuple(labels), source)

    @classmethod
    def load(cls, path: str | Path) -> LabelTable:
        """Read a labels.json file.

        Raises:
            BadInputError: missing file, invalid JSON or an invalid table (naming the file and field).
        """
        path = Path(path)
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError as e:
            raise BadInputError(f"{path}: no such file.") from e
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            raise BadInputError(f"{path}: is not a readable JSON file: {e}") from e
        return cls.from_dict(data, str(path))

    def save(self, path: str | Path) -> None:
        """Write labels.json atomically (temporary file in the same folder, then rename)."""
        path = Path(path)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(self.to_dict(), f, indent=1)
                f.write("\n")
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)


def from_dataset_json(data: Mapping[str, Any], source: str = "dataset.json") -> LabelTable:
    """The table from an MSD / nnU-Net dataset.json's ``labels``, in either style, with default colours.

    MSD and nnU-Net v1: ``{"0": "background", "1": "liver"}``; nnU-Net v2: ``{"background": 0, "liver": 1}``. Region
    labels of nnU-Net v2 (a list of values for one name) are refused.
    """
    labels = data.get("labels") if isinstance(data, Mapping) else None
    if not isinstance(labels, Mapping) or not labels:
        raise BadInputError(f'{source}: has no "labels" object like {{"0": "background", "1": "liver"}}.')
    pairs = []
    for key, item in labels.items():
        if isinstance(item, str):  # MSD: value -> name
            value, name = key, item
        else:  # nnU-Net v2: name -> value
            value, name = item, key
        try:
            value = int(value)
        except (TypeError, ValueError) as e:
            raise BadInputError(f'{source}: labels: "{key}": {item!r} is not a value/name pair (nnU-Net region labels '
                                "are not supported).") from e
        if value != 0:
            pairs.append((value, name))
    return LabelTable(tuple(Label(v, n, default_color(v)) for v, n in sorted(pairs)), source)


def from_segment_names(names: Sequence[str], colors: Sequence[tuple[int, int, int] | None] | None = None,
                       terminologies: Sequence[dict | None] | None = None, source: str = "segment names") -> LabelTable:
    """A table numbering ``names`` 1, 2, ... in order (e.g. the segments of .seg.nrrd files).

    ``colors`` (0..255 RGB; None for the default) and ``terminologies`` run parallel to ``names``.
    """
    colors = colors or [None] * len(names)
    terminologies = terminologies or [None] * len(names)
    return LabelTable(tuple(Label(i, name, tuple(color) if color else default_color(i), terminology)
                            for i, (name, color, terminology) in enumerate(zip(names, colors, terminologies,
                                                                                strict=True), start=1)), source)


__all__ = ["Label", "LabelTable", "DEFAULT_COLORS", "MAX_VALUE", "default_color", "from_dataset_json",
           "from_segment_names"]
