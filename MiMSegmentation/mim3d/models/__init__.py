"""Model builders: the public way to make pre-training and segmentation networks and to load pre-trained weights.

    >>> from mim3d.models import build_pretrainer, build_segmenter, load_pretrained
    >>> model = build_pretrainer("mim", preset="small")              # model(batch)["loss"]
    >>> net = build_segmenter("mim-unetr", num_classes=14, preset="base")
    >>> report = load_pretrained(net, "checkpoint-final.pth")         # official MiM or mim3d checkpoints
"""

from __future__ import annotations

from pathlib import Path

from torch import nn

from ..errors import BadInputError
from ..presets import PRETRAINING_METHODS, SEGMENTATION_ARCHS, resolve


def build_pretrainer(method: str, preset: str = "base", **overrides) -> nn.Module:
    """A pre-training model; calling it on crops (N, 1, D, H, W) returns a dict with "loss" and every loss term.

    Args:
        method: "mim", "mae" or "simmim".
        preset: "base" (the papers) or "small" (CPU-friendly).
        overrides: any field of the method's config (mim3d.presets), e.g. ``alignment_form="byol"``.
    """
    config = resolve(method, preset, **overrides) if method in PRETRAINING_METHODS else _unknown_method(method)
    if method == "mim":
        from .mim import MiMPretrainer

        return MiMPretrainer(config)
    if method == "mae":
        from .mae import MAEPretrainer

        return MAEPretrainer(config)
    from .simmim import SimMIMPretrainer

    return SimMIMPretrainer(config)


def build_segmenter(arch: str, num_classes: int, preset: str = "base", roi_size=(96, 96, 96), in_channels: int = 1,
                    **overrides) -> nn.Module:
    """A segmentation network mapping (N, in_channels, *roi_size) to logits (N, num_classes, *roi_size).

    Args:
        arch: "mim-unetr" (MiM encoder in a Swin-UNETR-style decoder) or "unetr" (MONAI UNETR, for MAE/SimMIM).
        roi_size: window size, each a multiple of 16; positional embeddings are interpolated to it on loading.
    """
    if arch not in SEGMENTATION_ARCHS:
        choices = ", ".join(SEGMENTATION_ARCHS)
        raise BadInputError(f"unknown segmentation architecture '{arch}'; choose one of {choices}")
    if num_classes < 2:
        raise BadInputError(f"num_classes: {num_classes}; a segmenter needs background plus at least one label")
    config = resolve(arch, preset, **overrides)
    roi_size = tuple(int(s) for s in roi_size)
    config.validate(roi_size)
    if arch == "mim-unetr":
        from .mim_unetr import MiMUNETR

        return MiMUNETR(config, num_classes, roi_size, in_channels)
    from .unetr import build_unetr

    return build_unetr(config, num_classes, roi_size, in_channels)


def load_pretrained(model: nn.Module, path: str | Path):
    """Load pre-trained weights into `model` and return the report of loaded, ignored and missing keys.

    Accepts official MiM checkpoints and mim3d checkpoints; see mim3d.models.checkpoints.
    """
    from .checkpoints import load_pretrained as load

    return load(model, Path(path))


def _unknown_method(method: str):
    raise BadInputError(f"unknown pre-training method '{method}'; choose one of {', '.join(PRETRAINING_METHODS)}")
