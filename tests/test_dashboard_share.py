"""The panel of a share (issue 20.3): ``python -m gpuctx top --share NAME`` reads a share's database
without joining it, and a kernel's own dashboard lists the other kernels of its share.

The other kernels are real processes (tests/share_worker.py, the ``kernels`` fixture of
conftest.py). To compare the database's bytes before and after a reading, every kernel is
stopped (SIGSTOP) meanwhile, so nothing but the reader could have written.
"""

from __future__ import annotations

import json
import os
import pathlib
import re
import signal
import sqlite3
import time

import pytest

import gpuctx
from gpuctx import panel
from gpuctx.__main__ import main
from gpuctx.share import share_path
from gpuctx.share._reader import read_share

MB = 10**6


def _until(check, what: str, timeout: float = 10.0):
    deadline = time.monotonic() + timeout
    while not (value := check()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.005)
    return value


def _files(name: str) -> dict[str, bytes]:
    """The database's bytes: the file and its write-ahead log (the -shm index is shared memory,
    where SQLite readers take their read locks)."""
    path = share_path(name)
    return {p: pathlib.Path(p).read_bytes() for p in (path, path + "-wal") if os.path.exists(p)}


def _rows(name: str, sql: str) -> list:
    db = sqlite3.connect(f"file:{share_path(name)}?mode=ro", uri=True)
    try:
        return db.execute(sql).fetchall()
    finally:
        db.close()


def test_top_share_shows_every_kernels_models_requests_and_evictions_and_writes_nothing(share_dir, kernels, capsys):
    a, b, c = (kernels("lab", 1000 * MB) for _ in range(3))
    a("model", name="ma", vram=400 * MB)
    b("model", name="mb", vram=300 * MB, pin=True)
    c("model", name="mc", vram=500 * MB)
    assert a("run", model="ma")["result"] == "ma"
    b("hold", model="mb")                                   # busy until released
    os.kill(a.pid, signal.SIGSTOP)                          # a cannot carry out the eviction asked of it
    c.p.stdin.write(json.dumps({"op": "run", "model": "mc"}) + "\n")   # waits: 400 + 300 + 500 > 1000
    c.p.stdin.flush()
    _until(lambda: _rows("lab", "SELECT model FROM evictions") == [("ma",)], "the eviction of ma to be asked")
    for k in (b, c):
        os.kill(k.pid, signal.SIGSTOP)
    try:
        before = _files("lab")
        assert main(["top", "--share", "lab", "--once", "--window", "5"]) == 0
        reading = read_share("lab")
        after = _files("lab")
    finally:
        for k in (a, b, c):
            os.kill(k.pid, signal.SIGCONT)
    assert after == before                                  # not one byte written
    out = capsys.readouterr().out
    assert out.startswith("gpuctx share 'lab', read-only: budget 1 GB, used 700 MB, free 300 MB")
    # queued tasks are published at each heartbeat; busy: only mb (ma was idle, or no eviction was asked)
    assert re.search(r"^kernels: 3, \d+ tasks queued, 1 busy, waiting for 500 MB$", out, re.M), out
    for who, model, state, size in ((a.pid, "ma", "evict asked", "400 MB"), (b.pid, "mb", "busy", "300 MB")):
        assert any(line.split()[:4] == ["pid", str(who), model, *state.split()[:1]] and size in line
                   for line in out.splitlines()), (who, model, out)
    assert f"pid {c.pid} waits for 500 MB for 'mc'" in out
    assert f"asked pid {a.pid}/ma 400 MB: for pid {c.pid}'s 'mc'" in out
    assert "timeline: none" in out
    pids = {k.pid for k in reading.kernels}
    assert pids == {a.pid, b.pid, c.pid} and os.getpid() not in pids   # this process did not join
    assert gpuctx.api.current_scheduler() is None
    mine = {k.pid: k for k in reading.kernels}
    assert [(x.model, x.nbytes, x.busy) for x in mine[b.pid].charges] == [("mb", 300 * MB, True)]
    assert mine[c.pid].requests[0][:2] == ("mc", 500 * MB) and mine[c.pid].charges == ()
    assert all(k.alive for k in reading.kernels) and reading.charged == 700 * MB
    html = panel.render_html(panel.Panel.of_share(reading))
    assert "gpuctx-charges" in html and "gpuctx-kernels" in html and "<svg" not in html
    # once a is running again it evicts ma, and c's call goes through; the share view follows
    assert json.loads(c.p.stdout.readline())["result"] == "mc"
    later = read_share("lab")
    assert {(k.pid, x.model) for k in later.kernels for x in k.charges} == {(b.pid, "mb"), (c.pid, "mc")}
    assert later.evictions == () and all(not k.requests for k in later.kernels)
    b("release", model="mb")


def test_a_share_nobody_joined_is_an_error_and_reading_it_creates_nothing(share_dir, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["top", "--share", "ghost", "--once"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert "share 'ghost': no database at" in err and "no kernel has joined this share" in err
    assert not share_dir.exists()                           # neither the directory nor the file was made
    with pytest.raises(SystemExit):
        main(["top", "--share", "../etc", "--once"])
    err = capsys.readouterr().err
    assert "share='../etc'" in err and "no path characters" in err
    assert "True for the default share" not in err          # configure()'s alternatives mean nothing here
    with pytest.raises(SystemExit):
        main(["top", "--share", "lab", "--demo", "2"])
    assert "not with --demo" in capsys.readouterr().err


def test_reading_a_share_checks_its_owner_and_mode_like_joining(share_dir, kernels):
    k = kernels("lab", 1000 * MB)
    k("model", name="m", vram=100 * MB)
    k("run", model="m")
    path = share_path("lab")
    os.chmod(path, 0o644)
    try:
        with pytest.raises(gpuctx.ShareError, match=r"mode 0644: others could read it; run `chmod 600"):
            read_share("lab")
    finally:
        os.chmod(path, 0o600)
    assert [(c.model, c.nbytes) for c in read_share("lab").kernels[0].charges] == [("m", 100 * MB)]


def test_a_kernels_own_dashboard_lists_the_other_kernels_of_its_share(share_dir, kernels):
    other = kernels("lab", 1000 * MB)
    other("model", name="theirs", vram=300 * MB)
    other("run", model="theirs")
    gpuctx.configure(device="cpu", budget=1000 * MB, share="lab")
    gpuctx.model("mine", vram=200 * MB)(lambda: "M")
    gpuctx.gpu_task(model="mine")(lambda: 1)().result(10)
    reader = panel.PanelReader(gpuctx.api.current_scheduler, 10.0)
    p = _until(lambda: (p := reader.read()).peers and len(p.peers) == 2 and p, "the other kernel's row")
    assert p.peers[0] == "share 'lab': 1 other kernel(s)"
    assert p.peers[1].startswith(f"pid {other.pid}: theirs 300 MB (300 MB)")
    assert "other kernels and workers: share 'lab': 1 other kernel(s); pid" in panel.render_text(p)
    assert ("mine", 200 * MB) in {(m.name, m.used) for m in p.models}
