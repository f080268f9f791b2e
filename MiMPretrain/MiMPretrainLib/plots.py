"""Live training curves as a Slicer plot chart (MRML table + plot series nodes). Qt-free: runs on slicer-core.

One chart per run; one series per curve (e.g. "loss", "dice liver"), each backed by its own two-column table node,
because curves have different x values (training steps vs validation epochs). Updating replaces the table columns
in place, so the plot view shown in Slicer's layout refreshes without new nodes.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

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
