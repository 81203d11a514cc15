"""The PNG report shows bits per site: the panel's data carries each site's bit width and the drawn
axis labels the bars with it."""

from __future__ import annotations

from pathlib import Path

import pytest

from kronc.formats import DenseSpec, LowRankSpec, QuantLowRankSpec
from kronc.plan import Decision, Plan
from kronc.tools.report import Run, _site_panel, site_panel_data, write_report
from kronc.values import Precision

plt = pytest.importorskip("matplotlib.pyplot")


def _decision(name: str, spec, after: int) -> Decision:  # type: ignore[no-untyped-def]
    return Decision(site=name, shape=(64, 64), spec=spec, bytes_before=64 * 64 * 4, bytes_after=after,
                    params_after=64 * 64, error=0.01)


def _run() -> Run:
    int4 = Precision(dtype="int4", group_size=32)
    plan = Plan(decisions=[
        _decision("a.weight", DenseSpec(), 64 * 64 * 4),
        _decision("b.weight", DenseSpec(precision=int4), int4.nbytes((64, 64))),
        _decision("c.weight", DenseSpec(precision=Precision(dtype="int8")), Precision(dtype="int8").nbytes((64, 64))),
        _decision("d.weight", LowRankSpec(rank=4), 4 * 128 * 4),
        _decision("e.weight", QuantLowRankSpec(base=Precision(dtype="int3", group_size=64), rank=4), 3000),
    ], budget="4x")
    return Run("4x", plan)


def test_site_panel_data_has_bits_per_site() -> None:
    data = site_panel_data(_run())
    assert [row["bits"] for row in data] == [32.0, 4.0, 8.0, 32.0, 3.0]
    assert [row["values"] for row in data][:3] == ["keep", "int4g32", "int8"]


def test_site_panel_labels_bars_with_bits(tmp_path: Path) -> None:
    fig, ax = plt.subplots()
    try:
        _site_panel(ax, _run())
        labels = [t.get_text() for t in ax.texts]
        assert labels == ["32", "4", "8", "32", "3"]
        legend = [t.get_text() for t in ax.get_legend().get_texts()]
        assert any(t.startswith("bits/value: 3 (1), 4 (1), 8 (1), 32 (2)") for t in legend), legend
    finally:
        plt.close(fig)
    out = write_report([_run()], tmp_path / "r.png")
    assert out.read_bytes()[:4] == b"\x89PNG"
