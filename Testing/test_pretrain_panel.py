"""The MiM Pre-train panel's decisions, outside Slicer's GUI: the fine-tuning data sources (MiMPretrainLib.data_sources)
on real MRML from slicer-core, the run view apart from the forms, path fields, the time estimate on the device a run
will use, and when a run's chart goes into the layout (MiMPretrainLib.plots with Slicer's real plots logic).
The module file itself is read, not run: the widget's wiring that these decisions need is checked in its source.
"""

from __future__ import annotations

import ast
import contextlib
import io
import json
from pathlib import Path

import numpy as np
import pytest
import slicer
import torch
from mrml_scene import headless_scene

from mim3d import memory
from mim3d.labels import Label, LabelTable
from mim3d.protocol import Emitter, parse_line
from mim3d.training.plans import PlanRefused, StepFootprint, TrainingPlan, report_plan
from MiMPretrainLib import plots
from MiMPretrainLib.data_sources import (
    NO_CHECKED_SEGMENTATION,
    DataSource,
    FinetuneData,
    data_folder,
    scene_cases,
)
from MiMPretrainLib.training_panel import (
    LatestCheck,
    StartView,
    TrainingPanel,
    detected_device,
    estimate,
    memory_estimate,
    path_text,
    plan_request,
)
from MiMPretrainLib.training_runs import RunSnapshot
from MiMPretrainLib.training_settings import (
    NO_GPU_ESTIMATE,
    FinetuneSettings,
    PretrainSettings,
    plan_args,
    summarize_plan,
)

MODULE_FILE = Path(__file__).resolve().parents[1] / "MiMPretrain" / "MiMPretrain.py"
SHAPE_KJI = (8, 12, 10)


@pytest.fixture
def scene():
    with headless_scene() as scene:
        yield scene


def scene_case(scene, name: str, segments=("liver",)):
    """A CT-like volume and a segmentation made on it, one painted box per segment."""
    array = np.full(SHAPE_KJI, -1000, np.int16)
    array[2:6, 3:9, 2:8] = 60
    volume = slicer.util.addVolumeFromArray(array, ijkToRAS=np.diag([-2.0, -2.0, 3.0, 1.0]), name=name)
    segmentation = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", f"{name} labels")
    segmentation.SetReferenceImageGeometryParameterFromVolumeNode(volume)
    for i, segment in enumerate(segments):
        segmentation.GetSegmentation().AddEmptySegment(segment, segment, (0.2 * i, 0.5, 0.9))
        mask = np.zeros(SHAPE_KJI, np.uint8)
        mask[2 + i:5, 4:8, 3:7] = 1
        slicer.util.updateSegmentBinaryLabelmapFromArray(mask, segmentation, segment, volume)
    return volume, segmentation


def finetune_settings(tmp_path: Path, **data) -> FinetuneSettings:
    return FinetuneSettings(out=str(tmp_path / "runs" / "organs"), **data)


def module_tree() -> ast.Module:
    return ast.parse(MODULE_FILE.read_text(encoding="utf-8"))


# ---- issue 16, item 6: scene segmentations ticked in the selector let fine-tuning start -----------------------------

def test_checking_a_scene_segmentation_is_what_fine_tuning_from_the_scene_needs(scene, tmp_path):
    _, segmentation = scene_case(scene, "ct")
    settings = finetune_settings(tmp_path)

    assert FinetuneData(DataSource.SCENE).problems(settings) == [NO_CHECKED_SEGMENTATION]
    assert FinetuneData(DataSource.SCENE, scene_nodes=(segmentation,)).problems(settings) == []
    assert FinetuneData(DataSource.FOLDERS, scene_nodes=(segmentation,)).problems(settings)[0].startswith(
        "Choose one source")  # the ticks count only for the scene source


def test_the_selectors_ticks_re_evaluate_the_form():
    """The checkable selector is no parameter: its checkedNodesChanged() must reach the method that sets Start."""
    widget = next(n for n in module_tree().body if isinstance(n, ast.ClassDef) and n.name == "MiMPretrainWidget")
    slots = [call.args[1] for call in ast.walk(widget) if isinstance(call, ast.Call)
             and isinstance(call.func, ast.Attribute) and call.func.attr == "connect"
             and ast.unparse(call.func.value) == "self.ui.sceneSegmentationsSelector"
             and ast.literal_eval(call.args[0]) == "checkedNodesChanged()"]
    assert [ast.unparse(slot) for slot in slots] == ["self.updateGUI"]


# ---- issue 15: the data sources' decisions --------------------------------------------------------------------------

def test_each_source_passes_only_its_own_fields(tmp_path):
    fields = dict(images="/d/imagesTr", labels="/d/labelsTr", label_table="/d/labels.json", dataset="/d/dataset.json",
                  segmentations="/d/segs")
    assert FinetuneData(DataSource.FOLDERS, **fields).options() == {
        "images": "/d/imagesTr", "labels": "/d/labelsTr", "label_table": "/d/labels.json"}
    assert FinetuneData(DataSource.DATASET, **fields).options() == {"dataset": "/d/dataset.json"}
    assert FinetuneData(DataSource.SEGMENTATION_FILES, **fields).options() == {"segmentations": "/d/segs"}
    assert FinetuneData(DataSource.SCENE, **fields).options() == {}
    assert FinetuneData(DataSource.FOLDERS, images="/d/imagesTr").options()["labels"] is None  # empty: not given


def test_the_source_is_stored_by_name_and_shown_by_its_label():
    assert [(s.name, s.label()) for s in DataSource] == [
        ("FOLDERS", "images + labels folders"), ("DATASET", "dataset.json"),
        ("SEGMENTATION_FILES", "folder of .seg.nrrd"), ("SCENE", "segmentations in the scene")]


def test_cases_are_counted_where_it_is_cheap(scene, tmp_path):
    images = tmp_path / "imagesTr"
    images.mkdir()
    for name in ("a.nii.gz", "b.nii.gz", ".DS_Store"):
        (images / name).write_bytes(b"")
    nodes = tuple(scene_case(scene, f"ct{i}")[1] for i in range(2))

    assert FinetuneData(DataSource.FOLDERS, images=str(images)).case_count() == 2
    assert FinetuneData(DataSource.FOLDERS, images=str(tmp_path / "missing")).case_count() is None
    assert FinetuneData(DataSource.SCENE, scene_nodes=nodes).case_count() == 2
    assert FinetuneData(DataSource.DATASET, dataset="d.json").case_count() is None


def test_labels_to_edit_come_from_the_chosen_source(scene, tmp_path):
    table = tmp_path / "labels.json"
    LabelTable((Label(1, "liver", (200, 100, 50)), Label(2, "spleen", (10, 20, 30)))).save(table)
    dataset = tmp_path / "dataset.json"
    dataset.write_text(json.dumps({"labels": {"0": "background", "1": "kidney"}}), encoding="utf-8")
    nodes = (scene_case(scene, "a", ("liver", "aorta"))[1], scene_case(scene, "b", ("aorta", "stomach"))[1])

    assert FinetuneData(DataSource.FOLDERS, label_table=str(table)).labels_to_edit().names == ("liver", "spleen")
    assert FinetuneData(DataSource.DATASET, dataset=str(dataset)).labels_to_edit().names == ("kidney",)
    assert FinetuneData(DataSource.SCENE, scene_nodes=nodes).labels_to_edit().names == ("liver", "aorta", "stomach")
    with pytest.raises(ValueError, match="^No labels to read: "):
        FinetuneData(DataSource.SEGMENTATION_FILES, segmentations=str(tmp_path)).labels_to_edit()


def test_starting_from_the_scene_exports_the_checked_segmentations_beside_the_run(scene, tmp_path):
    nodes = (scene_case(scene, "ct a")[1], scene_case(scene, "ct b", ("liver", "spleen"))[1])
    run = tmp_path / "runs" / "organs"
    data = FinetuneData(DataSource.SCENE, scene_nodes=nodes)

    options = data.options_to_start(str(run))

    out = tmp_path / "runs" / "organs-data"
    assert options == {"images": str(out / "imagesTr"), "labels": str(out / "labelsTr"),
                       "label_table": str(out / "labels.json")}
    assert sorted(p.name for p in (out / "imagesTr").iterdir()) == ["ct_a.nrrd", "ct_b.nrrd"]
    assert LabelTable.load(options["label_table"]).names == ("liver", "spleen")
    settings = FinetuneSettings(out=str(run), **options)
    assert settings.check() == [] and data.problems(settings) == []
    assert not run.exists()  # the worker makes the run folder


def test_a_label_table_edited_in_the_panel_replaces_the_chosen_file(tmp_path):
    chosen = tmp_path / "labels.json"
    LabelTable((Label(1, "liver", (200, 100, 50)),)).save(chosen)
    edited = LabelTable((Label(1, "Liver (edited)", (1, 2, 3)),))
    data = FinetuneData(DataSource.FOLDERS, images="i", labels="l", label_table=str(chosen))

    options = data.options_to_start(str(tmp_path / "run"), edited)

    assert options["label_table"] == str(tmp_path / "run-data" / "labels.json")
    assert LabelTable.load(options["label_table"]).names == ("Liver (edited)",)
    assert LabelTable.load(chosen).names == ("liver",)
    assert data.options_to_start(str(tmp_path / "run"))["label_table"] == str(chosen)  # nothing edited


def test_a_segmentation_without_its_source_volume_is_refused_by_name(scene):
    volume, segmentation = scene_case(scene, "ct")
    assert scene_cases([segmentation]) == [(volume, segmentation)]
    orphan = scene.AddNewNodeByClass("vtkMRMLSegmentationNode", "drawn nowhere")
    with pytest.raises(ValueError, match="^Segmentation 'drawn nowhere' has no source volume"):
        scene_cases([segmentation, orphan])
    with pytest.raises(ValueError, match="^Choose a new run folder first"):
        data_folder("")


# ---- issue 15: run monitoring apart from the forms ------------------------------------------------------------------

def running(**fields) -> RunSnapshot:
    values = dict(run_dir="/runs/r", command="pretrain", state="running", alive=True, epoch=3, epochs=10, step=120,
                  total_steps=400, fraction=0.3, eta_seconds=720.0, eta="12 min", message="",
                  last_checkpoint="/runs/r/checkpoints/last.pt", series={}, log_tail=(), model_package=None,
                  best_mean_dice=None, updated="")
    return RunSnapshot(**{**values, **fields})


def test_the_run_view_does_not_depend_on_a_forms_problems():
    idle = TrainingPanel()
    assert idle.view().status == "No run yet: start one, or choose one of the runs folder's runs."
    assert idle.start_view(["Choose at least one folder of scans."]) == StartView(
        False, "Choose at least one folder of scans.", "Choose at least one folder of scans.")
    assert idle.start_view([]) == StartView(True, "", "")

    panel = TrainingPanel()
    panel.started("/runs/r")
    panel.update(running())
    assert panel.view().status == "epoch 3/10 · step 120/400 · ETA 12 min"
    assert panel.start_view([]) == StartView(False, "A run is running.", "")  # one run at a time, whichever form


# ---- issue 16, item 9: empty path fields stay empty -----------------------------------------------------------------

def test_an_empty_path_field_stays_empty_on_a_real_parameter_node():
    node = slicer.vtkMRMLScriptedModuleNode()
    node.SetParameter("cacheFolder", path_text(""))
    assert path_text(node.GetParameter("cacheFolder")) == ""
    node.SetParameter("cacheFolder", str(Path()))  # what the Path serializer wrote for an empty path: "."
    assert path_text(node.GetParameter("cacheFolder")) == ""
    assert path_text("  /data/cache ") == "/data/cache" and path_text(Path("/data/cache")) == "/data/cache"


def test_no_path_field_goes_through_the_path_serializer():
    wrapper = next(n for n in module_tree().body
                   if isinstance(n, ast.ClassDef) and n.name == "MiMPretrainParameterNode")
    path_fields = [f.target.id for f in wrapper.body
                   if isinstance(f, ast.AnnAssign) and ast.unparse(f.annotation) == "Path"]
    assert path_fields == ["runsFolder"]  # a ctkDirectoryButton always shows a folder; unset reads as no folder


# ---- issue 16, item 8: the estimate is for the device the run will use ----------------------------------------------

def test_an_auto_run_on_a_machine_with_a_gpu_gets_no_invented_gpu_figure():
    auto = PretrainSettings(data=("d",), out="o", method="mim", preset="base", epochs=100)
    gpu, cpu = detected_device({"recommended": "cuda"}), detected_device({"recommended": "cpu"})

    assert estimate(auto, 10, gpu) == NO_GPU_ESTIMATE
    assert "×" not in NO_GPU_ESTIMATE and "no GPU estimate yet" in NO_GPU_ESTIMATE
    assert estimate(auto, 10, cpu).endswith(" on this CPU")
    assert estimate(auto, 10, detected_device(None)) == ""  # the device check has not answered
    forced_cpu = PretrainSettings(data=("d",), out="o", epochs=100, device="cpu")
    assert estimate(forced_cpu, 10, gpu).endswith(" on this CPU")
    forced_gpu = PretrainSettings(data=("d",), out="o", epochs=100, device="cuda")
    assert estimate(forced_gpu, 10, None) == NO_GPU_ESTIMATE
    assert estimate(auto, 0, gpu) == ""


# ---- issue 16, item 5: a live run's refresh leaves the layout to the user -------------------------------------------

@pytest.fixture
def plots_logic(scene):
    """Slicer's plots logic on the scene, with the layout node Slicer's layout manager adds."""
    logic = slicer.vtkSlicerPlotsLogic()
    logic.SetMRMLApplicationLogic(slicer.modules.colors.logic().GetMRMLApplicationLogic())
    logic.SetMRMLScene(scene)
    layout = scene.AddNode(slicer.vtkMRMLLayoutNode())
    layout.SetViewArrangement(slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView)
    return logic


def arrangement(scene) -> int:
    return scene.GetFirstNodeByClass("vtkMRMLLayoutNode").GetViewArrangement()


def active_chart(scene) -> str | None:
    return scene.GetFirstNodeByClass("vtkMRMLSelectionNode").GetActivePlotChartID()


def test_refreshes_do_not_take_the_user_back_to_the_plot_layout(scene, plots_logic):
    four_up = slicer.vtkMRMLLayoutNode.SlicerLayoutFourUpView
    with_plot = plots_logic.GetLayoutWithPlot(four_up)
    layout, snapshot = plots.ChartLayout(), running(series={"loss": ((1.0,), (0.9,))})
    layout.follow()

    loss = plots.update_run_charts(scene, snapshot)
    assert layout.show(plots_logic, loss)  # the run starts: its chart is shown
    assert (arrangement(scene), active_chart(scene)) == (with_plot, loss.GetID())

    scene.GetFirstNodeByClass("vtkMRMLLayoutNode").SetViewArrangement(four_up)  # the user leaves it
    snapshot = running(series={"loss": ((1.0, 2.0), (0.9, 0.8))})
    assert not layout.show(plots_logic, plots.update_run_charts(scene, snapshot))
    dice = plots.update_run_charts(scene, running(series={**snapshot.series, "dice/liver": ((1.0,), (0.4,))}))
    assert not layout.show(plots_logic, dice)
    assert arrangement(scene) == four_up

    layout.follow()  # the user attaches to the run again
    assert layout.show(plots_logic, dice)
    assert (arrangement(scene), active_chart(scene)) == (with_plot, dice.GetID())


def test_a_new_chart_replaces_the_shown_one_while_the_user_stays_in_the_plot_layout(scene, plots_logic):
    layout = plots.ChartLayout()
    loss = plots.update_run_charts(scene, running(series={"loss": ((1.0,), (0.9,))}))
    assert layout.show(plots_logic, loss)
    assert not layout.show(plots_logic, loss)  # the plot view redraws it by itself

    dice = plots.update_run_charts(scene, running(series={"loss": ((1.0,), (0.9,)), "dice/liver": ((1.0,), (0.4,)),
                                                          "mean_dice": ((1.0,), (0.4,))}))
    assert layout.show(plots_logic, dice) and active_chart(scene) == dice.GetID()
    assert sorted(plots._series_nodes(dice)) == ["liver", "mean"]
    assert plots.curve_values(dice, "liver") == ([1.0], [0.4])


def test_a_run_without_curves_has_no_chart(scene):
    assert plots.update_run_charts(scene, running()) is None


# ---- issue 15: "Use for segmentation" leaves the Segment module alone -----------------------------------------------

def test_registering_a_model_does_not_reach_into_the_segment_modules_widget():
    source = MODULE_FILE.read_text(encoding="utf-8")
    assert "slicer.modules.mimsegmentation" not in source  # its own widget, in its self-test only
    assert source.count("widgetRepresentation") == source.count("slicer.modules.mimpretrain.widgetRepresentation") == 1


# ---- issue 15/16: one default each; the worker's packages before Start; issue 18: encoder modes, installed models ---

def test_the_parameter_nodes_defaults_are_the_options_defaults():
    from mim3d.run_options import FinetuneOptions, PretrainOptions
    from MiMPretrainLib.training_settings import PANEL_DEFAULTS, default

    wrapper = next(n for n in module_tree().body
                   if isinstance(n, ast.ClassDef) and n.name == "MiMPretrainParameterNode")
    values = {f.target.id: ast.unparse(f.value) for f in wrapper.body if isinstance(f, ast.AnnAssign) and f.value}
    restated = {name: value for name, value in values.items() if not value.startswith("default(")}
    assert restated == {"dataSource": "DataSource.FOLDERS", "activeRun": "''"}, restated  # panel-only choices
    assert default(PretrainOptions, "epochs") == 800 and default(FinetuneOptions, "epochs") == 500
    assert default(FinetuneOptions, "encoder") == "full" and default(PretrainOptions, "amp") is PANEL_DEFAULTS["amp"]


def test_start_runs_only_once_the_packages_are_there_and_a_declined_install_cancels_quietly():
    from MiMPretrainLib.training_settings import start_after_install

    started = []
    assert start_after_install(lambda: False, lambda: started.append("run")) is None and started == []
    assert start_after_install(lambda: True, lambda: started.append("run") or "settings") == "settings"
    assert started == ["run"]

    def failed_install():
        raise RuntimeError("pip failed")

    with pytest.raises(RuntimeError, match="pip failed"):
        start_after_install(failed_install, lambda: started.append("again"))
    assert started == ["run"]
    source = MODULE_FILE.read_text(encoding="utf-8")
    assert source.count("start_after_install(self.installDependencies") == 2  # both Start buttons
    assert "MiMSegmentationLogic().installDependencies()" in source  # MiM Segmentation's install, not a copy


def test_the_encoder_mode_changes_the_estimate_and_needs_a_start(tmp_path):
    cpu = detected_device({"recommended": "cpu"})
    runs = {mode: FinetuneSettings(out=str(tmp_path / "o"), images="i", labels="l", epochs=100, encoder=mode,
                                   pretrained=str(tmp_path)) for mode in ("full", "frozen", "gradual")}
    from MiMPretrainLib.training_settings import _finetune_steps

    seconds = {mode: _finetune_steps(s, 10)[1] for mode, s in runs.items()}
    assert seconds["frozen"] < seconds["gradual"] < seconds["full"]
    assert all(estimate(s, 10, cpu).endswith(" on this CPU") for s in runs.values())
    frozen = FinetuneSettings(out=str(tmp_path / "o"), images="i", labels="l", encoder="frozen")
    assert "needs a pre-trained encoder or model" in " ".join(frozen._pretrained_problems())


def test_installed_models_are_offered_as_starts_and_a_package_is_a_valid_start(tmp_path):
    import torch

    from mim3d.models import build_segmenter
    from mim3d.package import ModelInfo, save_package
    from MiMPretrainLib.training_settings import installed_models

    torch.manual_seed(0)
    model = build_segmenter("mim-unetr", 2, "small", (64, 64, 32), embed_dims=[6, 12, 24, 48], depths=[1, 1, 1, 1],
                            num_heads=4)
    table = LabelTable.from_dict({"labels": [{"value": 1, "name": "liver"}]})
    info = ModelInfo(name="liver", version="1.0.0", architecture={"arch": "mim-unetr", "preset": "small",
                     "config": {}, "num_classes": 2, "in_channels": 1}, preprocessing={},
                     inference={"roi_size": [64, 64, 32]}, labels=table, weights_sha256="")
    save_package(tmp_path / "home" / "liver", model, info)
    (tmp_path / "home" / "broken").mkdir()
    assert installed_models(tmp_path / "home") == [("liver (liver)", str(tmp_path / "home" / "liver"))]
    start = FinetuneSettings(out=str(tmp_path / "o"), images="i", labels="l", pretrained=str(tmp_path / "home" /
                                                                                             "liver"))
    assert start._pretrained_problems() == []


# ---- issue 18, "In the panel": the memory estimate, from the worker's plan -------------------------------------------

def plan_result(budget_bytes: int, estimate: StepFootprint, checkpointing: bool, would_fit: str | None = None) -> dict:
    """The result event `--check-plan` prints (mim3d.training.plans.report_plan) for a plan or a refusal."""
    plan = TrainingPlan(memory.Budget(budget_bytes, "RAM available"), estimate, checkpointing)
    out = io.StringIO()

    def make_plan(budget):
        if would_fit is None:
            return plan
        raise PlanRefused("not enough memory ...", plan, would_fit)

    with contextlib.suppress(PlanRefused):
        report_plan(make_plan, torch.device("cpu"), Emitter(out))
    return parse_line(out.getvalue())


def test_the_memory_line_says_whether_the_run_fits_how_and_what_would_fit():
    step = StepFootprint(weights=10**8, trained=10**8, activations=5 * 10**9)  # 5.4 GB in all
    assert summarize_plan(plan_result(12 * 10**9, step, False), None) == (
        "Memory (cpu): about 5.4 GB of 12.0 GB (RAM available): fits")
    assert summarize_plan(plan_result(6 * 10**9, step, True), None) == (
        "Memory (cpu): about 5.4 GB of 6.0 GB (RAM available): fits with activation checkpointing (about a third more "
        "time per step)")
    hint = "--samples-per-volume 2 would fit; or, keeping every other option, --encoder frozen fits"
    refused = plan_result(4 * 10**9, step, True, hint)
    assert summarize_plan(refused, {"type": "error", "message": "not enough memory ..."}) == (
        f"Memory (cpu): will not fit, needs about 5.4 GB of 4.0 GB (RAM available): {hint}")
    assert summarize_plan(None, {"type": "error", "message": "labels.json: not a label table"}) == (
        "Memory: no estimate (labels.json: not a label table)")
    assert summarize_plan(None, None, "The worker exited with code 1") == (
        "Memory: no estimate (The worker exited with code 1)")


def test_the_memory_line_waits_for_the_plan_of_the_latest_settings(tmp_path):
    later = []
    check = LatestCheck(lambda ms, fn: later.append(fn), lambda outcome: None)
    assert memory_estimate(check) == ""  # nothing to plan
    settings = finetune_settings(tmp_path, dataset=str(tmp_path))
    assert plan_args(settings) is None  # a form with problems is not planned (the dataset is not a file)
    (tmp_path / "dataset.json").write_text("{}", encoding="utf-8")
    settings = finetune_settings(tmp_path, dataset=str(tmp_path / "dataset.json"), encoder="full")
    with_torch = {"torch": "2.13.0", "recommended": "cpu"}
    assert plan_request(settings, [], None) is None  # `mim3d devices` has not answered yet
    assert plan_request(settings, [], {"torch": None, "recommended": "cpu"}) is None  # the packages are not installed
    assert plan_request(settings, ["Choose a folder for the new run."], with_torch) is None
    check.request(settings.COMMAND, plan_request(settings, [], with_torch))
    assert check.wanted[3:] == ["finetune", *settings.to_args(), "--check-plan"]  # after python -m mim3d
    assert memory_estimate(check) == "Memory: estimating..." and len(later) == 1  # the debounce, not a worker yet
    check.request(settings.COMMAND, None)
    assert memory_estimate(check) == ""


def test_the_module_shows_the_plan_of_the_shown_form_under_its_time_estimate():
    source = MODULE_FILE.read_text(encoding="utf-8")
    assert "self.planCheck.request(settings.COMMAND, plan_request(settings, problems, self.devices))" in source
    assert "memory_estimate(self.planCheck) if shown else" in source
    assert 'self.previewCheck.request("pretrain", preview_args(folders)' in source  # one machinery for both checks
