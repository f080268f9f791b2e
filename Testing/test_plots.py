"""Training curves as Slicer plot charts, on real MRML from slicer-core."""

from __future__ import annotations

import pytest
import slicer

from MiMPretrainLib import plots


@pytest.fixture
def scene():
    return slicer.vtkMRMLScene()


def test_a_chart_gets_one_series_per_curve_with_its_own_x_values(scene):
    chart = plots.update_chart(scene, "/runs/a", "run a", {"loss": ([1, 2, 3], [0.9, 0.7, 0.6]),
                                                            "dice liver": ([1], [0.4])}, x_title="step")
    assert chart.GetNumberOfPlotSeriesNodes() == 2
    assert plots.curve_values(chart, "loss") == ([1.0, 2.0, 3.0], [0.9, 0.7, 0.6])
    assert plots.curve_values(chart, "dice liver") == ([1.0], [0.4])
    assert chart.GetXAxisTitle() == "step"
    series = chart.GetNthPlotSeriesNode(0)
    assert series.GetXColumnName() == "step" and series.GetYColumnName() == "value"
    assert series.GetPlotType() == slicer.vtkMRMLPlotSeriesNode.PlotTypeScatter


def test_updating_refills_the_same_nodes_and_adds_new_curves(scene):
    chart = plots.update_chart(scene, "/runs/a", "run a", {"loss": ([1], [0.9])})
    before = scene.GetNumberOfNodes()
    again = plots.update_chart(scene, "/runs/a", "run a", {"loss": ([1, 2], [0.9, 0.5])})
    assert again.GetID() == chart.GetID() and scene.GetNumberOfNodes() == before
    assert plots.curve_values(chart, "loss") == ([1.0, 2.0], [0.9, 0.5])
    plots.update_chart(scene, "/runs/a", "run a", {"dice": ([1], [0.3])})
    assert chart.GetNumberOfPlotSeriesNodes() == 2 and plots.curve_values(chart, "loss")[1] == [0.9, 0.5]


def test_each_run_has_its_own_chart_and_mismatched_curves_are_refused(scene):
    a = plots.update_chart(scene, "/runs/a", "a", {"loss": ([1], [1.0])})
    b = plots.update_chart(scene, "/runs/b", "b", {"loss": ([1], [2.0])})
    assert a.GetID() != b.GetID() and plots.find_chart(scene, "/runs/b").GetID() == b.GetID()
    with pytest.raises(ValueError, match="'loss': 2 x values but 1 y values"):
        plots.update_chart(scene, "/runs/a", "a", {"loss": ([1, 2], [1.0])})
