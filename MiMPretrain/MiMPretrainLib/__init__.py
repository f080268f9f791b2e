"""Slicer-side glue of the MiM Pre-train module: run settings, detached runs, panel state, plots and scene export.

Kept out of the module folder's top level because Slicer treats every top-level .py there as a module. What both
modules use (worker runner, dependencies, the MRML import bridge) stays in MiMSegmentationLib.
"""
