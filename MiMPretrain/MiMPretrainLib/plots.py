"""Live training curves as a Slicer plot chart (MRML table + plot series nodes). Qt-free: runs on slicer-core.

One chart per run and kind (loss per step, validation Dice per epoch); one series per curve (e.g. "loss", "liver"),
each backed by its own two-column table node, because curves have different x values. Updating replaces the table
columns in place, so the plot view shown in Slicer's layout refreshes without new nodes. `ChartLayout` decides when
a chart goes into the layout, so that a refresh never takes the layout away from the user.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import slicer
import vtk

RUN_ATTRIBUTE = "MiM.RunFolder"
CURVE_ATTRIBUTE = "MiM.Curve"


def _series_nodes(chart) -> dict[str, object]:
    nodes = {}
    for i in range(chart.GetNumberOfPlotSeriesNodes()):
        node = chart.GetNthPlotSeriesNode(i)
        if node is not None and node.GetAttribute(CURVE_ATTRIBUTE):
            nodes[node.GetAttribute(CURVE_ATTRIBUTE)] = node
    return nodes


def _fill_table(table, x_name: str, xs: Sequence[float], ys: Sequence[float]) -> None:
    columns = []
    for name, values in ((x_name, xs), ("value", ys)):
        array = vtk.vtkDoubleArray()
        array.SetName(name)
        array.SetNumberOfValues(len(values))
        for i, v in enumerate(values):
            array.SetValue(i, float(v))
        columns.append(array)
    vtk_table = table.GetTable()
    vtk_table.Initialize()
    for array in columns:
        vtk_table.AddColumn(array)
    table.Modified()


def find_chart(scene, run_folder: str):
    """The chart node already made for ``run_folder``, or None."""
    charts = scene.GetNodesByClass("vtkMRMLPlotChartNode")
    for i in range(charts.GetNumberOfItems()):
        chart = charts.GetItemAsObject(i)
        if chart.GetAttribute(RUN_ATTRIBUTE) == str(run_folder):
            return chart
    return None


def update_chart(scene, run_folder: str, title: str, curves: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                 x_title: str = "step", y_title: str = "value"):
    """Create or update the chart of ``run_folder``: one line per curve name, (xs, ys) each. Returns the chart node.

    Curves that disappear from ``curves`` are left as they are (a run only ever adds curves).
    """
    chart = find_chart(scene, run_folder)
    if chart is None:
        chart = scene.AddNewNodeByClass("vtkMRMLPlotChartNode", title)
        chart.SetAttribute(RUN_ATTRIBUTE, str(run_folder))
    chart.SetTitle(title)
    chart.SetXAxisTitle(x_title)
    chart.SetYAxisTitle(y_title)
    existing = _series_nodes(chart)
    for name, (xs, ys) in curves.items():
        if len(xs) != len(ys):
            raise ValueError(f"curve '{name}': {len(xs)} x values but {len(ys)} y values")
        series = existing.get(name)
        if series is None:
            table = scene.AddNewNodeByClass("vtkMRMLTableNode", f"{title} {name}")
            series = scene.AddNewNodeByClass("vtkMRMLPlotSeriesNode", name)
            series.SetAttribute(CURVE_ATTRIBUTE, name)
            series.SetAndObserveTableNodeID(table.GetID())
            series.SetXColumnName(x_title)
            series.SetYColumnName("value")
            series.SetPlotType(slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter)
            series.SetMarkerStyle(slicer.vtkMRMLPlotSeriesNode.MarkerStyleNone)
            chart.AddAndObservePlotSeriesNodeID(series.GetID())
        _fill_table(series.GetTableNode(), x_title, xs, ys)
    return chart


def curve_values(chart, name: str) -> tuple[list[float], list[float]]:
    """(xs, ys) of one curve of a chart, read back from its table (for tests and self-tests)."""
    series = _series_nodes(chart)[name]
    table = series.GetTableNode().GetTable()
    xs, ys = table.GetColumn(0), table.GetColumn(1)
    return ([xs.GetValue(i) for i in range(xs.GetNumberOfValues())],
            [ys.GetValue(i) for i in range(ys.GetNumberOfValues())])


def update_run_charts(scene, snapshot):
    """The charts of a run (a training_runs.RunSnapshot): its losses against the step and, for fine-tuning, the
    validation Dice of each label and their mean against the epoch. Returns the chart that matters most (Dice when
    there is one), or None before the run has logged anything."""
    name = Path(snapshot.run_dir).name
    losses = {k: v for k, v in snapshot.series.items() if not k.startswith("dice/") and k != "mean_dice"}
    dice = {k.removeprefix("dice/"): v for k, v in snapshot.series.items() if k.startswith("dice/")}
    if "mean_dice" in snapshot.series:
        dice["mean"] = snapshot.series["mean_dice"]
    shown = None
    if losses:
        shown = update_chart(scene, f"{snapshot.run_dir}#loss", f"{name}: loss", losses, x_title="step",
                             y_title="loss")
    if dice:
        shown = update_chart(scene, f"{snapshot.run_dir}#dice", f"{name}: validation Dice", dice, x_title="epoch",
                             y_title="Dice")
    return shown


class ChartLayout:
    """When a run's chart is put in Slicer's layout (``vtkSlicerPlotsLogic.ShowChartInLayout`` switches to a layout
    with a plot view and shows the chart there).

    Once each time the panel starts following a run (`follow`: start, resume, attach), and afterwards only for a new
    chart (Dice after the first validation) while the layout is still the one it was put in. The refreshes between
    change nothing: the plot view redraws the chart it shows, and a user who chose another layout keeps it.
    """

    def __init__(self):
        self._shown: tuple[str, int | None] | None = None  # (chart ID, view arrangement) last put in the layout

    def follow(self) -> None:
        """The panel follows a run anew: its next chart goes into the layout."""
        self._shown = None

    def show(self, plots_logic, chart) -> bool:
        """Put `chart` in the layout if it is time to (class docstring); whether it was."""
        if self._shown is not None:
            chart_id, arrangement = self._shown
            if chart.GetID() == chart_id or _arrangement(plots_logic.GetMRMLScene()) != arrangement:
                return False
        plots_logic.ShowChartInLayout(chart)
        self._shown = (chart.GetID(), _arrangement(plots_logic.GetMRMLScene()))
        return True


def _arrangement(scene) -> int | None:
    layout = scene.GetFirstNodeByClass("vtkMRMLLayoutNode")
    return layout.GetViewArrangement() if layout is not None else None
