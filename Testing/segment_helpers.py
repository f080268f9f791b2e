"""Models and packages for the inference tests: a predictor whose answer is known, and model descriptions.

``EdgeModel`` is a real ``nn.Module`` with a known, direction-sensitive answer (as MONAI's own stitching tests use
analytic predictors): on windowed intensities x in [0, 1],

    class 0 where x <= 0.5; class 2 where x > 0.5 and x drops by more than 0.3 to the next voxel along +I (zero beyond
    the window: MONAI pads with zeros, which is air); class 1 elsewhere.

Along +I is towards Right in the model's RAS space, so a pipeline that fed the network any other orientation would
move class 2 to other edges.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from mim3d.labels import LabelTable
from mim3d.package import ModelInfo
from mim3d.presets import config_to_dict, resolve

LABELS = LabelTable.from_dict({"labels": [
    {"value": 1, "name": "tissue", "color": [221, 130, 101],
     "terminology": {"category": ["SCT", "85756007", "Tissue"], "type": ["SCT", "85756007", "Tissue"]}},
    {"value": 2, "name": "right edge", "color": [47, 150, 103]}]})
WINDOW_HU = (-175.0, 250.0)


class EdgeModel(nn.Module):
    """(B, 1, I, J, K) in [0, 1] -> one-hot logits (B, 3, I, J, K) of the classes in the module docstring."""

    def __init__(self):
        super().__init__()
        self.calls = 0
        self.unused = nn.Parameter(torch.zeros(1))  # so .to(device) and .eval() behave as for a real network

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return F.one_hot(edge_classes(x[:, 0]), 3).permute(0, 4, 1, 2, 3).float()


def edge_classes(x: torch.Tensor) -> torch.Tensor:
    """(..., I, J, K) float -> int64 classes of ``EdgeModel``."""
    following = F.pad(x[..., 1:, :, :], (0, 0, 0, 0, 0, 1))  # value at i + 1, 0 past the end
    return (x > 0.5).long() * (1 + ((x - following) > 0.3).long())


def expected_edge_labels(hu_ijk: np.ndarray) -> np.ndarray:
    """``EdgeModel``'s classes computed directly on an (I, J, K) HU array that is already RAS at the model spacing."""
    low, high = WINDOW_HU
    x = torch.from_numpy(np.clip((hu_ijk.astype(np.float32) - low) / (high - low), 0, 1))
    return edge_classes(x).numpy().astype(np.uint8)


def model_info(spacing_mm=(3.0, 3.0, 3.0), roi_size=(32, 32, 32), overlap=0.5, arch_preset="small",
               num_classes=3, foreground_crop=True, keep_largest=None, labels: LabelTable = LABELS) -> ModelInfo:
    """A model description (architecture: mim-unetr ``arch_preset``; the tests may pass another network)."""
    inference = {"roi_size": list(roi_size), "overlap": overlap, "blend": "gaussian"}
    if keep_largest is not None:
        inference["keep_largest"] = list(keep_largest)
    return ModelInfo(name="test-model", version="1.0.0",
                     architecture={"arch": "mim-unetr", "preset": arch_preset,
                                   "config": config_to_dict(resolve("mim-unetr", arch_preset)),
                                   "num_classes": num_classes, "in_channels": 1},
                     preprocessing={"orientation": "RAS", "spacing_mm": list(spacing_mm),
                                    "intensity_window_hu": list(WINDOW_HU), "foreground_crop": foreground_crop},
                     inference=inference, labels=labels, weights_sha256="", description="a test model",
                     license="Apache-2.0", provenance={"trained_on": "nothing (random weights)"})
