"""A headless MRML scene from the slicer-core wheel: real MRML and module logics, no Slicer application.

The application logic is set before the scene, as Slicer does at start-up. Inside ``headless_scene()``,
``slicer.mrmlScene`` and ``slicer.modules.<colors|volumes|segmentations>.logic()`` are what Slicer would give;
they are restored when the block ends. Use it from a fixture::

    @pytest.fixture
    def scene():
        with headless_scene() as scene:
            yield scene
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from types import SimpleNamespace

import slicer

_MISSING = object()


@contextmanager
def headless_scene() -> Iterator[slicer.vtkMRMLScene]:
    """A fresh scene with the Colors, Volumes and Segmentations logics, installed as ``slicer.mrmlScene``."""
    scene = slicer.vtkMRMLScene()
    application = slicer.vtkSlicerApplicationLogic()
    application.SetMRMLScene(scene)
    logics = {}
    for module, logic_class in (("Colors", slicer.vtkSlicerColorLogic), ("Volumes", slicer.vtkSlicerVolumesLogic),
                                ("Segmentations", slicer.vtkSlicerSegmentationsModuleLogic)):
        logic = logic_class()
        logic.SetMRMLApplicationLogic(application)
        logic.SetMRMLScene(scene)
        application.SetModuleLogic(module, logic)
        logics[module.lower()] = SimpleNamespace(logic=lambda logic=logic: logic)
    saved = {name: getattr(slicer, name, _MISSING) for name in ("mrmlScene", "modules")}
    slicer.mrmlScene = scene
    slicer.modules = SimpleNamespace(**logics)
    try:
        yield scene
    finally:
        for name, value in saved.items():
            if value is _MISSING:
                delattr(slicer, name)
            else:
                setattr(slicer, name, value)
        scene.Clear(True)
