"""Data for training: discovery of scans, fine-tuning sources and checks, and the MONAI pre-processing pipelines.

``discovery`` and ``finetune_sources`` need SimpleITK (and slicerio for .seg.nrrd); the ``transforms`` names (torch,
MONAI) are imported on first use, so discovering and checking data does not load torch.
"""

import importlib

from .discovery import Discovery, VolumeRecord, discover_volumes
from .finetune_sources import (
    FinetuneCase,
    cases_from_dataset_json,
    cases_from_folders,
    cases_from_segmentations,
    check_cases,
    read_label,
    validate_cases,
)

_FROM_TRANSFORMS = ("PretrainPreprocessing", "FinetunePreprocessing", "pretraining_dataset", "finetune_train_dataset",
                    "finetune_val_dataset")


def __getattr__(name: str):
    if name in _FROM_TRANSFORMS:
        return getattr(importlib.import_module(".transforms", __name__), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["Discovery", "VolumeRecord", "discover_volumes", "FinetuneCase", "cases_from_folders",
           "cases_from_dataset_json", "cases_from_segmentations", "check_cases", "validate_cases", "read_label",
           *_FROM_TRANSFORMS]
