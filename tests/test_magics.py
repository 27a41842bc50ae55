"""The magics, driven in-process through an IPython InteractiveShell."""

from __future__ import annotations

import threading

import pytest
from IPython.core.error import UsageError
from IPython.core.interactiveshell import InteractiveShell

import gpuctx

TIMEOUT = 10


@pytest.fixture
def ip(fresh):
    shell = InteractiveShell.instance()
    shell.run_cell("%load_ext gpuctx")
    gpuctx.configure(device="cpu", budget="10GB", safety_factor=1.0)
    for name in ("m", "busy"):   # a cell without --vram names a known model (issue 14, entry 20)
        gpuctx.model(name, vram="1GB")(lambda: None)
    shell.user_ns["gpuctx"] = gpuctx
    yield shell
    shell.run_cell("%unload_ext gpuctx")


def run(shell, code):
    res = shell.run_cell(code)
    return res


def gpuctx_threads():
    return {t.name for t in threading.enumerate() if t.name.startswith("gpuctx-") and t.is_alive()}


def test_foreground_cell_runs_with_the_model_and_returns_the_last_expression(ip):
    gpuctx.model("whisper", vram="4.5GB")(lambda: {"name": "whisper"})
    res = run(ip, "%%gpuctx whisper --priority 2\nm = gpuctx.current_model()\nm['name'] + '!'")
    assert res.error_in_exec is None and res.result == "whisper!"
    assert gpuctx.scheduler().slot("whisper").loads == 1
    assert gpuctx.stats()["models"]["whisper"]["tasks"] == 1


def test_top_level_await_in_a_foreground_cell(ip):
    res = run(ip, "%%gpuctx m --vram 1GB\nimport asyncio\nawait asyncio.sleep(0)\n41 + 1")
    assert res.error_in_exec is None and res.result == 42


def test_cell_exception_is_a_normal_error_and_the_scheduler_goes_on(ip):
    res = run(ip, "%%gpuctx m\nraise ValueError('in the cell')")
    assert isinstance(res.error_in_exec, ValueError)
    assert run(ip, "%%gpuctx m\n'again'").result == "again"
    assert gpuctx.scheduler().tasks() == []     # both sessions ended


def test_background_cell_binds_a_task(ip):
    res = run(ip, "%%gpuctx m --background --name job\nresult = 6 * 7")
    assert res.error_in_exec is None
    task = ip.user_ns["job"]
    assert isinstance(task, gpuctx.Task) and task.result(TIMEOUT) == 42
    res = run(ip, "%%gpuctx m --after job\n'after'")
    assert res.result == "after"


@pytest.mark.parametrize("cell, message", [
    ("%%gpuctx m --bogus\n1", "unrecognized"),
    ("%%gpuctx\n1", "expected exactly one MODEL"),
    ("%%gpuctx m --vram 4.5XB\n1", "--vram='4.5XB'"),
    ("%%gpuctx m --after nothing_here\n1", "no variable 'nothing_here'"),
    ("%%gpuctx m --after x\n1", "'x' is a int, expected a gpuctx.Task"),
    ("%%gpuctx m --background\n1", "needs --name"),
])
def test_bad_cell_input_is_a_usage_error(ip, cell, message):
    ip.user_ns["x"] = 5
    res = run(ip, cell)
    err = res.error_in_exec or res.error_before_exec
    assert isinstance(err, UsageError) and message in str(err)
    assert run(ip, "%%gpuctx m\n1").result == 1   # still working


def test_line_magics(ip):
    gpuctx.model("a", vram="1GB")(lambda: "A")
    run(ip, "%%gpuctx a --background --name t\nresult = 1")
    assert run(ip, "%gpuctx wait t").error_in_exec is None
    st = run(ip, "%gpuctx status").result
    assert "<table" in st._repr_html_() and "a" in str(st)
    assert run(ip, "%gpuctx config max_wait=5 budget='8GB'").error_in_exec is None
    assert gpuctx.scheduler().config.max_wait == 5 and gpuctx.scheduler().budget == 8 * gpuctx.GB
    assert run(ip, "%gpuctx evict a").result == ["a"]
    assert run(ip, "%gpuctx stats").result["models"]["a"]["loads"] == 1
    for bad, msg in [("%gpuctx config nonsense=1", "unknown setting"), ("%gpuctx config budget", "key=value"),
                     ("%gpuctx frobnicate", "unknown command"), ("%gpuctx evict nope", "no such model"),
                     ("%gpuctx cancel t2", "expected the name of a gpuctx.Task")]:
        res = run(ip, bad)
        err = res.error_in_exec or res.error_before_exec
        assert isinstance(err, UsageError) and msg in str(err), bad


def test_evict_of_a_model_in_use_is_a_usage_error(ip, gate):
    release = gate()
    running = threading.Event()
    ip.user_ns.update(release=release, running=running)
    run(ip, "%%gpuctx busy --background --name hold\nrunning.set(); release.wait(10)")
    assert running.wait(TIMEOUT)
    res = run(ip, "%gpuctx evict busy")
    assert isinstance(res.error_in_exec, UsageError) and "in use" in str(res.error_in_exec)
    release.set()
    ip.user_ns["hold"].result(TIMEOUT)


def test_cancel_a_queued_background_cell(ip, gate):
    release = gate()
    ip.user_ns["release"] = release
    run(ip, "%%gpuctx m --background --name first\nrelease.wait(10)")
    run(ip, "%%gpuctx m --background --name second\nresult = 2")
    assert run(ip, "%gpuctx cancel second").result is True
    release.set()
    assert ip.user_ns["second"].cancelled()


def test_usage_is_printed_for_help(ip, capsys):
    ip.run_line_magic("pinfo", "%gpuctx")
    assert "--vram" in capsys.readouterr().out


def test_unload_and_reload_leak_no_threads(ip):
    run(ip, "%%gpuctx m\n1")
    assert gpuctx_threads()
    run(ip, "%unload_ext gpuctx")
    for t in list(threading.enumerate()):
        if t.name.startswith("gpuctx-"):
            t.join(TIMEOUT)
    assert gpuctx_threads() == set()
    run(ip, "%load_ext gpuctx")
    gpuctx.configure(device="cpu", budget="10GB", safety_factor=1.0)
    assert run(ip, "%%gpuctx m\n2").result == 2


def test_config_traits_reach_configure(ip):
    run(ip, "%config GpuCtx.max_wait = 7.0")
    assert gpuctx.scheduler().config.max_wait == 7.0
    res = run(ip, "%config GpuCtx")
    assert res.error_in_exec is None


def test_status_live_updates_one_display_until_the_queue_is_empty(ip, gate, monkeypatch):
    import IPython.display as disp

    shown, updates = [], []

    class Handle:
        def update(self, obj):
            updates.append(obj)

    def fake_display(obj, display_id=False):
        shown.append(obj)
        release.set()          # the live tasks were listed before this first display
        return Handle()

    monkeypatch.setattr(disp, "display", fake_display)
    release = gate()
    ip.user_ns["release"] = release
    run(ip, "%%gpuctx m --background --name a\nrelease.wait(10)")
    run(ip, "%%gpuctx m --background --name b\nresult = 1")
    assert run(ip, "%gpuctx status --live").error_in_exec is None
    assert len(shown) == 1 and len(updates) == 2
    assert updates[-1].tasks == () and ip.user_ns["b"].done()


def test_live_status_can_be_turned_off_for_nbval(ip, monkeypatch):
    import IPython.display as disp

    monkeypatch.setattr(disp, "display", lambda *a, **k: pytest.fail("no live display when live_status is off"))
    run(ip, "%config GpuCtx.live_status = False")
    res = run(ip, "%gpuctx status --live")
    assert res.error_in_exec is None and isinstance(res.result, gpuctx.api._status.Status)
