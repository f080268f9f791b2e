"""MiMSegmentation: segment a CT volume with a MiM-based model, in a worker process, with progress and cancel.

Thin by design: the MRML conversions live in MiMSegmentationLib.mrml_bridge, the worker process in
MiMSegmentationLib.worker, the panel's states in MiMSegmentationLib.segment_panel, and the computation in the
`mim3d` worker (`PythonSlicer -m mim3d segment ...`). This module never imports torch; only the PyTorch
extension's installer does, in Slicer's process, when it installs or checks torch.
"""

import logging
import shutil
import subprocess
import time
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
from slicer import vtkMRMLMarkupsROINode, vtkMRMLScalarVolumeNode, vtkMRMLSegmentationNode
from slicer.i18n import tr as _
from slicer.i18n import translate
from slicer.parameterNodeWrapper import Choice, WithinRange, parameterNodeWrapper
from slicer.ScriptedLoadableModule import (
    ScriptedLoadableModule,
    ScriptedLoadableModuleLogic,
    ScriptedLoadableModuleTest,
    ScriptedLoadableModuleWidget,
)
from slicer.util import VTKObservationMixin

from mim3d import registry
from mim3d.package import read_model_json
from MiMSegmentationLib import dependencies, model_list, mrml_bridge, selftest_checks, worker
from MiMSegmentationLib.segment_panel import PanelState, SegmentPanel

# modelId is filled from the model registry (installed + downloadable), not a fixed list, so the widget sets it.
UNBOUND_PARAMETERS = ("modelId",)


class MiMSegmentation(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MiM Segmentation")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = []
        self.parent.contributors = ["MiM for 3D Slicer maintainers"]
        self.parent.helpText = _(
            "Segment a CT volume with a model pre-trained by MiM (Mask in Mask) and fine-tuned for organs. Choose the "
            "volume and a model, click Segment; the work runs in a separate process (GPU when there is one), so "
            "Slicer stays usable and Cancel stops it at once. Segments get the model's names, colours and standard "
            "terminology, on exactly the volume's grid. The network is used only when you click Download (a model) "
            "or confirm the installation of the Python packages.")
        self.parent.acknowledgementText = _(
            "MiM: Zhuang et al., 'MiM: Mask in Mask Self-Supervised Pre-Training for 3D Medical Image Analysis', "
            "IEEE TMI 2025. Built on PyTorch, MONAI and SimpleITK.")


@parameterNodeWrapper
class MiMSegmentationParameterNode:
    inputVolume: vtkMRMLScalarVolumeNode
    modelId: str = ""
    device: Annotated[str, Choice(["auto", "cpu", "cuda"])] = "auto"
    outputSegmentation: vtkMRMLSegmentationNode
    show3D: bool = False
    fastMode: bool = False
    overlap: Annotated[float, WithinRange(0.0, 0.9)] = 0.5
    tta: bool = False
    mixedPrecision: bool = True
    roi: vtkMRMLMarkupsROINode


class MiMSegmentationWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.panel = SegmentPanel()
        self.job = None
        self.models = model_list.ModelList()
        self.elapsedTimer = qt.QTimer()

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MiMSegmentation.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MiMSegmentationLogic()

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.applyButton.connect("clicked(bool)", self.onApplyButton)
        self.ui.modelSelector.connect("currentIndexChanged(int)", self.onModelSelected)
        self.ui.downloadModelButton.connect("clicked(bool)", self.onDownloadModel)
        self.ui.importModelButton.connect("clicked(bool)", self.onImportModel)
        self.ui.openModelFolderButton.connect("clicked(bool)", self.onOpenModelFolder)
        self.ui.deleteModelButton.connect("clicked(bool)", self.onDeleteModel)
        self.elapsedTimer.setInterval(1000)
        self.elapsedTimer.connect("timeout()", self.updateGUI)

        self.initializeParameterNode()
        self.refreshModels()
        self.detectDevices()

    def cleanup(self) -> None:
        self.removeObservers()
        self.elapsedTimer.stop()
        if self.job is not None and self.job.running:
            self.job.cancel()

    def enter(self) -> None:
        self.initializeParameterNode()
        if self.models.stale():  # e.g. MiMPretrain's "Use for segmentation" registered a model
            self.refreshModels()
        if self.panel.needs_device_check(dependencies.torch_installed()):
            self.detectDevices()

    def exit(self) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self._parameterNodeGuiTag = None
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)

    def onSceneStartClose(self, caller, event) -> None:
        self.setParameterNode(None)

    def onSceneEndClose(self, caller, event) -> None:
        if self.parent.isEntered:
            self.initializeParameterNode()

    def initializeParameterNode(self) -> None:
        self.setParameterNode(self.logic.getParameterNode())
        if not self._parameterNode.inputVolume:
            firstVolume = slicer.mrmlScene.GetFirstNodeByClass("vtkMRMLScalarVolumeNode")
            if firstVolume:
                self._parameterNode.inputVolume = firstVolume

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        self.updateGUI()

    # ---- rendering the panel state ------------------------------------------------------------------------------

    def selectedChoice(self):
        index = self.ui.modelSelector.currentIndex
        return self.models.choices[index] if 0 <= index < len(self.models.choices) else None

    def updateGUI(self, caller=None, event=None) -> None:
        choice = self.selectedChoice()
        hasInput = bool(self._parameterNode and self._parameterNode.inputVolume)
        view = self.panel.view(has_input=hasInput, has_model=choice is not None,
                               model_installed=bool(choice and choice.usable))
        self.ui.applyButton.text = view.apply_text
        self.ui.applyButton.enabled = view.apply_enabled
        self.ui.applyButton.toolTip = view.apply_tooltip or _("Segment the input volume with the selected model.")
        self.ui.progressBar.value = view.progress
        self.ui.statusLabel.text = view.status
        for widget in (self.ui.inputsCollapsibleButton, self.ui.outputsCollapsibleButton,
                       self.ui.advancedCollapsibleButton):
            widget.enabled = view.inputs_enabled
        self.ui.downloadModelButton.enabled = bool(choice and choice.downloadable) and not view.busy
        self.ui.deleteModelButton.enabled = bool(choice and choice.installed) and not view.busy
        self.ui.modelInfoLabel.text = choice.detail if choice else _("No model installed: import or download one.")
        self.ui.deviceInfoLabel.text = view.device

    # ---- models ---------------------------------------------------------------------------------------------------

    def refreshModels(self, selectId=None) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to list the models."), waitCursor=True):
            self.models.refresh()
        wanted = selectId or (self._parameterNode.modelId if self._parameterNode else "")
        self.ui.modelSelector.blockSignals(True)
        self.ui.modelSelector.clear()
        for choice in self.models.choices:
            self.ui.modelSelector.addItem(choice.title)
        ids = [choice.id for choice in self.models.choices]
        self.ui.modelSelector.currentIndex = ids.index(wanted) if wanted in ids else (0 if ids else -1)
        self.ui.modelSelector.blockSignals(False)
        self.onModelSelected(self.ui.modelSelector.currentIndex)

    def onModelSelected(self, index) -> None:
        choice = self.selectedChoice()
        if self._parameterNode and choice:
            self._parameterNode.modelId = choice.id
        self.updateGUI()

    def onDownloadModel(self) -> None:
        choice = self.selectedChoice()
        if not choice or not self.ensureDependencies():
            return
        dialog = slicer.util.createProgressDialog(labelText=_("Downloading {id}...").format(id=choice.id),
                                                  windowTitle=_("MiM model download"), maximum=100)

        def onEvent(event):
            if event.get("type") == "progress":
                dialog.value = int(100 * event.get("fraction", 0.0))
                dialog.labelText = f"{event.get('stage', '')}: {event.get('message', '')}"

        def onFinished(outcome):
            dialog.close()
            if not outcome.ok and not outcome.cancelled:
                slicer.util.errorDisplay(_("The download failed: {message}").format(message=outcome.message))
            self.refreshModels(choice.id)

        job = self.logic.startWorker(self.logic.downloadArgs(choice.id), onEvent=onEvent, onFinished=onFinished)
        dialog.connect("canceled()", job.cancel)

    def onImportModel(self) -> None:
        path = qt.QFileDialog.getOpenFileName(
            slicer.util.mainWindow(), _("Import a model package"), "", _("Model package (*.zip model.json)"))
        if not path:
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to import the model."), waitCursor=True):
            folder = self.logic.importModel(Path(path).parent if Path(path).name == "model.json" else path)
            self.refreshModels(folder.name)

    def onOpenModelFolder(self) -> None:
        folder = self.logic.modelsFolder()
        folder.mkdir(parents=True, exist_ok=True)
        qt.QDesktopServices.openUrl(qt.QUrl.fromLocalFile(str(folder)))

    def onDeleteModel(self) -> None:
        choice = self.selectedChoice()
        if not choice or not slicer.util.confirmOkCancelDisplay(
                _("Delete the model '{id}' from disk?").format(id=choice.id)):
            return
        with slicer.util.tryWithErrorDisplay(_("Failed to delete the model."), waitCursor=True):
            self.logic.deleteModel(choice.id)
            self.refreshModels()

    # ---- devices and dependencies ---------------------------------------------------------------------------------

    def detectDevices(self, wait=False) -> None:
        """Ask the worker which GPU it sees (torch is never imported here); the panel shows its answer and suggests
        fast mode on a CPU. ``wait``: block until it answers (after an install, before a segmentation starts)."""
        def onFinished(outcome):
            fast = self.panel.devices_checked(outcome)
            if self._parameterNode and fast is not None:
                self._parameterNode.fastMode = fast
            self.updateGUI()

        self.panel.device_check_started()
        job = self.logic.startWorker(worker.worker_command("devices", []), onFinished=onFinished,
                                     schedule=(lambda ms, fn: None) if wait else None)
        if wait:
            job.wait(120)

    def ensureDependencies(self) -> bool:
        ready = False
        with slicer.util.tryWithErrorDisplay(_("Failed to install the Python packages MiM needs."), waitCursor=True):
            ready = self.logic.installDependencies()
            if ready and self.panel.needs_device_check(dependencies.torch_installed()):
                self.detectDevices(wait=True)  # PyTorch was just installed: the GPU, and fast mode, change now
        return ready

    # ---- segmenting -------------------------------------------------------------------------------------------------

    def onApplyButton(self) -> None:
        if self.job is not None and self.job.running:
            self.panel.cancel_requested()
            self.job.cancel()
            self.updateGUI()
            return
        if not self.ensureDependencies():
            return
        self.ui.logTextEdit.clear()
        p = self._parameterNode
        with slicer.util.tryWithErrorDisplay(_("Failed to start the segmentation."), waitCursor=True):
            self.job = self.logic.startSegmentation(
                p.inputVolume, p.modelId, device=p.device, fast=p.fastMode, overlap=p.overlap, tta=p.tta,
                amp=p.mixedPrecision, roi=p.roi, outputSegmentation=p.outputSegmentation, show3D=p.show3D,
                onEvent=self.onWorkerEvent, onLog=self.ui.logTextEdit.appendPlainText,
                onWorkerFinished=self.onWorkerFinished, onFinished=self.onSegmentationFinished)
            self.panel.start()
            self.elapsedTimer.start()
        self.updateGUI()

    def onWorkerEvent(self, event) -> None:
        self.panel.on_event(event)
        self.updateGUI()

    def onWorkerFinished(self, outcome) -> None:
        self.panel.finished(outcome)  # importing, failed or cancelled
        self.updateGUI()
        slicer.app.processEvents()  # show "importing" before the import blocks the GUI for a moment

    def onSegmentationFinished(self, segmentationNode, error) -> None:
        self.elapsedTimer.stop()
        if segmentationNode is not None:
            self.panel.import_done(segmentationNode.GetSegmentation().GetNumberOfSegments())
            self._parameterNode.outputSegmentation = segmentationNode
        elif error and self.panel.state is PanelState.IMPORTING:
            self.panel.import_failed(error)
        self.updateGUI()


class MiMSegmentationLogic(ScriptedLoadableModuleLogic):
    """Segmentation without the GUI: usable from scripts (``waitForCompletion=True``) and from the widget."""

    def getParameterNode(self):
        return MiMSegmentationParameterNode(super().getParameterNode())

    # ---- models and dependencies -----------------------------------------------------------------------------------

    @staticmethod
    def modelsFolder() -> Path:
        return registry.models_home()

    @staticmethod
    def importModel(path) -> Path:
        return registry.import_package(path)

    @staticmethod
    def deleteModel(modelId) -> None:
        registry.delete(modelId)

    @staticmethod
    def downloadArgs(modelId) -> list:
        return worker.worker_command("models", ["download", modelId])

    def installDependencies(self) -> bool:
        """Install what the worker lacks, after one confirmation; True when everything is there, False when the user
        declined (a quiet cancel).

        torch comes from the PyTorch extension (it picks the CUDA build for this computer's driver); the rest from
        pip (dependencies.install_requirements: which installer on which Slicer, Slicer's own packages kept).
        """
        if not dependencies.torch_installed():
            try:
                import PyTorchUtils
            except ImportError:
                raise RuntimeError(_("MiM needs the PyTorch extension: install 'PyTorch' from the Extensions Manager "
                                     "and restart Slicer.")) from None
            torch = PyTorchUtils.PyTorchUtilsLogic().installTorch(
                askConfirmation=True, torchVersionRequirement=dependencies.TORCH_VERSION)
            if torch is None:
                return False
        return dependencies.install_requirements(
            slicer.util.confirmOkCancelDisplay, slicer.util.pip_install,
            slicer.util.tempDirectory("MiMConstraints"), packaging=dependencies.slicer_packaging())

    # ---- worker ---------------------------------------------------------------------------------------------------

    def startWorker(self, args, onEvent=None, onLog=None, onFinished=None, schedule=None):
        """Start a worker command; events are delivered on the main thread through ``schedule`` (a Qt timer)."""
        job = worker.WorkerJob(args, schedule=schedule or (lambda ms, fn: qt.QTimer.singleShot(ms, fn)),
                               on_event=onEvent, on_log=onLog, on_finished=onFinished)
        job.start()
        return job

    def segmentArgs(self, inputPath, outputPath, modelId, device="auto", fast=False, overlap=None, tta=False,
                    amp=True, roi=None, volume=None) -> list:
        args = [str(inputPath), "--model", str(modelId), "--output", str(outputPath), "--device", device]
        if fast:
            args.append("--fast")
        if overlap is not None:
            args += ["--overlap", f"{overlap:g}"]
        if tta:
            args.append("--tta")
        if not amp:
            args.append("--no-amp")
        if roi is not None:
            args += ["--roi", *(f"{c:.3f}" for c in mrml_bridge.roi_corners_ras(roi, volume))]
        return worker.worker_command("segment", args)

    def startSegmentation(self, inputVolume, modelId, device="auto", fast=False, overlap=None, tta=False, amp=True,
                          roi=None, outputSegmentation=None, show3D=False, onEvent=None, onLog=None,
                          onWorkerFinished=None, onFinished=None, schedule=None):
        """Write the volume, start `mim3d segment` in a worker, import its labels when it ends. Returns the job.

        ``onWorkerFinished(outcome)`` is called when the worker ends (before the import), then
        ``onFinished(segmentationNode, error)`` once: with the node on success, with None and the message otherwise
        (None, None when cancelled). The temporary folder is removed in every case.
        """
        if not inputVolume or not inputVolume.GetImageData():
            raise ValueError(_("Choose an input volume that holds an image."))
        labelTable = read_model_json(registry.resolve_model(modelId)).labels
        workDir = Path(slicer.util.tempDirectory("MiMSegmentation"))
        labelsPath = workDir / "labels.nrrd"
        inputPath = mrml_bridge.write_volume(inputVolume, workDir / "input.nrrd")
        args = self.segmentArgs(inputPath, labelsPath, modelId, device, fast, overlap, tta, amp, roi, inputVolume)
        logging.info("MiMSegmentation: %s", " ".join(args))

        def finish(outcome):
            node, error = None, None
            try:
                if onWorkerFinished:
                    onWorkerFinished(outcome)
                if outcome.ok and not outcome.cancelled:
                    node = mrml_bridge.import_labels(labelsPath, inputVolume, labelTable, outputSegmentation,
                                                     show_3d=show3D)
                elif not outcome.cancelled:
                    error = outcome.message
            except Exception as e:
                logging.exception("MiMSegmentation: importing the labels failed")
                error = str(e)
            finally:
                shutil.rmtree(workDir, ignore_errors=True)
            if onFinished:
                onFinished(node, error)

        try:
            return self.startWorker(args, onEvent, onLog, finish, schedule)
        except Exception:
            shutil.rmtree(workDir, ignore_errors=True)
            raise

    def segment(self, inputVolume, modelId, timeoutSeconds=3600, **options):
        """Segment and wait (scripts, self-tests): returns the segmentation node or raises with the worker's message."""
        result = {}
        job = self.startSegmentation(inputVolume, modelId, **options, schedule=lambda ms, fn: None,
                                     onFinished=lambda node, error: result.update(node=node, error=error))
        try:
            job.wait(timeoutSeconds)
        except TimeoutError:
            job.cancel()
            raise
        if result.get("error") or result.get("node") is None:
            raise RuntimeError(result.get("error") or _("The segmentation was cancelled."))
        return result["node"]


class MiMSegmentationTest(ScriptedLoadableModuleTest):
    """In-Slicer self-test: the bridge on an oblique volume, then the whole path through the real worker on CPU
    (Logic, then the Widget's Segment button). The worker steps are skipped when PyTorch/MONAI are absent, as under
    --testing on the extension factory, which installs nothing."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        for test in (self.test_labels_import_on_an_oblique_volume, self.test_segment_end_to_end_through_the_worker,
                     self.test_segment_button_through_the_widget):
            self.setUp()
            test()

    # ---- helpers ----------------------------------------------------------------------------------------------------

    def assertSelfTestSegments(self, node, volume):
        self.assertEqual(selftest_checks.selftest_segment_problems(node, volume), [])

    def workerAvailable(self) -> bool:
        if dependencies.worker_ready():
            return True
        self.delayDisplay("Skipped a worker test: PyTorch/MONAI are not installed.")
        return False

    def selfTestPackage(self, folder: Path) -> Path:
        """The constant self-test model package (MiMSegmentationLib.selftest_model), made by the worker's Python."""
        package = folder / "mim-selftest"
        subprocess.run([worker.default_python(), "-m", "MiMSegmentationLib.selftest_model", str(package)],
                       env=worker.worker_env(), check=True, capture_output=True, timeout=600)
        return package

    # ---- tests ------------------------------------------------------------------------------------------------------

    def test_labels_import_on_an_oblique_volume(self):
        workDir = Path(slicer.util.tempDirectory("MiMSegmentationTest"))
        try:
            self.assertEqual(selftest_checks.labels_import_problems(workDir), [])
        finally:
            shutil.rmtree(workDir, ignore_errors=True)

    def test_segment_end_to_end_through_the_worker(self):
        if not self.workerAvailable():
            return
        volume = selftest_checks.oblique_volume()
        workDir = Path(slicer.util.tempDirectory("MiMSegmentationTest"))
        package = self.selfTestPackage(workDir)
        logic = MiMSegmentationLogic()
        started = time.monotonic()
        node = logic.segment(volume, str(package), device="cpu")
        self.delayDisplay(f"Segmented through the worker in {time.monotonic() - started:.1f} s")
        self.assertSelfTestSegments(node, volume)
        again = logic.segment(volume, str(package), device="cpu", outputSegmentation=node)  # replaces its segments
        self.assertEqual(again.GetID(), node.GetID())
        self.assertEqual(again.GetSegmentation().GetNumberOfSegments(), 2)
        shutil.rmtree(workDir, ignore_errors=True)

    def test_segment_button_through_the_widget(self):
        if not self.workerAvailable():
            return
        volume = selftest_checks.oblique_volume()
        workDir = Path(slicer.util.tempDirectory("MiMSegmentationTest"))
        try:
            with selftest_checks.private_mim3d_home(workDir / "home"):  # models of its own, inherited by the worker
                registry.import_package(self.selfTestPackage(workDir))
                widget = slicer.modules.mimsegmentation.widgetRepresentation().self()
                widget.refreshModels("mim-selftest")
                parameters = widget.logic.getParameterNode()
                parameters.inputVolume = volume
                parameters.device = "cpu"
                parameters.outputSegmentation = None
                self.assertEqual(parameters.modelId, "mim-selftest")
                self.assertEqual(widget.ui.applyButton.text, "Segment")
                widget.ui.applyButton.click()
                self.assertEqual(widget.ui.applyButton.text, "Cancel")
                deadline = time.monotonic() + 600
                while widget.panel.view(True, True).busy and time.monotonic() < deadline:
                    slicer.app.processEvents()
                    time.sleep(0.05)
                self.assertEqual(widget.panel.state, PanelState.DONE, widget.ui.statusLabel.text)
                self.assertEqual(widget.ui.applyButton.text, "Segment")
                self.assertSelfTestSegments(parameters.outputSegmentation, volume)
        finally:
            shutil.rmtree(workDir, ignore_errors=True)
