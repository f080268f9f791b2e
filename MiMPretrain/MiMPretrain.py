"""MiMPretrain: pre-train (MiM, MAE, SimMIM) and fine-tune from Slicer; watch, stop, resume and reuse the runs.

Thin by design: runs are `mim3d pretrain|finetune` workers started detached (they outlive the panel and a Slicer
restart) by MiMPretrainLib.training_runs; the panel reads only the run folders (training_runs.RunWatcher) and
decides what it shows with training_panel.TrainingPanel; scene data is exported by scene_export; curves are MRML plot
charts (plots). torch is never imported in Slicer's own process.
"""

import os
import shutil
import time
from pathlib import Path
from typing import Annotated

import qt
import slicer
import vtk
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

from mim3d.labels import Label, LabelTable, from_dataset_json
from MiMPretrainLib import plots, scene_export, training_runs
from MiMPretrainLib.training_panel import TrainingPanel, TrainingState
from MiMPretrainLib.training_settings import (
    ARCHS,
    DEVICES,
    METHOD_NOTES,
    METHODS,
    PRESETS,
    FinetuneSettings,
    PretrainSettings,
    estimate_time,
    preview_args,
    summarize_preview,
)
from MiMSegmentationLib import worker

DATA_SOURCES = ("images + labels folders", "dataset.json", "folder of .seg.nrrd", "segmentations in the scene")
# scanFolders: a list edited with the Add/Remove buttons; activeRun: the run the panel follows (re-attached on load).
UNBOUND_PARAMETERS = ("scanFolders", "activeRun")
REFRESH_MS = 2000


class MiMPretrain(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MiM Pre-train")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["MiMSegmentation"]
        self.parent.contributors = ["MiM for 3D Slicer developers"]
        self.parent.helpText = _(
            "Pre-train an encoder on your own unlabelled CT scans (MiM, MAE or SimMIM), fine-tune it on a few "
            "labelled cases (folders, dataset.json, .seg.nrrd files, or segmentations loaded in the scene), watch the "
            "losses and Dice live, stop and resume, and register the result for MiM Segmentation. Runs are separate "
            "processes writing a run folder: they keep going when Slicer is closed, and the panel re-attaches.")
        self.parent.acknowledgementText = _(
            "MiM: Zhuang et al., IEEE TMI 2025. MAE and SimMIM baselines as in Chen et al., 'Masked Image Modeling "
            "Advances 3D Medical Image Analysis', 2022. Built on PyTorch and MONAI.")


@parameterNodeWrapper
class MiMPretrainParameterNode:
    scanFolders: list[str]
    method: Annotated[str, Choice(list(METHODS))] = "mim"
    pretrainPreset: Annotated[str, Choice(list(PRESETS))] = "base"
    pretrainEpochs: Annotated[int, WithinRange(1, 100000)] = 100
    pretrainBatchSize: Annotated[int, WithinRange(1, 256)] = 1
    pretrainBaseLr: Annotated[float, WithinRange(1e-7, 1.0)] = 1e-4
    pretrainAmp: bool = True
    pretrainDevice: Annotated[str, Choice(list(DEVICES))] = "auto"
    pretrainWorkers: Annotated[int, WithinRange(0, 64)] = 2
    cacheFolder: Path
    initCheckpoint: Path
    pretrainRunFolder: Path
    dataSource: Annotated[str, Choice(list(DATA_SOURCES))] = DATA_SOURCES[0]
    imagesFolder: Path
    labelsFolder: Path
    datasetFile: Path
    segmentationsFolder: Path
    labelTableFile: Path
    pretrainedEncoder: Path
    arch: Annotated[str, Choice(list(ARCHS))] = "mim-unetr"
    finetunePreset: Annotated[str, Choice(list(PRESETS))] = "base"
    finetuneEpochs: Annotated[int, WithinRange(1, 100000)] = 200
    finetuneBatchSize: Annotated[int, WithinRange(1, 256)] = 1
    finetuneLr: Annotated[float, WithinRange(1e-7, 1.0)] = 1e-4
    finetuneDevice: Annotated[str, Choice(list(DEVICES))] = "auto"
    finetuneWorkers: Annotated[int, WithinRange(0, 64)] = 2
    finetuneRunFolder: Path
    runsFolder: Path
    activeRun: str = ""


def optionalPath(path) -> str | None:
    """A path parameter as text, or None when it is unset (parameterNodeWrapper stores an empty Path as ".")."""
    text = str(path) if path is not None else ""
    return None if text in ("", ".") else text


class MiMPretrainWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.panel = TrainingPanel()
        self.watcher = None
        self.snapshot = None
        self.previewJob = None
        self.numScans = None
        self.refreshTimer = qt.QTimer()

    def setup(self) -> None:
        ScriptedLoadableModuleWidget.setup(self)
        uiWidget = slicer.util.loadUI(self.resourcePath("UI/MiMPretrain.ui"))
        self.layout.addWidget(uiWidget)
        self.ui = slicer.util.childWidgetVariables(uiWidget)
        uiWidget.setMRMLScene(slicer.mrmlScene)
        self.logic = MiMPretrainLogic()
        self.ui.labelTableWidget.setHorizontalHeaderLabels([_("Value"), _("Name"), _("Colour")])

        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.StartCloseEvent, self.onSceneStartClose)
        self.addObserver(slicer.mrmlScene, slicer.mrmlScene.EndCloseEvent, self.onSceneEndClose)
        self.ui.addScanFolderButton.connect("clicked(bool)", self.onAddScanFolder)
        self.ui.removeScanFolderButton.connect("clicked(bool)", self.onRemoveScanFolder)
        self.ui.startPretrainButton.connect("clicked(bool)", self.onStartPretrain)
        self.ui.startFinetuneButton.connect("clicked(bool)", self.onStartFinetune)
        self.ui.loadLabelsButton.connect("clicked(bool)", self.onLoadLabels)
        self.ui.labelTableWidget.connect("cellDoubleClicked(int,int)", self.onLabelCellDoubleClicked)
        self.ui.useSelectedRunButton.connect("clicked(bool)", self.onUseSelectedRun)
        self.ui.refreshRunsButton.connect("clicked(bool)", self.refreshRunList)
        self.ui.runsFolderButton.connect("directoryChanged(QString)", lambda folder: self.refreshRunList())
        self.ui.runSelector.connect("activated(int)", self.onRunSelected)
        self.ui.stopRunButton.connect("clicked(bool)", self.onStopRun)
        self.ui.resumeRunButton.connect("clicked(bool)", self.onResumeRun)
        self.ui.useForSegmentationButton.connect("clicked(bool)", self.onUseForSegmentation)
        self.refreshTimer.setInterval(REFRESH_MS)
        self.refreshTimer.connect("timeout()", self.refreshRun)

        self.initializeParameterNode()
        self.refreshRunList()
        if self._parameterNode.activeRun:
            self.attach(self._parameterNode.activeRun)

    def cleanup(self) -> None:
        self.removeObservers()
        self.refreshTimer.stop()

    def enter(self) -> None:
        self.initializeParameterNode()

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

    def setParameterNode(self, inputParameterNode) -> None:
        if self._parameterNode:
            self._parameterNode.disconnectGui(self._parameterNodeGuiTag)
            self.removeObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
        self._parameterNode = inputParameterNode
        if self._parameterNode:
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
            self.ui.scanFoldersList.clear()
            self.ui.scanFoldersList.addItems(list(self._parameterNode.scanFolders))
        self.updateGUI()

    # ---- settings from the panel -------------------------------------------------------------------------------------

    def pretrainSettings(self) -> PretrainSettings:
        p = self._parameterNode
        return PretrainSettings(
            data_folders=tuple(p.scanFolders), out=optionalPath(p.pretrainRunFolder) or "", method=p.method,
            preset=p.pretrainPreset, epochs=p.pretrainEpochs, batch_size=p.pretrainBatchSize,
            base_lr=p.pretrainBaseLr, amp=p.pretrainAmp, device=p.pretrainDevice, workers=p.pretrainWorkers,
            cache=optionalPath(p.cacheFolder), init=optionalPath(p.initCheckpoint))

    def finetuneData(self) -> dict:
        """The data options of the chosen source (none for scene segmentations until they are exported)."""
        p = self._parameterNode
        source = DATA_SOURCES.index(p.dataSource)
        if source == 0:
            return {"images": optionalPath(p.imagesFolder), "labels": optionalPath(p.labelsFolder),
                    "label_table": optionalPath(p.labelTableFile)}
        if source == 1:
            return {"dataset": optionalPath(p.datasetFile)}
        if source == 2:
            return {"segmentations": optionalPath(p.segmentationsFolder)}
        return {}

    def finetuneSettings(self, data=None) -> FinetuneSettings:
        p = self._parameterNode
        return FinetuneSettings(
            out=optionalPath(p.finetuneRunFolder) or "", pretrained=optionalPath(p.pretrainedEncoder),
            arch=p.arch, preset=p.finetunePreset, epochs=p.finetuneEpochs, batch_size=p.finetuneBatchSize,
            lr=p.finetuneLr, device=p.finetuneDevice, workers=p.finetuneWorkers,
            **(self.finetuneData() if data is None else data))

    def finetuneProblems(self) -> list:
        if DATA_SOURCES.index(self._parameterNode.dataSource) == 3:
            problems = [] if self.checkedSegmentations() else [_("Check at least one segmentation in the scene.")]
            return problems + [p for p in self.finetuneSettings().check() if not p.startswith("Choose one source")]
        return self.finetuneSettings().check()

    def checkedSegmentations(self) -> list:
        return list(self.ui.sceneSegmentationsSelector.checkedNodes())

    # ---- rendering ------------------------------------------------------------------------------------------------

    def updateGUI(self, caller=None, event=None) -> None:
        if not self._parameterNode:
            return
        p = self._parameterNode
        self.ui.methodInfoLabel.text = METHOD_NOTES[p.method]
        source = DATA_SOURCES.index(p.dataSource)
        for widgets, shown in (((self.ui.imagesPathLineEdit, self.ui.labelsPathLineEdit), source == 0),
                               ((self.ui.labelTablePathLineEdit,), source == 0),
                               ((self.ui.datasetPathLineEdit,), source == 1),
                               ((self.ui.segmentationsPathLineEdit,), source == 2),
                               ((self.ui.sceneSegmentationsSelector,), source == 3)):
            for widget in widgets:
                widget.enabled = shown
        pretrainView = self.panel.view(self.pretrainSettings().check())
        finetuneView = self.panel.view(self.finetuneProblems())
        self.ui.startPretrainButton.enabled = pretrainView.start_enabled
        self.ui.startPretrainButton.toolTip = pretrainView.start_tooltip
        self.ui.startFinetuneButton.enabled = finetuneView.start_enabled
        self.ui.startFinetuneButton.toolTip = finetuneView.start_tooltip
        view = pretrainView
        self.ui.stopRunButton.enabled = view.stop_enabled
        self.ui.resumeRunButton.enabled = view.resume_enabled
        self.ui.useForSegmentationButton.enabled = view.use_enabled
        self.ui.useSelectedRunButton.enabled = bool(self.snapshot and self.snapshot.command == "pretrain")
        self.ui.runProgressBar.value = view.progress
        self.ui.runStatusLabel.text = f"{view.status}\n{view.error}" if view.error else view.status
        self.ui.pretrainEstimateLabel.text = self.estimate(self.pretrainSettings(), self.numScans)
        self.ui.finetuneEstimateLabel.text = self.estimate(self.finetuneSettings(), self.numCases())

    def numCases(self):
        """Labelled cases, where counting them is cheap: image files in the images folder, or checked segmentations."""
        source = DATA_SOURCES.index(self._parameterNode.dataSource)
        images = optionalPath(self._parameterNode.imagesFolder)
        if source == 0 and images and Path(images).is_dir():
            return sum(1 for path in Path(images).iterdir() if not path.name.startswith("."))
        return len(self.checkedSegmentations()) if source == 3 else None

    def estimate(self, settings, count) -> str:
        if not count:
            return ""
        device = "cuda" if settings.device == "cuda" else "cpu"
        return _("Estimated training time: {estimate}").format(estimate=estimate_time(settings, count, device))

    # ---- pre-training data ------------------------------------------------------------------------------------------

    def setScanFolders(self, folders) -> None:
        self._parameterNode.scanFolders = list(folders)
        self.ui.scanFoldersList.clear()
        self.ui.scanFoldersList.addItems(list(folders))
        self.previewScans()

    def onAddScanFolder(self) -> None:
        folder = qt.QFileDialog.getExistingDirectory(slicer.util.mainWindow(), _("Folder of unlabelled scans"))
        if folder and folder not in self._parameterNode.scanFolders:
            self.setScanFolders([*self._parameterNode.scanFolders, folder])

    def onRemoveScanFolder(self) -> None:
        row = self.ui.scanFoldersList.currentRow
        if row >= 0:
            folders = list(self._parameterNode.scanFolders)
            del folders[row]
            self.setScanFolders(folders)

    def previewScans(self) -> None:
        """What the worker's discovery finds in the folders (counts, formats, spacings, skipped files and why)."""
        self.numScans = None
        if not self._parameterNode.scanFolders:
            self.ui.dataPreviewLabel.text = ""
            return
        if self.previewJob is not None and self.previewJob.running:
            self.previewJob.cancel()
        self.ui.dataPreviewLabel.text = _("Looking for scans...")

        def onFinished(outcome):
            if outcome.cancelled:  # superseded by a newer preview
                return
            event = outcome.result or outcome.error or {"type": "error", "message": outcome.message}
            self.ui.dataPreviewLabel.text = summarize_preview(event)
            self.numScans = (outcome.result or {}).get("summary", {}).get("count")
            self.updateGUI()

        self.previewJob = worker.WorkerJob(worker.worker_command("pretrain", preview_args(
            list(self._parameterNode.scanFolders))), schedule=qt.QTimer.singleShot, on_finished=onFinished)
        self.previewJob.start()

    # ---- fine-tuning labels ------------------------------------------------------------------------------------------

    def tableLabels(self) -> LabelTable:
        """The label table as edited in the table widget."""
        rows = []
        widget = self.ui.labelTableWidget
        for row in range(widget.rowCount):
            color = qt.QColor(widget.item(row, 2).text())
            rows.append(Label(int(widget.item(row, 0).text()), widget.item(row, 1).text().strip(),
                              (color.red(), color.green(), color.blue())))
        return LabelTable(tuple(rows), source=_("the label table in the panel"))

    def showLabels(self, table: LabelTable) -> None:
        widget = self.ui.labelTableWidget
        widget.setRowCount(len(table))
        for row, label in enumerate(table):
            value = qt.QTableWidgetItem(str(label.value))
            value.setFlags(qt.Qt.ItemIsEnabled)
            color = qt.QTableWidgetItem(qt.QColor(*label.color).name())
            color.setBackground(qt.QBrush(qt.QColor(*label.color)))
            color.setFlags(qt.Qt.ItemIsEnabled)
            widget.setItem(row, 0, value)
            widget.setItem(row, 1, qt.QTableWidgetItem(label.name))
            widget.setItem(row, 2, color)

    def onLabelCellDoubleClicked(self, row, column) -> None:
        if column != 2:
            return
        item = self.ui.labelTableWidget.item(row, 2)
        color = qt.QColorDialog.getColor(qt.QColor(item.text()))
        if color.isValid():
            item.setText(color.name())
            item.setBackground(qt.QBrush(color))

    def onLoadLabels(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to read the labels."), waitCursor=True):
            self.showLabels(self.logic.labelsOfSource(self._parameterNode, self.checkedSegmentations()))

    # ---- runs -------------------------------------------------------------------------------------------------------

    def onStartPretrain(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to start pre-training."), waitCursor=True):
            settings = self.pretrainSettings()
            self.logic.start("pretrain", settings)
            self.follow(settings.out)

    def onStartFinetune(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to start fine-tuning."), waitCursor=True):
            runFolder = optionalPath(self._parameterNode.finetuneRunFolder)
            data = self.finetuneData()
            if DATA_SOURCES.index(self._parameterNode.dataSource) == 3:
                exported = self.logic.exportSceneData(self.checkedSegmentations(), runFolder)
                data = {key: exported[key] for key in ("images", "labels", "label_table")}
            elif data.get("label_table") and self.ui.labelTableWidget.rowCount:
                # the label table file's names and colours as edited in the panel (the values stay the data's)
                edited = self.logic.dataFolder(runFolder) / "labels.json"
                edited.parent.mkdir(parents=True, exist_ok=True)
                self.tableLabels().save(edited)
                data["label_table"] = str(edited)
            settings = self.finetuneSettings(data)
            self.logic.start("finetune", settings)
            self.follow(settings.out)

    def follow(self, runDir) -> None:
        self.panel.started(runDir)
        self.attach(runDir)

    def attach(self, runDir) -> None:
        """Follow a run folder: its state, curves and log, refreshed every few seconds (survives a restart)."""
        self._parameterNode.activeRun = str(runDir)
        self.watcher = training_runs.RunWatcher(runDir)
        self.refreshRun()
        self.refreshTimer.start()

    def refreshRun(self) -> None:
        if self.watcher is None:
            return
        self.snapshot = self.watcher.refresh()
        state = self.panel.update(self.snapshot)
        self.ui.runLogTextEdit.setPlainText("\n".join(self.snapshot.log_tail))
        if self.snapshot.series:
            self.logic.showCurves(self.snapshot)
        if state not in (TrainingState.STARTING, TrainingState.RUNNING, TrainingState.STOPPING):
            self.refreshTimer.stop()
            self.refreshRunList()
        self.updateGUI()

    def refreshRunList(self) -> None:
        self.recentRuns = training_runs.list_recent_runs([p for p in (optionalPath(self._parameterNode.runsFolder),)
                                                          if p]) if self._parameterNode else []
        self.ui.runSelector.clear()
        for run in self.recentRuns:
            self.ui.runSelector.addItem(f"{Path(run.run_dir).name} · {run.command} · {run.state}")

    def onRunSelected(self, index) -> None:
        if 0 <= index < len(self.recentRuns):
            self.panel = TrainingPanel()
            self.attach(self.recentRuns[index].run_dir)

    def onUseSelectedRun(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("This run cannot be used as an encoder."), waitCursor=True):
            self._parameterNode.pretrainedEncoder = training_runs.pretrained_checkpoint(self.snapshot.run_dir)

    def onStopRun(self) -> None:
        training_runs.stop_run(self.snapshot.run_dir)
        self.panel.stop_requested()
        self.updateGUI()

    def onResumeRun(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to resume the run."), waitCursor=True):
            training_runs.resume_run(self.snapshot.run_dir)
            self.follow(self.snapshot.run_dir)

    def onUseForSegmentation(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to register the model."), waitCursor=True):
            modelId = self.logic.registerModel(self.snapshot.run_dir)
            self.panel.model_registered(modelId)
            slicer.util.infoDisplay(_("The model is installed as '{id}' and listed in MiM Segmentation.").format(
                id=modelId))
        self.updateGUI()


class MiMPretrainLogic(ScriptedLoadableModuleLogic):
    """Runs without the GUI: start, export scene data, show curves, register models."""

    def getParameterNode(self):
        return MiMPretrainParameterNode(super().getParameterNode())

    @staticmethod
    def start(command: str, settings) -> int:
        """Check the settings, then start the worker detached; returns its process id."""
        problems = settings.check()
        if problems:
            raise ValueError("\n".join(problems))
        return training_runs.start_run(command, settings.to_args(), settings.out)

    @staticmethod
    def dataFolder(runFolder) -> Path:
        """Where scene data and an edited label table for ``runFolder`` go: a sibling "<run>-data" folder (the run
        folder itself must be new for the worker)."""
        if not runFolder:
            raise ValueError(_("Choose a new run folder first."))
        run = Path(runFolder)
        return run.with_name(f"{run.name}-data")

    def exportSceneData(self, segmentationNodes, runFolder) -> dict:
        """Write the checked segmentations and their source volumes as training data beside the run folder."""
        cases = []
        for node in segmentationNodes:
            volume = node.GetNodeReference(slicer.vtkMRMLSegmentationNode.GetReferenceImageGeometryReferenceRole())
            if volume is None or not volume.IsA("vtkMRMLScalarVolumeNode"):
                raise ValueError(_("Segmentation '{name}' has no source volume: choose it in the Segment Editor "
                                   "first.").format(name=node.GetName()))
            cases.append((volume, node))
        return scene_export.export_training_data(cases, self.dataFolder(runFolder))

    @staticmethod
    def labelsOfSource(parameters, segmentationNodes) -> LabelTable:
        """The label table the chosen data source gives (to show and edit before starting)."""
        source = DATA_SOURCES.index(parameters.dataSource)
        if source == 0 and optionalPath(parameters.labelTableFile):
            return LabelTable.load(optionalPath(parameters.labelTableFile))
        if source == 1 and optionalPath(parameters.datasetFile):
            import json

            with open(optionalPath(parameters.datasetFile), encoding="utf-8") as f:
                return from_dataset_json(json.load(f), optionalPath(parameters.datasetFile))
        if source == 3 and segmentationNodes:
            return scene_export.label_table_of_segmentations(segmentationNodes)
        raise ValueError(_("No labels to read: choose a label table file, a dataset.json, or scene segmentations "
                           "(a folder of .seg.nrrd files names its labels itself)."))

    @staticmethod
    def showCurves(snapshot) -> None:
        """Loss curves (per step) and, for fine-tuning, validation Dice (per epoch) as plot charts; the chart that
        matters most (Dice when there is one) is shown in the layout."""
        name = Path(snapshot.run_dir).name
        losses = {k: v for k, v in snapshot.series.items() if not k.startswith("dice/") and k != "mean_dice"}
        dice = {k.removeprefix("dice/"): v for k, v in snapshot.series.items() if k.startswith("dice/")}
        if "mean_dice" in snapshot.series:
            dice["mean"] = snapshot.series["mean_dice"]
        shown = None
        if losses:
            shown = plots.update_chart(slicer.mrmlScene, f"{snapshot.run_dir}#loss", f"{name}: loss", losses,
                                       x_title="step", y_title="loss")
        if dice:
            shown = plots.update_chart(slicer.mrmlScene, f"{snapshot.run_dir}#dice", f"{name}: validation Dice",
                                       dice, x_title="epoch", y_title="Dice")
        if shown is not None and slicer.util.mainWindow():
            slicer.modules.plots.logic().ShowChartInLayout(shown)

    @staticmethod
    def registerModel(runDir) -> str:
        """Install a finished fine-tuning run's model package; MiM Segmentation lists it at once."""
        folder = training_runs.register_model(runDir)
        segmentationWidget = slicer.modules.mimsegmentation.widgetRepresentation().self()
        segmentationWidget.refreshModels(folder.name)
        return folder.name


class MiMPretrainTest(ScriptedLoadableModuleTest):
    """In-Slicer self-test: a tiny pre-training run on a synthetic folder, a tiny fine-tuning run from scene data
    (with the pre-trained encoder), the plot series, and the model registration. The worker steps are skipped when
    PyTorch/MONAI are absent (--testing installs nothing); the scene export runs always."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        self.setUp()
        self.test_scene_export_and_tiny_runs()

    def sceneCase(self, name, offset):
        import numpy as np

        array = np.full((32, 40, 40), -1000, dtype=np.int16)  # KJI
        array[6:26, 8 + offset:30 + offset, 8:32] = 40
        array[10:20, 12 + offset:22 + offset, 12:24] = 120
        ijkToRAS = np.diag([-3.0, -3.0, 3.0, 1.0])
        volume = slicer.util.addVolumeFromArray(array, ijkToRAS, name=name)
        segmentation = slicer.mrmlScene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{name} labels")
        segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
        segmentation.GetSegmentation().AddEmptySegment("organ", "organ", [0.8, 0.4, 0.3])
        slicer.util.updateSegmentBinaryLabelmapFromArray((array == 120).astype(np.uint8), segmentation, "organ",
                                                         volume)
        return volume, segmentation

    def test_scene_export_and_tiny_runs(self):
        from MiMSegmentationLib import dependencies

        work = Path(slicer.util.tempDirectory("MiMPretrainTest"))
        logic = MiMPretrainLogic()
        cases = [self.sceneCase(f"case{i}", 2 * i) for i in range(3)]
        exported = logic.exportSceneData([segmentation for _, segmentation in cases], work / "finetune")
        self.assertEqual(len(exported["cases"]), 3)
        self.assertEqual(LabelTable.load(exported["label_table"]).names, ("organ",))

        if not dependencies.worker_ready():
            self.delayDisplay("Skipped the training runs: PyTorch/MONAI are not installed.")
            shutil.rmtree(work, ignore_errors=True)
            return
        tiny = ("embed_dims=[12,24,48,96]", "depths=[1,1,1,1]", "num_heads=3")
        pretrain = PretrainSettings(data_folders=(exported["images"],), out=str(work / "pretrain"), preset="small",
                                    epochs=1, device="cpu", workers=0, cache=str(work / "cache"), overrides=tiny,
                                    max_steps=2, log_every=1)
        logic.start("pretrain", pretrain)
        snapshot = self.waitForRun(pretrain.out)
        self.assertEqual(snapshot.state, "finished", snapshot.message)
        self.assertTrue(any(len(xs) >= 2 for xs, _ in snapshot.series.values()), snapshot.series)

        finetune = FinetuneSettings(out=str(work / "finetune"), images=exported["images"],
                                    labels=exported["labels"], label_table=exported["label_table"],
                                    pretrained=str(training_runs.pretrained_checkpoint(pretrain.out)),
                                    preset="small", epochs=2, device="cpu", workers=0, cache=str(work / "cache"),
                                    overrides=tiny, roi=(64, 64, 32), spacing=(6.0, 6.0, 6.0), val_every=1,
                                    max_steps=4, log_every=1)
        logic.start("finetune", finetune)
        snapshot = self.waitForRun(finetune.out)
        self.assertEqual(snapshot.state, "finished", snapshot.message)
        self.assertIn("dice/organ", snapshot.series)
        logic.showCurves(snapshot)
        chart = plots.find_chart(slicer.mrmlScene, f"{finetune.out}#dice")
        self.assertEqual(plots.curve_values(chart, "organ")[1], list(snapshot.series["dice/organ"][1]))

        savedHome = os.environ.get("MIM3D_HOME")
        os.environ["MIM3D_HOME"] = str(work / "home")
        try:
            modelId = logic.registerModel(finetune.out)
            from mim3d import registry

            self.assertIn(modelId, [m.id for m in registry.list_installed()])
        finally:
            if savedHome is None:
                os.environ.pop("MIM3D_HOME", None)
            else:
                os.environ["MIM3D_HOME"] = savedHome
            shutil.rmtree(work, ignore_errors=True)

    def waitForRun(self, runDir, timeoutSeconds=900):
        watcher = training_runs.RunWatcher(runDir)
        deadline = time.monotonic() + timeoutSeconds
        snapshot = watcher.refresh()
        while (snapshot.state in ("starting", "running", "stopping", "missing") or snapshot.alive) \
                and time.monotonic() < deadline:
            slicer.app.processEvents()
            time.sleep(0.5)
            snapshot = watcher.refresh()
        return snapshot
