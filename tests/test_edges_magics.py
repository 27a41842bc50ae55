"""Issue 14, entries 19 (the %config GpuCtx bullet), 20, 21, 23 and 24 (the magics part)."""

from __future__ import annotations

import pytest
from IPython.core.error import UsageError
from test_magics import ip  # noqa: F401 - the shell fixture (models "m" and "busy" registered)

import gpuctx

TIMEOUT = 10


def _err(res):
    return res.error_in_exec or res.error_before_exec


def _rows():
    return [m.name for m in gpuctx.status().models]


# ---------------------------------------------------------------- 19: %config GpuCtx
def test_config_rejects_an_invalid_value_at_assignment(ip, caplog):
    ip.run_cell("%config GpuCtx.budget = 'banana'")
    assert "GpuCtx.budget = 'banana': budget='banana': expected a size like" in caplog.text
    assert ip.run_cell("%config GpuCtx.budget").result == "10GB"   # the trait kept the live value
    assert gpuctx.scheduler().budget == 10 * gpuctx.GB


def test_config_shows_the_live_settings_after_configure(ip, capsys):
    ip.run_cell("%config GpuCtx.max_wait = 7.0")
    gpuctx.configure(max_wait=3.0, budget="6GB")
    assert ip.run_cell("%config GpuCtx.max_wait").result == 3.0
    assert ip.run_cell("%config GpuCtx.budget").result == "6GB"
    capsys.readouterr()
    ip.run_cell("%config GpuCtx")
    out = capsys.readouterr().out
    assert "Current: 3.0" in out and "Current: '6GB'" in out


def test_config_assignment_of_the_shown_value_is_applied(ip):
    ip.run_cell("%config GpuCtx.max_wait = 5.0")
    gpuctx.configure(max_wait=9.0)
    ip.run_cell("%config GpuCtx.max_wait = 5.0")   # equal to the old trait value: still applied
    assert gpuctx.scheduler().config.max_wait == 5.0


def test_reset_does_not_bring_back_a_stale_budget(ip):
    ip.run_cell("%config GpuCtx.budget = '8GB'")
    assert gpuctx.scheduler().budget == 8 * gpuctx.GB
    assert _err(ip.run_cell("%gpuctx reset")) is None
    assert ip.run_cell("%config GpuCtx.budget").result == ""
    gpuctx.configure(device="cpu", budget="10GB", safety_factor=1.0)
    ip.run_cell("%config GpuCtx.max_wait = 5.0")
    ip.run_cell("%unload_ext gpuctx")
    ip.run_cell("%load_ext gpuctx")
    gpuctx.configure(device="cpu", budget="10GB", safety_factor=1.0)
    assert gpuctx.scheduler().budget == 10 * gpuctx.GB
    assert ip.run_cell("%config GpuCtx.budget").result == "10GB"


# ---------------------------------------------------------------- 20: typos are not labels
def test_an_unknown_model_without_vram_is_an_error_with_suggestions(ip):
    ip.user_ns.pop("job", None)   # the shell is shared: another test may have made one
    gpuctx.model("whisper", vram="1GB")(lambda: "W")
    before = _rows()
    res = ip.run_cell("%%gpuctx wisper\ngpuctx.current_model()")
    err = _err(res)
    assert isinstance(err, UsageError) and "'wisper'" in str(err) and "did you mean 'whisper'" in str(err)
    res = ip.run_cell("%%gpuctx wisper --background --name job\n1")
    assert isinstance(_err(res), UsageError) and "job" not in ip.user_ns
    assert _rows() == before   # no ghost row


def test_known_names_and_sized_labels_still_work(ip):
    gpuctx.create_context("ctx", max_vram="2GB")
    assert ip.run_cell("%%gpuctx ctx\n1").result == 1
    assert ip.run_cell("%%gpuctx newlabel --vram 1GB\n2").result == 2
    assert ip.run_cell("%%gpuctx newlabel\n3").result == 3   # its size is known now


# ---------------------------------------------------------------- 21: background cells
def test_background_cell_names_are_visible_in_its_functions_and_comprehensions(ip):
    res = ip.run_cell("%%gpuctx m --vram 1GB --background --name job\n"
                      "x = 2\ndef f(i):\n    return x * i\nresult = [x * i for i in range(3)] + [f(3)]")
    assert _err(res) is None
    assert ip.user_ns["job"].result(TIMEOUT) == [0, 2, 4, 6]
    assert ip.user_ns["x"] == 2


def test_background_cell_result_is_its_last_expression(ip):
    ip.user_ns["result"] = "stale"
    ip.run_cell("%%gpuctx m --vram 1GB --background --name a\ny = 20\ny + 1")
    assert ip.user_ns["a"].result(TIMEOUT) == 21
    ip.run_cell("%%gpuctx m --background --name b\nz = 1")
    assert ip.user_ns["b"].result(TIMEOUT) is None   # neither an expression nor result =: None, not stale
    ip.run_cell("%%gpuctx m --background --name c\nresult = 5\nz = 2")
    assert ip.user_ns["c"].result(TIMEOUT) == 5


# ---------------------------------------------------------------- 23: the waits-its-turn note
def _hold_model(ip, gate):
    import threading

    release, running = gate(), threading.Event()
    ip.user_ns.update(release=release, running=running)
    ip.run_cell("%%gpuctx m --vram 1GB --background --name hold\nrunning.set(); release.wait(10)")
    assert running.wait(TIMEOUT)
    return release


def test_the_wait_note_is_a_display_updated_in_place_then_cleared(ip, gate, monkeypatch, capsys):
    import IPython.display as disp

    release = _hold_model(ip, gate)
    shown, updates = [], []

    class Handle:
        def update(self, obj, **kw):
            updates.append((obj, kw))

    def fake_display(obj, display_id=False, **kw):
        shown.append((obj, display_id))
        release.set()   # the note is up: let the running cell finish
        return Handle()

    monkeypatch.setattr(disp, "display", fake_display)
    monkeypatch.setattr(ip, "kernel", object(), raising=False)
    res = ip.run_cell("%%gpuctx m\n'ran'")
    assert res.result == "ran"
    assert len(shown) == 1 and shown[0][1] is True and "waits its turn" in shown[0][0].data
    assert updates[-1] == ({"text/plain": ""}, {"raw": True})   # cleared when the cell starts
    assert capsys.readouterr().err == ""


def test_the_wait_note_is_a_plain_line_on_stdout_outside_a_kernel(ip, gate, monkeypatch, capsys):
    import threading

    release = _hold_model(ip, gate)
    real_print = print
    printed = threading.Event()

    def spy(*a, **k):
        real_print(*a, **k)
        if a and "waits its turn" in str(a[0]):
            release.set()
            printed.set()

    monkeypatch.setattr("builtins.print", spy)
    assert ip.run_cell("%%gpuctx m\n'ran'").result == "ran"
    out = capsys.readouterr()
    assert printed.is_set() and "waits its turn" in out.out and out.err == ""


# ---------------------------------------------------------------- 24: help
@pytest.mark.parametrize("line", ["%gpuctx -h", "%gpuctx --help", "%%gpuctx -h\n1"])
def test_help_prints_the_usage(ip, capsys, line):
    res = ip.run_cell(line)
    assert _err(res) is None
    out = capsys.readouterr().out
    assert "%%gpuctx MODEL" in out
    for cmd in ("status", "stats", "config", "evict", "wait", "cancel", "reset", "timeline"):
        assert f"%gpuctx {cmd}" in out or f"%gpuctx [{cmd}]" in out, cmd


def test_a_cell_rejected_for_its_size_leaves_no_row(ip):
    before = _rows()
    err = _err(ip.run_cell("%%gpuctx big --vram 99GB\n1"))
    assert isinstance(err, UsageError) and "never fit" in str(err)
    assert _rows() == before
