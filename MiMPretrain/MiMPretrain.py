"""MiMPretrain: pre-train (MiM, MAE, SimMIM) and fine-tune from Slicer; watch, stop, resume and reuse the runs.

Qt wiring only: runs are `mim3d pretrain|finetune` workers started detached (they outlive the panel and a Slicer
restart) by MiMPretrainLib.training_runs; the panel reads only the run folders (training_runs.RunWatcher) and
decides what it shows with training_panel (run state, Start buttons, path fields, estimates); the fine-tuning data
sources are data_sources; curves are MRML plot charts (plots). torch is never imported by this module.
"""

import shutil
import time
from dataclasses import replace
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

from mim3d.labels import Label, LabelTable
from mim3d.presets import CROP_CENTRES, ENCODER_MODES
from MiMPretrainLib import plots, training_runs
from MiMPretrainLib.data_sources import SOURCE_FIELDS, DataSource, FinetuneData
from MiMPretrainLib.training_panel import (
    ACTIVE,
    LatestCheck,
    TrainingPanel,
    detected_device,
    estimate,
    memory_estimate,
    path_text,
    plan_request,
)
from MiMPretrainLib.training_settings import (
    ARCHS,
    DEVICES,
    METHOD_NOTES,
    METHODS,
    PRESETS,
    FinetuneOptions,
    FinetuneSettings,
    PretrainOptions,
    PretrainSettings,
    default,
    installed_models,
    label_names,
    preview_args,
    start_after_install,
    summarize_preview,
)
from MiMSegmentationLib import worker

# scanFolders: a list edited with the Add/Remove buttons; activeRun: the run the panel follows (re-attached on load);
# the path fields: text wired by hand through path_text (the wrapper's Path connector shows an empty path as ".").
UNBOUND_PARAMETERS = ("scanFolders", "activeRun", "cacheFolder", "initCheckpoint", "pretrainRunFolder",
                      "imagesFolder", "labelsFolder", "datasetFile", "segmentationsFolder", "labelTableFile",
                      "pretrainedEncoder", "finetuneRunFolder")
REFRESH_MS = 2000


class MiMPretrain(ScriptedLoadableModule):
    def __init__(self, parent):
        ScriptedLoadableModule.__init__(self, parent)
        self.parent.title = _("MiM Pre-train")
        self.parent.categories = [translate("qSlicerAbstractCoreModule", "Segmentation")]
        self.parent.dependencies = ["MiMSegmentation"]
        self.parent.contributors = ["MiM for 3D Slicer maintainers"]
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
    # defaults: the command line's (training_settings.default; PANEL_DEFAULTS where the panel must differ)
    scanFolders: list[str]
    method: Annotated[str, Choice(list(METHODS))] = default(PretrainOptions, "method")
    pretrainPreset: Annotated[str, Choice(list(PRESETS))] = default(PretrainOptions, "preset")
    pretrainEpochs: Annotated[int, WithinRange(1, 100000)] = default(PretrainOptions, "epochs")
    pretrainBatchSize: Annotated[int, WithinRange(1, 256)] = default(PretrainOptions, "batch_size")
    pretrainBaseLr: Annotated[float, WithinRange(1e-7, 1.0)] = default(PretrainOptions, "blr")
    pretrainAmp: bool = default(PretrainOptions, "amp")
    pretrainDevice: Annotated[str, Choice(list(DEVICES))] = default(PretrainOptions, "device")
    pretrainWorkers: Annotated[int, WithinRange(0, 64)] = default(PretrainOptions, "workers")
    cacheFolder: str
    initCheckpoint: str
    pretrainRunFolder: str
    dataSource: DataSource = DataSource.FOLDERS
    imagesFolder: str
    labelsFolder: str
    datasetFile: str
    segmentationsFolder: str
    labelTableFile: str
    pretrainedEncoder: str
    encoderMode: Annotated[str, Choice(list(ENCODER_MODES))] = default(FinetuneOptions, "encoder")
    cropCentres: Annotated[str, Choice(list(CROP_CENTRES))] = default(FinetuneOptions, "crops")
    keepLargest: str
    arch: Annotated[str, Choice(list(ARCHS))] = default(FinetuneOptions, "arch")
    finetunePreset: Annotated[str, Choice(list(PRESETS))] = default(FinetuneOptions, "preset")
    finetuneEpochs: Annotated[int, WithinRange(1, 100000)] = default(FinetuneOptions, "epochs")
    finetuneBatchSize: Annotated[int, WithinRange(1, 256)] = default(FinetuneOptions, "batch_size")
    finetuneLr: Annotated[float, WithinRange(1e-7, 1.0)] = default(FinetuneOptions, "lr")
    finetuneDevice: Annotated[str, Choice(list(DEVICES))] = default(FinetuneOptions, "device")
    finetuneWorkers: Annotated[int, WithinRange(0, 64)] = default(FinetuneOptions, "workers")
    finetuneRunFolder: str
    runsFolder: Path
    activeRun: str = ""


class MiMPretrainWidget(ScriptedLoadableModuleWidget, VTKObservationMixin):
    def __init__(self, parent=None) -> None:
        ScriptedLoadableModuleWidget.__init__(self, parent)
        VTKObservationMixin.__init__(self)
        self.logic = None
        self._parameterNode = None
        self._parameterNodeGuiTag = None
        self.panel = TrainingPanel()
        self.chartLayout = plots.ChartLayout()
        self.devices = None  # the result of `mim3d devices`
        self.watcher = None
        self.snapshot = None
        self.installedModels = []  # (name shown, package folder) of installedModelSelector's items after the first
        self.previewCheck = LatestCheck(qt.QTimer.singleShot, self.onPreviewFinished)
        self.planCheck = LatestCheck(qt.QTimer.singleShot, lambda outcome: self.updateGUI())  # the shown form's
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
        self.pathFields = {  # parameter -> its ctkPathLineEdit
            "cacheFolder": self.ui.cacheFolderPathLineEdit,
            "initCheckpoint": self.ui.initCheckpointPathLineEdit,
            "pretrainRunFolder": self.ui.pretrainRunFolderPathLineEdit,
            "imagesFolder": self.ui.imagesPathLineEdit,
            "labelsFolder": self.ui.labelsPathLineEdit,
            "datasetFile": self.ui.datasetPathLineEdit,
            "segmentationsFolder": self.ui.segmentationsPathLineEdit,
            "labelTableFile": self.ui.labelTablePathLineEdit,
            "pretrainedEncoder": self.ui.pretrainedPathLineEdit,
            "finetuneRunFolder": self.ui.finetuneRunFolderPathLineEdit,
        }
        self.ui.cacheFolderPathLineEdit.connect("currentPathChanged(QString)", self.onPathEdited)
        self.ui.initCheckpointPathLineEdit.connect("currentPathChanged(QString)", self.onPathEdited)
        self.ui.pretrainRunFolderPathLineEdit.connect("currentPathChanged(QString)", self.onPathEdited)
        self.ui.imagesPathLineEdit.connect("currentPathChanged(QString)", self.onPathEdited)
        self.ui.labelsPathLineEdit.connect("currentPathChanged(QString)", self.onPathEdited)
        self.ui.datasetPathLineEdit.connect("currentPathChanged(QString)", self.onPathEdited)
        self.ui.segmentationsPathLineEdit.connect("currentPathChanged(QString)", self.onPathEdited)
        self.ui.labelTablePathLineEdit.connect("currentPathChanged(QString)", self.onPathEdited)
        self.ui.pretrainedPathLineEdit.connect("currentPathChanged(QString)", self.onPathEdited)
        self.ui.finetuneRunFolderPathLineEdit.connect("currentPathChanged(QString)", self.onPathEdited)
        self.ui.sceneSegmentationsSelector.connect("checkedNodesChanged()", self.updateGUI)
        self.ui.tabWidget.connect("currentChanged(int)", self.updateGUI)  # the memory plan follows the shown form
        self.ui.addScanFolderButton.connect("clicked(bool)", self.onAddScanFolder)
        self.ui.removeScanFolderButton.connect("clicked(bool)", self.onRemoveScanFolder)
        self.ui.startPretrainButton.connect("clicked(bool)", self.onStartPretrain)
        self.ui.startFinetuneButton.connect("clicked(bool)", self.onStartFinetune)
        self.ui.loadLabelsButton.connect("clicked(bool)", self.onLoadLabels)
        self.ui.labelTableWidget.connect("cellDoubleClicked(int,int)", self.onLabelCellDoubleClicked)
        self.ui.useSelectedRunButton.connect("clicked(bool)", self.onUseSelectedRun)
        self.ui.installedModelSelector.connect("activated(int)", self.onInstalledModelSelected)
        self.ui.refreshRunsButton.connect("clicked(bool)", self.refreshRunList)
        self.ui.runsFolderButton.connect("directoryChanged(QString)", lambda folder: self.refreshRunList())
        self.ui.runSelector.connect("activated(int)", self.onRunSelected)
        self.ui.stopRunButton.connect("clicked(bool)", self.onStopRun)
        self.ui.resumeRunButton.connect("clicked(bool)", self.onResumeRun)
        self.ui.useForSegmentationButton.connect("clicked(bool)", self.onUseForSegmentation)
        self.refreshTimer.setInterval(REFRESH_MS)
        self.refreshTimer.connect("timeout()", self.refreshRun)

        self.initializeParameterNode()
        self.detectDevices()
        self.refreshRunList()
        self.refreshInstalledModels()
        if self._parameterNode.activeRun:
            self.attach(self._parameterNode.activeRun)

    def cleanup(self) -> None:
        self.removeObservers()
        self.refreshTimer.stop()

    def enter(self) -> None:
        self.initializeParameterNode()
        self.refreshInstalledModels()  # MiM Segmentation or a finished run may have installed one since
        if detected_device(self.devices) is None or self.devices.get("torch") is None:
            self.detectDevices()  # again: PyTorch may have been installed since

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
            for field in self.pathFields:  # "." in scenes saved while these were Path parameters
                setattr(self._parameterNode, field, path_text(getattr(self._parameterNode, field)))
            self._parameterNodeGuiTag = self._parameterNode.connectGui(self.ui)
            self.addObserver(self._parameterNode, vtk.vtkCommand.ModifiedEvent, self.updateGUI)
            self.ui.scanFoldersList.clear()
            self.ui.scanFoldersList.addItems(list(self._parameterNode.scanFolders))
        self.updateGUI()

    def onPathEdited(self, text=None) -> None:
        if not self._parameterNode:
            return
        for field, lineEdit in self.pathFields.items():
            setattr(self._parameterNode, field, path_text(lineEdit.currentPath))
        self.updateGUI()

    # ---- settings from the panel -------------------------------------------------------------------------------------

    def pretrainSettings(self) -> PretrainSettings:
        p = self._parameterNode
        return PretrainSettings(
            data=tuple(p.scanFolders), out=p.pretrainRunFolder, method=p.method, preset=p.pretrainPreset,
            epochs=p.pretrainEpochs, batch_size=p.pretrainBatchSize, blr=p.pretrainBaseLr, amp=p.pretrainAmp,
            device=p.pretrainDevice, workers=p.pretrainWorkers, cache=p.cacheFolder or None,
            init=p.initCheckpoint or None)

    def finetuneData(self) -> FinetuneData:
        p = self._parameterNode
        return FinetuneData(p.dataSource, images=p.imagesFolder, labels=p.labelsFolder, label_table=p.labelTableFile,
                            dataset=p.datasetFile, segmentations=p.segmentationsFolder,
                            scene_nodes=tuple(self.ui.sceneSegmentationsSelector.checkedNodes()))

    def finetuneSettings(self, dataOptions) -> FinetuneSettings:
        p = self._parameterNode
        return FinetuneSettings(
            out=p.finetuneRunFolder, pretrained=p.pretrainedEncoder or None, arch=p.arch, preset=p.finetunePreset,
            epochs=p.finetuneEpochs, batch_size=p.finetuneBatchSize, lr=p.finetuneLr, device=p.finetuneDevice,
            workers=p.finetuneWorkers, encoder=p.encoderMode, crops=p.cropCentres,
            keep_largest=label_names(p.keepLargest), **dataOptions)

    # ---- rendering ------------------------------------------------------------------------------------------------

    def updateGUI(self, caller=None, event=None) -> None:
        if not self._parameterNode:
            return
        p = self._parameterNode
        self.ui.methodInfoLabel.text = METHOD_NOTES[p.method]
        self.ui.encoderModeInfoLabel.text = ENCODER_MODES[p.encoderMode]
        for field, lineEdit in self.pathFields.items():
            if path_text(lineEdit.currentPath) != getattr(p, field):
                wasBlocked = lineEdit.blockSignals(True)  # onPathEdited would read the fields not written yet
                lineEdit.currentPath = getattr(p, field)
                lineEdit.blockSignals(wasBlocked)
        data = self.finetuneData()
        for widget, field in ((self.ui.imagesPathLineEdit, "images"), (self.ui.labelsPathLineEdit, "labels"),
                              (self.ui.labelTablePathLineEdit, "label_table"), (self.ui.datasetPathLineEdit, "dataset"),
                              (self.ui.segmentationsPathLineEdit, "segmentations"),
                              (self.ui.sceneSegmentationsSelector, "scene_nodes")):
            widget.enabled = field in SOURCE_FIELDS[data.source]

        pretrain, finetune = self.pretrainSettings(), self.finetuneSettings(data.options())
        for settings, problems, count, button, label, tab in (
                (pretrain, pretrain.check(), self.numScans, self.ui.startPretrainButton, self.ui.pretrainEstimateLabel,
                 self.ui.pretrainTab),
                (finetune, data.problems(finetune), data.case_count(), self.ui.startFinetuneButton,
                 self.ui.finetuneEstimateLabel, self.ui.finetuneTab)):
            start = self.panel.start_view(problems)
            button.enabled, button.toolTip = start.enabled, start.tooltip
            shown = self.ui.tabWidget.currentIndex == self.ui.tabWidget.indexOf(tab)
            if shown:
                self.planCheck.request(settings.COMMAND, plan_request(settings, problems, self.devices))
            text = estimate(settings, count, detected_device(self.devices))
            lines = [_("Estimated training time: {estimate}").format(estimate=text) if text else "",
                     memory_estimate(self.planCheck) if shown else ""]
            label.text = start.hint or "\n".join(line for line in lines if line)

        run = self.panel.view()
        self.ui.stopRunButton.enabled = run.stop_enabled
        self.ui.resumeRunButton.enabled = run.resume_enabled
        self.ui.useForSegmentationButton.enabled = run.use_enabled
        self.ui.useSelectedRunButton.enabled = bool(self.snapshot and self.snapshot.command == "pretrain")
        self.ui.runProgressBar.value = run.progress
        self.ui.runStatusLabel.text = f"{run.status}\n{run.error}" if run.error else run.status

    def detectDevices(self) -> None:
        """Ask the worker which device an "auto" run would use (torch is never imported here), for the estimates."""
        def onFinished(outcome):
            self.devices = outcome.result if outcome.ok else None
            self.updateGUI()

        worker.WorkerJob(worker.worker_command("devices", []), schedule=qt.QTimer.singleShot,
                         on_finished=onFinished).start()

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
        folders = list(self._parameterNode.scanFolders)
        self.previewCheck.request("pretrain", preview_args(folders) if folders else None)
        if not folders:
            self.numScans, self.ui.dataPreviewLabel.text = None, ""
        elif self.previewCheck.pending:
            self.numScans, self.ui.dataPreviewLabel.text = None, _("Looking for scans...")

    def onPreviewFinished(self, outcome) -> None:
        event = outcome.result or outcome.error or {"type": "error", "message": outcome.message}
        self.ui.dataPreviewLabel.text = summarize_preview(event)
        self.numScans = (outcome.result or {}).get("summary", {}).get("count")
        self.updateGUI()

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
            self.showLabels(self.finetuneData().labels_to_edit())

    # ---- runs -------------------------------------------------------------------------------------------------------

    def onStartPretrain(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to start pre-training."), waitCursor=True):
            settings = self.pretrainSettings()
            if start_after_install(self.installDependencies, lambda: self.logic.start("pretrain", settings)):
                self.follow(settings.out)

    def onStartFinetune(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to start fine-tuning."), waitCursor=True):
            edited = self.tableLabels() if self.ui.labelTableWidget.rowCount else None
            settings = start_after_install(self.installDependencies, lambda: self.logic.startFinetune(
                self.finetuneData(), self.finetuneSettings({}), edited))
            if settings:
                self.follow(settings.out)

    def installDependencies(self) -> bool:
        """MiM Segmentation's install of the worker's packages (one confirmation; False: declined)."""
        from MiMSegmentation import MiMSegmentationLogic

        ready = MiMSegmentationLogic().installDependencies()
        if ready and detected_device(self.devices) is None:
            self.detectDevices()  # PyTorch was just installed: the estimates can use the device now
        return ready

    def refreshInstalledModels(self) -> None:
        self.installedModels = installed_models()
        self.ui.installedModelSelector.clear()
        self.ui.installedModelSelector.addItem(_("(choose an installed model)"))
        for name, _folder in self.installedModels:
            self.ui.installedModelSelector.addItem(name)

    def onInstalledModelSelected(self, index) -> None:
        if self._parameterNode and 1 <= index <= len(self.installedModels):
            self._parameterNode.pretrainedEncoder = self.installedModels[index - 1][1]
        self.updateGUI()

    def follow(self, runDir) -> None:
        self.panel.started(runDir)
        self.attach(runDir)

    def attach(self, runDir) -> None:
        """Follow a run folder: its state, curves and log, refreshed every few seconds (survives a restart)."""
        self._parameterNode.activeRun = str(runDir)
        self.watcher = training_runs.RunWatcher(runDir)
        self.chartLayout.follow()
        self.refreshRun()
        self.refreshTimer.start()

    def refreshRun(self) -> None:
        if self.watcher is None:
            return
        self.snapshot = self.watcher.refresh()
        state = self.panel.update(self.snapshot)
        self.ui.runLogTextEdit.setPlainText("\n".join(self.snapshot.log_tail))
        self.logic.showCurves(self.snapshot, self.chartLayout)
        if state not in ACTIVE:
            self.refreshTimer.stop()
            self.refreshRunList()
        self.updateGUI()

    def refreshRunList(self) -> None:
        folder = path_text(self._parameterNode.runsFolder) if self._parameterNode else ""
        self.recentRuns = training_runs.list_recent_runs([folder] if folder else [])
        self.ui.runSelector.clear()
        for run in self.recentRuns:
            self.ui.runSelector.addItem(f"{Path(run.run_dir).name} · {run.command} · {run.state}")

    def onRunSelected(self, index) -> None:
        if 0 <= index < len(self.recentRuns):
            self.panel = TrainingPanel()
            self.attach(self.recentRuns[index].run_dir)

    def onUseSelectedRun(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("This run cannot be used as an encoder."), waitCursor=True):
            self._parameterNode.pretrainedEncoder = str(training_runs.pretrained_checkpoint(self.snapshot.run_dir))

    def onStopRun(self) -> None:
        self.logic.stop(self.snapshot.run_dir)
        self.panel.stop_requested()
        self.updateGUI()

    def onResumeRun(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to resume the run."), waitCursor=True):
            self.logic.resume(self.snapshot.run_dir)
            self.follow(self.snapshot.run_dir)

    def onUseForSegmentation(self) -> None:
        with slicer.util.tryWithErrorDisplay(_("Failed to register the model."), waitCursor=True):
            modelId = self.logic.registerModel(self.snapshot.run_dir)
            self.panel.model_registered(modelId)
            slicer.util.infoDisplay(_("The model is installed as '{id}'; MiM Segmentation lists it.").format(
                id=modelId))
        self.updateGUI()


class MiMPretrainLogic(ScriptedLoadableModuleLogic):
    """Runs without the GUI: start (fine-tuning: its scene data written first), stop, resume, show curves, register."""

    def getParameterNode(self):
        return MiMPretrainParameterNode(super().getParameterNode())

    @staticmethod
    def start(command: str, settings) -> int:
        """Check the settings, then start the worker detached; returns its process id."""
        problems = settings.check()
        if problems:
            raise ValueError("\n".join(problems))
        return training_runs.start_run(command, settings.to_args(), settings.out)

    def startFinetune(self, data: FinetuneData, settings: FinetuneSettings, editedLabels=None) -> FinetuneSettings:
        """Check the form, write what the run reads (scene segmentations, an edited label table) beside the run
        folder, and start it; the settings it was started with."""
        problems = data.problems(replace(settings, **data.options()))
        if problems:
            raise ValueError("\n".join(problems))
        settings = replace(settings, **data.options_to_start(settings.out, editedLabels))
        self.start("finetune", settings)
        return settings

    @staticmethod
    def stop(runDir) -> bool:
        return training_runs.stop_run(runDir)

    @staticmethod
    def resume(runDir) -> int:
        return training_runs.resume_run(runDir)

    @staticmethod
    def showCurves(snapshot, chartLayout=None) -> None:
        """The run's loss and Dice charts; with a ChartLayout, the one that matters most goes into the layout when
        it is time to (plots.ChartLayout)."""
        chart = plots.update_run_charts(slicer.mrmlScene, snapshot)
        if chart is not None and chartLayout is not None and slicer.util.mainWindow():
            chartLayout.show(slicer.modules.plots.logic(), chart)

    @staticmethod
    def registerModel(runDir) -> str:
        """Install a finished fine-tuning run's model package; its id (MiM Segmentation lists it on entering)."""
        return training_runs.register_model(runDir).name


class MiMPretrainTest(ScriptedLoadableModuleTest):
    """In-Slicer self-test of the pre-train and fine-tune panels through the Logic: scene segmentations exported as
    training data; a tiny pre-training run started, watched, stopped and resumed to its end; a tiny fine-tuning run
    from the scene with that encoder; its curves as plot charts; its model registered. The worker steps are skipped
    when PyTorch/MONAI are absent (--testing installs nothing); the scene export runs always. The Lib functions these
    steps call are tested on the host too (Testing/test_pretrain_panel.py, test_training_runs.py)."""

    def setUp(self):
        slicer.mrmlScene.Clear()

    def runTest(self):
        for test in (self.test_fine_tuning_choices_reach_the_run_options, self.test_scene_export_and_tiny_runs):
            self.setUp()
            test()

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

    def test_fine_tuning_choices_reach_the_run_options(self):
        """The Crop centres and Keep one piece of fields, bound to the parameter node, become the run's options."""
        widget = slicer.modules.mimpretrain.widgetRepresentation().self()
        parameters = widget.logic.getParameterNode()
        parameters.cropCentres, parameters.keepLargest = "classes", "organ, other organ"
        slicer.app.processEvents()
        self.assertEqual(widget.ui.cropCentresSelector.currentText, "classes")
        self.assertEqual(widget.ui.keepLargestLineEdit.text, "organ, other organ")
        settings = widget.finetuneSettings({})
        self.assertEqual((settings.crops, settings.keep_largest), ("classes", ("organ", "other organ")))
        args = settings.to_args()
        self.assertEqual(args[args.index("--crops"):][:5], ["--crops", "classes", "--keep-largest", "organ",
                                                            "other organ"])
        parameters.cropCentres, parameters.keepLargest = "pos-neg", ""

    def test_scene_export_and_tiny_runs(self):
        from MiMSegmentationLib import dependencies

        work = Path(slicer.util.tempDirectory("MiMPretrainTest"))
        logic = MiMPretrainLogic()
        cases = [self.sceneCase(f"case{i}", 2 * i) for i in range(3)]
        data = FinetuneData(DataSource.SCENE, scene_nodes=tuple(segmentation for _, segmentation in cases))
        exported = data.options_to_start(str(work / "finetune"))
        self.assertEqual(len(list(Path(exported["images"]).iterdir())), 3)
        self.assertEqual(LabelTable.load(exported["label_table"]).names, ("organ",))

        if not dependencies.worker_ready():
            self.delayDisplay("Skipped the training runs: PyTorch/MONAI are not installed.")
            shutil.rmtree(work, ignore_errors=True)
            return
        tiny = {"embed_dims": [12, 24, 48, 96], "depths": [1, 1, 1, 1], "num_heads": 3}
        pretrain = PretrainSettings(data=(exported["images"],), out=str(work / "pretrain"), preset="small",
                                    epochs=10, device="cpu", workers=0, cache=str(work / "cache"), override=tiny,
                                    max_steps=6, log_every=1)
        logic.start("pretrain", pretrain)
        snapshot = self.waitForRun(pretrain.out, until=lambda s: s.state == "running")
        self.assertTrue(logic.stop(pretrain.out))
        snapshot = self.waitForRun(pretrain.out)
        self.assertEqual(snapshot.state, "stopped", snapshot.message)
        self.assertLess(snapshot.step, 6)
        logic.resume(pretrain.out)
        snapshot = self.waitForRun(pretrain.out)
        self.assertEqual((snapshot.state, snapshot.step), ("finished", 6), snapshot.message)
        self.assertTrue(any(len(xs) >= 2 for xs, _ in snapshot.series.values()), snapshot.series)

        finetune = FinetuneSettings(out=str(work / "finetune"),
                                    pretrained=str(training_runs.pretrained_checkpoint(pretrain.out)),
                                    preset="small", epochs=2, device="cpu", workers=0, cache=str(work / "cache"),
                                    override=tiny, roi=(64, 64, 32), spacing=(6.0, 6.0, 6.0), val_every=1,
                                    max_steps=4, log_every=1)
        finetune = logic.startFinetune(data, finetune)
        snapshot = self.waitForRun(finetune.out)
        self.assertEqual(snapshot.state, "finished", snapshot.message)
        self.assertIn("dice/organ", snapshot.series)
        logic.showCurves(snapshot)
        chart = plots.find_chart(slicer.mrmlScene, f"{finetune.out}#dice")
        self.assertEqual(plots.curve_values(chart, "organ")[1], list(snapshot.series["dice/organ"][1]))

        from MiMSegmentationLib import selftest_checks

        try:
            with selftest_checks.private_mim3d_home(work / "home"):
                modelId = logic.registerModel(finetune.out)
                from mim3d import registry

                self.assertIn(modelId, [m.id for m in registry.list_installed()])
        finally:
            shutil.rmtree(work, ignore_errors=True)

    def waitForRun(self, runDir, until=None, timeoutSeconds=900):
        """The run's snapshot once `until(snapshot)` holds (default: the run has ended and its worker exited)."""
        until = until or (lambda s: s.state not in ("starting", "running", "stopping", "missing") and not s.alive)
        watcher = training_runs.RunWatcher(runDir)
        deadline = time.monotonic() + timeoutSeconds
        snapshot = watcher.refresh()
        while not until(snapshot) and time.monotonic() < deadline:
            slicer.app.processEvents()
            time.sleep(0.5)
            snapshot = watcher.refresh()
        return snapshot
