"""Slicer-side glue of the MiM extension: what both modules use (worker runner, dependencies, the MRML import
bridge) and the Segment module's own parts.

Kept out of the module folder's top level because Slicer treats every top-level .py there as a module.
"""
