"""Where the fine-tune panel's labelled cases come from: the four data sources, what each passes to `mim3d finetune`,
how many cases it has, which labels it names, and what is written before a run starts. Qt-free; scene nodes are real
MRML nodes (``slicer-core`` on the host).

    data = FinetuneData(DataSource.SCENE, scene_nodes=(segmentation,))
    data.problems(settings)            # what stops Start, in plain words
    data.case_count()                  # for the time estimate (None where counting is not cheap)
    data.options_to_start(run_folder)  # the data options of the run (scene segmentations exported first)
"""

from __future__ import annotations

import enum
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import slicer

from mim3d.labels import LabelTable, from_dataset_json

from .scene_export import export_training_data, label_table_of_segmentations
from .training_settings import FinetuneSettings

NO_CHECKED_SEGMENTATION = "Check at least one segmentation in the scene."
NO_SOURCE_PREFIX = "Choose one source"  # FinetuneSettings.check(): no data option given (the scene's come at Start)


class DataSource(enum.Enum):
    """The fine-tune form's choice of labelled data (stored by name in the parameter node)."""

    FOLDERS = "images + labels folders"
    DATASET = "dataset.json"
    SEGMENTATION_FILES = "folder of .seg.nrrd"
    SCENE = "segmentations in the scene"

    def label(self) -> str:
        """The text of the chooser's item (parameterNodeWrapper's combo box connector calls it)."""
        return self.value


# The form fields each source uses (the others are disabled while it is chosen).
SOURCE_FIELDS = {DataSource.FOLDERS: ("images", "labels", "label_table"), DataSource.DATASET: ("dataset",),
                 DataSource.SEGMENTATION_FILES: ("segmentations",), DataSource.SCENE: ("scene_nodes",)}


@dataclass(frozen=True)
class FinetuneData:
    """The labelled-data part of the fine-tune form: the chosen source, its path fields ("" when empty; the fields of
    other sources are ignored) and the segmentation nodes checked in the scene."""

    source: DataSource
    images: str = ""
    labels: str = ""
    label_table: str = ""
    dataset: str = ""
    segmentations: str = ""
    scene_nodes: tuple[Any, ...] = ()

    def options(self) -> dict[str, str | None]:
        """The source's data options for FinetuneSettings; none for scene segmentations (exported at Start)."""
        return {field: getattr(self, field) or None for field in SOURCE_FIELDS[self.source]
                if field != "scene_nodes"}

    def problems(self, settings: FinetuneSettings) -> list[str]:
        """What stops Start: the settings' problems, where scene segmentations count as the source once one is
        checked (their files are written at Start, so "choose one source" does not apply)."""
        problems = settings.check()
        if self.source is not DataSource.SCENE:
            return problems
        missing = [] if self.scene_nodes else [NO_CHECKED_SEGMENTATION]
        return missing + [p for p in problems if not p.startswith(NO_SOURCE_PREFIX)]

    def case_count(self) -> int | None:
        """Labelled cases where counting is cheap: entries of the images folder, or checked segmentations."""
        if self.source is DataSource.SCENE:
            return len(self.scene_nodes)
        if self.source is DataSource.FOLDERS and self.images and Path(self.images).is_dir():
            return sum(1 for path in Path(self.images).iterdir() if not path.name.startswith("."))
        return None

    def labels_to_edit(self) -> LabelTable:
        """The label table the source names, to show and edit before starting.

        Raises:
            ValueError: the source names no labels yet (or a folder of .seg.nrrd files, which name their own).
            BadInputError: the file cannot be read as a label table.
        """
        if self.source is DataSource.FOLDERS and self.label_table:
            return LabelTable.load(self.label_table)
        if self.source is DataSource.DATASET and self.dataset:
            with open(self.dataset, encoding="utf-8") as f:
                return from_dataset_json(json.load(f), self.dataset)
        if self.source is DataSource.SCENE and self.scene_nodes:
            return label_table_of_segmentations(self.scene_nodes)
        raise ValueError("No labels to read: choose a label table file, a dataset.json, or scene segmentations "
                         "(a folder of .seg.nrrd files names its labels itself).")

    def options_to_start(self, run_folder: str, edited_labels: LabelTable | None = None) -> dict[str, str | None]:
        """The data options of a run in `run_folder`, after writing what it reads into `data_folder(run_folder)`:
        the checked scene segmentations as images + labels, or the label table as edited in the panel (its names
        and colours; the values stay the data's) in place of the chosen file."""
        if self.source is DataSource.SCENE:
            exported = export_training_data(scene_cases(self.scene_nodes), data_folder(run_folder))
            return {key: str(exported[key]) for key in ("images", "labels", "label_table")}
        options = self.options()
        if options.get("label_table") and edited_labels is not None and len(edited_labels):
            edited = data_folder(run_folder) / "labels.json"
            edited.parent.mkdir(parents=True, exist_ok=True)
            edited_labels.save(edited)
            options["label_table"] = str(edited)
        return options


def data_folder(run_folder: str) -> Path:
    """Where scene data and an edited label table for `run_folder` go: the sibling "<run>-data" (the run folder
    itself must be new for the worker). Raises ValueError without a run folder."""
    if not run_folder:
        raise ValueError("Choose a new run folder first.")
    run = Path(run_folder)
    return run.with_name(f"{run.name}-data")


def scene_cases(segmentation_nodes: Sequence[Any]) -> list[tuple[Any, Any]]:
    """(source volume, segmentation) of each node: the volume whose geometry the segmentation was made on.

    Raises:
        ValueError: a segmentation without a scalar source volume, named.
    """
    role = slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole()
    cases = []
    for node in segmentation_nodes:
        volume = node.GetNodeReference(role)
        if volume is None or not volume.IsA("vtkMRMLScalarVolumeNode"):
            raise ValueError(f"Segmentation '{node.GetName()}' has no source volume: choose it in the Segment Editor "
                             "first.")
        cases.append((volume, node))
    return cases
