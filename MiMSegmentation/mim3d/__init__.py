"""mim3d: MiM self-supervised pre-training and segmentation for 3D CT (the core library of the MiM Slicer extension)."""

__version__ = "0.1.0"
