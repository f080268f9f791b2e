"""Slicer-side glue of the MiM extension, shared by the MiMSegmentation and MiMPretrain modules.

Kept out of the module folder's top level because Slicer treats every top-level .py there as a module.
"""
