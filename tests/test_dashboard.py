"""The live dashboard (issue 20): its widget driven from a background thread while tasks run, closing,
``%unload_ext``, coalescing under a burst, the fallback without ipywidgets, ``python -m gpuctx top``,
and the progress bars of loads, restores and waits."""

from __future__ import annotations

import sys
import threading
import time

import pytest
from IPython.core.interactiveshell import InteractiveShell

import gpuctx
from gpuctx import panel
from gpuctx.__main__ import main
from gpuctx.device.cpu import CpuDevice
from gpuctx.trace import LoadBars

from dash_helpers import TIMEOUT, count_sends, model_line, wait_for


@pytest.fixture
def board(fresh, dashboards):
    return dashboards


def test_the_widget_follows_running_queued_and_finished_tasks_from_its_own_thread(board, gate):
    opened = gate()
    gpuctx.model("a", vram="2GB", pin=True)(lambda: "A")
    gpuctx.model("b", vram="3GB")(lambda: "B")
    slow = gpuctx.gpu_task(model="a")(lambda: opened.wait(TIMEOUT) and 1)
    quick = gpuctx.gpu_task(model="b")(lambda: 2)
    d = board(interval=0.02, window=5)
    assert d.running and d.widget.value   # the first frame is there before the cell returns
    tasks = [slow() for _ in range(3)] + [quick()]
    # the refreshing thread (not this one) shows a running, two queued, b done and resident
    wait_for(d, lambda p: (a := model_line(p, "a")) is not None and a.running == 1 and a.queued == 2
             and a.oldest_wait is not None and p.done >= 1 and model_line(p, "b").state == "resident"
             and p.lanes and ("run", "a") in p.lanes[0].cells)   # a's task drawn running, up to now
    a = model_line(d, "a")
    assert a.pinned and a.state == "resident" and a.used == 2 * gpuctx.GB and a.qos == "burstable"
    assert d.panel.committed == 5 * gpuctx.GB and d.panel.budget == 10 * gpuctx.GB
    assert {x.model for x in d.panel.loads if x.done} == {"a", "b"}
    assert [lane.context for lane in d.panel.lanes] == ["a", "b"]
    assert d.panel.lanes[0].cells[-1] == ("run", "a")
    html = d.widget.value
    assert "gpuctx-bar" in html and "<svg" in html and "oldest" in html and "this kernel only" in html
    opened.set()
    gpuctx.wait(tasks, timeout=TIMEOUT)
    wait_for(d, lambda p: p.done == 4 and p.live == 0 and model_line(p, "a").queued == 0)
    assert model_line(d, "a").oldest_wait is None and model_line(d, "a").running == 0


def test_closing_the_widget_stops_the_thread_and_nothing_is_sent_after(board):
    gpuctx.model("m", vram="1GB")(lambda: "M")
    d = board(interval=0.01)
    sent = count_sends(d)
    f = gpuctx.gpu_task(model="m")(lambda: 1)
    f().result(TIMEOUT)
    wait_for(d, lambda p: p.done == 1)
    thread = d._thread
    d.widget.close()             # closed from the frontend's side: the comm goes away
    thread.join(TIMEOUT)
    assert not thread.is_alive() and not d.running
    before = len(sent)
    gpuctx.wait([f() for _ in range(5)], timeout=TIMEOUT)
    assert d.refresh() is False and len(sent) == before
    d.close()                    # a second close is harmless
    assert panel.close_all() == 0


def test_no_update_is_sent_after_unload_ext(fresh):
    pytest.importorskip("ipywidgets")
    shell = InteractiveShell.instance()
    shell.run_cell("%load_ext gpuctx")
    gpuctx.configure(device="cpu", budget="10GB", safety_factor=1.0)
    gpuctx.model("m", vram="1GB")(lambda: "M")
    res = shell.run_cell("%gpuctx dashboard")
    assert res.error_in_exec is None and res.error_before_exec is None
    d = res.result
    assert isinstance(d, panel.Dashboard) and d.running
    d.interval = 0.01
    sent = count_sends(d)
    gpuctx.gpu_task(model="m")(lambda: 1)().result(TIMEOUT)
    wait_for(d, lambda p: p.done == 1)
    assert sent
    thread = d._thread
    shell.run_cell("%unload_ext gpuctx")
    assert not thread.is_alive()          # unload returned only once the thread had ended
    after = len(sent)
    gpuctx.configure(device="cpu", budget="10GB")
    gpuctx.model("m", vram="1GB")(lambda: "M")
    gpuctx.wait([gpuctx.gpu_task(model="m")(lambda: 2)() for _ in range(20)], timeout=TIMEOUT)
    assert len(sent) == after and d.widget.comm is None
    assert "gpuctx" not in shell.magics_manager.magics["line"]


def test_a_task_that_ends_while_the_panel_reads_is_never_counted_both_done_and_live(fresh, gate, monkeypatch):
    # The panel reads the ended counts, then the status. A task that ends between the two reads is
    # then live in the status and not yet done: never both, which read the other way round showed
    # as "10000 done" with tasks still live. The task is made to end exactly after the status read.
    opened, started = gate(), threading.Event()
    gpuctx.model("m", vram="1GB")(lambda: "M")
    task = gpuctx.gpu_task(model="m")(lambda: started.set() or opened.wait(TIMEOUT))()
    assert started.wait(TIMEOUT)
    real = panel.Status.of

    def status_then_end(sched):
        st = real(sched)
        opened.set()
        task.result(TIMEOUT)   # resolved after the engine counted it ended
        return st

    monkeypatch.setattr(panel.Status, "of", status_then_end)
    p = panel.Panel.of(gpuctx.scheduler())
    assert task.done() and p.live + p.done + p.failed <= 1, (p.live, p.done)


def test_a_10000_task_burst_is_coalesced_to_a_few_updates_per_second(board):
    gpuctx.model("m", vram="1GB")(lambda: "M")
    f = gpuctx.gpu_task(model="m")(lambda i: i)
    d = board(interval=0.1, window=10)
    sent = count_sends(d)
    t0 = time.perf_counter()
    tasks = [f(i) for i in range(10_000)]
    gpuctx.wait(tasks, timeout=60)
    wait_for(d, lambda p: p.done == 10_000)
    d.close()
    elapsed = time.perf_counter() - t0
    assert all(t.exception(0) is None for t in tasks)
    # one message per refresh at most, a refresh every 0.1 s: far fewer than the 30,000 task events
    assert 1 <= len(sent) <= elapsed / 0.1 + 2, (len(sent), elapsed)
    assert d.updates == len(sent)
    assert "10000 done" in d.widget.value and d.panel.live == 0


def test_text_and_html_are_drawn_from_one_panel_with_evictions_loads_and_peers(fresh):
    gpuctx.configure(budget="5GB")
    for name in ("big", "other"):
        gpuctx.model(name, vram="3GB")(lambda name=name: name.upper())
    for name in ("big", "other", "big"):
        gpuctx.gpu_task(model=name)(lambda: 1)().result(TIMEOUT)
    p = panel.Panel.of(gpuctx.scheduler(), window=60)
    assert [e.model for e in p.evictions] == ["other", "big"]   # newest first
    assert "room for 'big'" in p.evictions[0].reason
    assert [x.model for x in p.loads] == ["big", "other", "big"] and all(x.done for x in p.loads)
    text, html = panel.render_text(p, width=90), panel.render_html(p)
    for piece in ("budget 5 GB", "used 3 GB", "unload other 3 GB: room for 'big'", "load big: 3 GB in"):
        assert piece in text, piece
        assert piece.replace("'", "&#x27;") in html, piece
    assert "GB/s" in text and "GB/s" in html
    bar = text.splitlines()[2]
    assert bar.startswith("[") and bar.count("#") == round(88 * 3 / 5) and bar.count(".") == 88 - round(88 * 3 / 5)
    assert p.peers is None and "this kernel only" in text

    from gpuctx.status import KernelRow
    from gpuctx.units import GB, MB

    class Shared:   # a status that a shared budget has extended
        share = "lab"
        others = (KernelRow(4711, "train.ipynb", 2 * GB, (("qwen3", 2 * GB),), 3, 0),
                  KernelRow(4712, None, 1 * GB, (("clap", 1 * GB),), 0, 512 * MB))
    rows = panel._peers(Shared())
    assert rows == ("share 'lab': 2 other kernel(s)", "train.ipynb: qwen3 2 GB (2 GB), 3 queued",
                    "pid 4712: clap 1 GB (1 GB), 0 queued, waits for 512 MB")
    shared = panel.Panel(**{**p.__dict__, "peers": rows})
    assert "train.ipynb: qwen3 2 GB (2 GB), 3 queued" in panel.render_text(shared)
    assert "pid 4712: clap 1 GB" in panel.render_html(shared)


def test_top_once_prints_one_frame_of_this_processes_scheduler(fresh, capsys):
    gpuctx.model("whisper", vram="4.5GB")(lambda: "W")
    gpuctx.gpu_task(model="whisper")(lambda: 1)().result(TIMEOUT)
    assert main(["top", "--once", "--window", "5"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("gpuctx on cpu: budget 10 GB, used 4.5 GB") and "tasks: 0 live" in out and "\x1b[" not in out
    assert "  whisper  resident  4.5 GB" in out and "load whisper: 4.5 GB" in out and "timeline, last 5 s" in out
    gpuctx.shutdown()
    assert main(["top", "--once"]) == 0
    assert "no scheduler running yet" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["top", "--interval", "0"])
    assert "expected seconds above 0" in capsys.readouterr().err


def test_without_ipywidgets_the_dashboard_is_the_status_with_a_note(fresh, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "ipywidgets", None)   # import ipywidgets raises ImportError
    shown = gpuctx.dashboard()
    assert isinstance(shown, gpuctx.api._status.Status) and "<table>" in shown._repr_html_()
    assert capsys.readouterr().out.strip() == panel._NOTE
    for bad in ({"interval": 0}, {"window": -1}, {"interval": "fast"}):
        with pytest.raises(gpuctx.ConfigError, match=f"{next(iter(bad))}="):
            gpuctx.dashboard(**bad)


class _Bar:
    """tqdm's interface as LoadBars uses it; records what was drawn and on which thread's terms."""

    made: list["_Bar"] = []

    def __init__(self, total=None, desc="", **kw):
        self.total, self.desc, self.kw, self.n, self.closed, self.postfix = total, desc, kw, 0, False, ""
        # Not under the engine's lock: another thread can read the scheduler meanwhile.
        reader = threading.Thread(target=gpuctx.scheduler().view)
        reader.start()
        reader.join(TIMEOUT)
        self.lock_free = not reader.is_alive()
        _Bar.made.append(self)

    def update(self, n):
        self.n += n

    def set_postfix_str(self, s):
        self.postfix = s

    def close(self):
        self.closed = True


@pytest.fixture
def bars(monkeypatch):
    import tqdm.auto

    _Bar.made = []
    monkeypatch.setattr(tqdm.auto, "tqdm", _Bar)
    return _Bar.made


def test_loads_and_restores_show_byte_bars_outside_the_lock_when_progress_is_on(fresh, bars, monkeypatch):
    monkeypatch.setattr(CpuDevice, "can_offload", lambda self, obj: True)   # evictions offload, loads restore
    gpuctx.model("m", vram="2GB")(lambda: "M")
    run = gpuctx.gpu_task(model="m")(lambda: 1)
    run().result(TIMEOUT)
    assert bars == []                                   # progress is off by default
    gpuctx.configure(progress=True)
    gpuctx.evict("m")
    run().result(TIMEOUT)                               # a restore from host RAM
    gpuctx.model("n", vram="1GB")(lambda: "N")
    gpuctx.gpu_task(model="n")(lambda: 1)().result(TIMEOUT)   # a load
    assert [(b.desc, b.total, b.n, b.closed) for b in bars] == [
        ("gpuctx restore m", 2 * gpuctx.GB, 2 * gpuctx.GB, True), ("gpuctx load n", gpuctx.GB, gpuctx.GB, True)]
    assert all(b.lock_free and b.kw["unit"] == "B" for b in bars)
    kinds = [(x.kind, x.model) for x in panel.Panel.of(gpuctx.scheduler()).loads]
    assert kinds == [("load", "n"), ("restore", "m"), ("load", "m")]


def test_a_failed_load_closes_its_bar_marked_failed(bars):
    listener = LoadBars(lambda: True)
    listener("start", "load", "m", 100, None)
    listener("failed", "load", "m", 100, 0.5)
    listener("end", "load", "never-started", 5, 0.1)    # a bar that was never opened: nothing happens
    assert [(b.desc, b.postfix, b.closed, b.n) for b in bars] == [("gpuctx load m", "failed", True, 0)]
    LoadBars(lambda: False)("start", "load", "m", 100, None)
    assert len(bars) == 1


def test_a_long_wait_shows_a_task_bar_when_progress_is_on(fresh, capsys):
    gpuctx.configure(progress=True)
    f = gpuctx.gpu_task(model="m", vram="1GB")(lambda x: x)
    gpuctx.wait([f(i) for i in range(7)], timeout=TIMEOUT)
    assert "7/7" in capsys.readouterr().err


def test_a_task_cancelled_before_it_started_is_not_drawn_as_a_run(fresh, gate):
    opened, started = gate(), gate()
    blocker = gpuctx.gpu_task(model="a", vram="1GB")(lambda: started.set() or opened.wait(TIMEOUT))()
    assert started.wait(TIMEOUT)
    later = gpuctx.gpu_task(model="c", vram="1GB")(lambda: 1).options(after=[blocker])()
    assert later.cancel()
    lanes = {lane.context: lane for lane in panel.Panel.of(gpuctx.scheduler(), window=60).lanes}
    assert "c" not in lanes and ("run", "a") in lanes["a"].cells
    opened.set()
    blocker.result(TIMEOUT)
