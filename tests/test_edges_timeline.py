"""Issue 14, entry 22: the timeline figure is shown once, keeps models resident at the end,
draws into a given ``ax`` and keeps its legend off the bars."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import pytest  # noqa: E402

import gpuctx  # noqa: E402
from gpuctx.trace import Trace, timeline  # noqa: E402


def _trace() -> Trace:
    tr = Trace()
    r = tr.record
    r("load_start", model="a", t=0.0)
    r("load_end", model="a", nbytes=4 * 10**9, duration=1.0, vram=4 * 10**9, t=1.0)
    r("load_start", model="b", t=1.0)
    r("load_end", model="b", nbytes=2 * 10**9, duration=1.0, vram=6 * 10**9, t=2.0)
    for i, (m, s) in enumerate([("a", 2.0), ("b", 4.0), ("a", 6.0)]):
        r("submit", task=i, model=m, t=0.0)
        r("start", task=i, model=m, context=m, t=s)
        r("end", task=i, model=m, context=m, t=s + 2.0)
    r("unload", model="b", nbytes=2 * 10**9, vram=4 * 10**9, t=7.0)
    r("group_start", model="a", t=9.0)   # the trace goes on to t=9 with "a" still resident
    return tr


def test_the_returned_figure_is_not_also_left_open_for_pyplot_to_show():
    before = set(plt.get_fignums())
    fig = timeline(_trace())
    assert set(plt.get_fignums()) == before   # closed: Jupyter shows the returned figure once
    assert fig.axes and fig.canvas is not None


def test_the_api_and_the_magic_show_it_once(fresh):
    f = gpuctx.gpu_task(model="m", vram="1GB")(lambda: 1)
    f().result(10)
    before = set(plt.get_fignums())
    fig = gpuctx.timeline()
    assert set(plt.get_fignums()) == before and fig.axes


def _vram_extent(ax) -> tuple[float, float]:
    xs, ys = [], []
    for coll in ax.collections:
        for path in coll.get_paths():
            v = path.vertices
            xs.extend(v[:, 0])
            ys.extend(v[:, 1])
    return max(xs), max(ys)


def test_the_vram_panel_keeps_models_resident_at_the_end():
    fig = timeline(_trace())
    bottom = fig.axes[1]
    # the stacks reach the end of the trace (t=9), not only the last load/unload (t=7)
    xmax, _ = _vram_extent(bottom)
    assert xmax == pytest.approx(9.0)
    # "a" (4 GB) is drawn between the unload of b and the end
    ys_at_end = []
    for coll in bottom.collections:
        for path in coll.get_paths():
            for x, y in path.vertices:
                if 7.5 < x <= 9.0:
                    ys_at_end.append(y)
    assert max(ys_at_end) == pytest.approx(4.0)


def test_ax_is_honoured():
    fig, ax = plt.subplots()
    try:
        out = timeline(_trace(), ax=ax)
        assert out is fig
        assert ax.collections, "the task bars are drawn into the given axes"
        assert [t.get_text() for t in ax.get_yticklabels()] == ["a", "b"]
        assert len(fig.axes) == 1
    finally:
        plt.close(fig)


def test_ax_pair_draws_tasks_and_vram():
    fig, (top, bottom) = plt.subplots(2, 1)
    try:
        assert timeline(_trace(), ax=(top, bottom), budget=8 * 10**9) is fig
        assert top.collections and bottom.collections
    finally:
        plt.close(fig)


def test_the_legend_does_not_cover_the_bars():
    fig = timeline(_trace(), budget=8 * 10**9)
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    canvas = FigureCanvasAgg(fig)   # the figure is closed for pyplot: give it a canvas to draw on
    canvas.draw()
    renderer = canvas.get_renderer()
    for ax in fig.axes:
        leg = ax.get_legend()
        if leg is None:
            continue
        box, area = leg.get_window_extent(renderer), ax.get_window_extent(renderer)
        assert box.x0 >= area.x1 - 1, "legend is outside the plotting area"
