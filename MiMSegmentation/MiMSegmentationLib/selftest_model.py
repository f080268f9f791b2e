"""A tiny model package whose answer is known, for the modules' self-tests: run in the worker, never in Slicer's GUI.

    PythonSlicer -m MiMSegmentationLib.selftest_model OUT_FOLDER

writes a real `mim3d` package (a small mim-unetr, model.json + weights.safetensors) whose weights are all zero except
the output bias, so every voxel the network sees is labelled ``selftest-body`` (value 1) and the other label,
``selftest-empty`` (value 2), stays empty. The self-tests can then check exact voxel counts through the real worker.
"""

from __future__ import annotations

import sys

LABELS = {"labels": [
    {"value": 1, "name": "selftest-body", "color": [221, 130, 101],
     "terminology": {"category": ["SCT", "123037004", "Anatomical Structure"], "type": ["SCT", "10200004", "Liver"]}},
    {"value": 2, "name": "selftest-empty", "color": [47, 150, 103]}]}
SPACING_MM = (4.0, 4.0, 4.0)
ROI_SIZE = (64, 64, 32)


def make_package(folder: str) -> None:
    import torch

    from mim3d.labels import LabelTable
    from mim3d.models import build_segmenter
    from mim3d.package import ModelInfo, save_package
    from mim3d.presets import config_to_dict, resolve

    overrides = {"embed_dims": (12, 24, 48, 96), "depths": (1, 1, 1, 1), "num_heads": 3}
    config = {**config_to_dict(resolve("mim-unetr", "small")), **overrides}
    model = build_segmenter("mim-unetr", num_classes=3, preset="small", roi_size=ROI_SIZE, **overrides)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.zero_()
        output_bias = [p for name, p in model.named_parameters() if name.endswith("bias") and p.shape == (3,)][-1]
        output_bias.copy_(torch.tensor([0.0, 5.0, 0.0]))
    info = ModelInfo(
        name="mim-selftest", version="1.0.0",
        architecture={"arch": "mim-unetr", "preset": "small", "config": config, "num_classes": 3, "in_channels": 1},
        preprocessing={"orientation": "RAS", "spacing_mm": list(SPACING_MM), "intensity_window_hu": [-175.0, 250.0],
                       "foreground_crop": False},
        inference={"roi_size": list(ROI_SIZE), "overlap": 0.25, "blend": "gaussian"},
        labels=LabelTable.from_dict(LABELS), weights_sha256="",
        description="Self-test model: labels every voxel selftest-body.", license="Apache-2.0",
        provenance={"trained_on": "nothing: constant output by construction"})
    save_package(folder, model, info)


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m MiMSegmentationLib.selftest_model OUT_FOLDER")
    make_package(sys.argv[1])
