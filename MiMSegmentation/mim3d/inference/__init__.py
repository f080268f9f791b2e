"""Inference: segment a CT volume with a model package (``segment_volume``) and the ``mim3d segment`` command."""

from .pipeline import FAST_SPACING_FACTOR, InferenceSettings, keep_largest_component, segment_volume

__all__ = ["FAST_SPACING_FACTOR", "InferenceSettings", "keep_largest_component", "segment_volume"]
