"""A share's database read without joining the share (``python -m gpuctx top --share NAME``).

The reader opens the file read-only (SQLite's ``mode=ro``, ``PRAGMA query_only``) and reads
every table in one read transaction, so it sees one consistent moment. It writes nothing: no
kernel row, no heartbeat, no reaping of dead kernels (it only says that a kernel's process is
gone), and it creates neither the directory nor the file: a share nobody has joined is a
:class:`~gpuctx.errors.ShareError`, as are a file or directory of another user, or readable by
others (the same checks as joining, :mod:`gpuctx.share._db`).
"""

from __future__ import annotations

import os
import sqlite3
import time
import urllib.parse
from dataclasses import dataclass

from ..errors import ShareError
from . import _db
from ._client import _FREED

__all__ = ["ShareCharge", "ShareKernel", "ShareEviction", "ShareReading", "read_share"]


@dataclass(frozen=True)
class ShareCharge:
    """One model or context of a kernel, as charged in the share (bytes)."""

    model: str
    used: int          # weights
    working: int       # a running task's working memory
    base: int          # a context's reservation
    nbytes: int        # charged: max(base, used + working)
    busy: bool
    pinned: bool
    priority: int
    queued: int
    idle: float        # seconds since it was last used, as its kernel's last heartbeat said
    asked: bool        # another kernel asked for its eviction, not carried out yet


@dataclass(frozen=True)
class ShareKernel:
    """One kernel of the share: its row, its charges and the bytes it waits for."""

    id: int
    pid: int
    notebook: str | None
    heartbeat_age: float                 # seconds since its last heartbeat
    alive: bool                          # its process (the same one: pid and start time) still runs
    queued: int                          # its live tasks
    charges: tuple[ShareCharge, ...]
    requests: tuple[tuple[str, int, float], ...]   # (model, bytes it waits for, seconds waited)

    @property
    def who(self) -> str:
        """The notebook when known, else the pid."""
        return self.notebook or f"pid {self.pid}"

    @property
    def nbytes(self) -> int:
        """Bytes charged to it."""
        return sum(c.nbytes for c in self.charges)

    @property
    def waiting(self) -> int:
        """Bytes it waits for."""
        return sum(need for _, need, _ in self.requests)


@dataclass(frozen=True)
class ShareEviction:
    """An eviction one kernel asked of another, not carried out yet."""

    kernel: str        # whose model (notebook or pid)
    model: str
    nbytes: int        # what evicting it frees
    requester: str
    for_model: str
    age: float         # seconds since it was asked


@dataclass(frozen=True)
class ShareReading:
    """A share's database at one moment."""

    name: str
    path: str
    budget: int                  # the share's budget
    room: int                    # what claims may use now: the budget, or less where NVML says so (a GPU)
    kernels: tuple[ShareKernel, ...]
    evictions: tuple[ShareEviction, ...]
    read_at: float               # wall-clock time of the reading

    @property
    def charged(self) -> int:
        """Bytes charged to every kernel together."""
        return sum(k.nbytes for k in self.kernels)


def _open(name: str) -> tuple[sqlite3.Connection, str]:
    path = _db.share_path(name)
    folder = os.path.dirname(path)
    try:
        for where, what, mode in ((folder, "directory", 0o700), (path, "file", 0o600)):
            _db._owned_private(where, os.stat(where), what, mode)
    except FileNotFoundError:
        raise ShareError(f"share {name!r}: no database at {path}: no kernel has joined this share (a kernel "
                         f"creates it with configure(share={name!r})), or GPUCTX_SHARE_DIR points elsewhere") from None
    uri = "file:" + urllib.parse.quote(path) + "?mode=ro"
    try:
        conn = sqlite3.connect(uri, uri=True, timeout=5.0, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA query_only = ON")
    except sqlite3.Error as exc:
        raise ShareError(f"share database {path}: cannot be opened read-only ({exc})") from exc
    return conn, path


def read_share(name: str) -> ShareReading:
    """Read share ``name``'s database without joining it (nothing is written).

    Args:
        name: the share's name, as kernels give it to ``configure(share=...)``.

    Returns:
        The kernels, their charges and requests, and the evictions asked, at one moment.

    Raises:
        ConfigError: ``name`` cannot name a share (path characters).
        ShareError: no kernel has created the share, its file or directory is another user's or
            readable by others, or the file is not a gpuctx share (the message names the path).
    """
    conn, path = _open(name)
    try:
        conn.execute("BEGIN")   # one read transaction: every table at the same moment
        meta = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        if meta.get("schema") != str(_db.SCHEMA):
            raise sqlite3.DatabaseError(f"schema {meta.get('schema')!r}, expected {_db.SCHEMA}")
        kernels = conn.execute("SELECT id, pid, started, heartbeat, notebook, queued FROM kernels ORDER BY id").fetchall()
        charges = conn.execute("SELECT kernel, model, used, working, base, nbytes, busy, pinned, priority, queued, "
                               "last_used FROM charges ORDER BY kernel, model").fetchall()
        requests = conn.execute("SELECT kernel, model, need, since FROM requests ORDER BY since").fetchall()
        asked = conn.execute(f"SELECT e.kernel, e.model, {_FREED}, e.requester, e.for_model, e.posted FROM "
                             "evictions e LEFT JOIN charges c ON c.kernel = e.kernel AND c.model = e.model "
                             "ORDER BY e.posted DESC").fetchall()
        conn.execute("COMMIT")
        budget = int(meta["budget"])
        room = min(budget, int(meta["room"])) if "room" in meta else budget
    except (sqlite3.Error, ValueError, KeyError) as exc:
        raise ShareError(f"share database {path} is not a readable gpuctx share ({type(exc).__name__}: {exc})") from exc
    finally:
        conn.close()
    now = time.time()
    pending = {(k, m) for k, m, *_ in asked}
    out = []
    for kid, pid, started, beat, notebook, queued in kernels:
        mine = tuple(ShareCharge(m, u, w, b, n, bool(busy), bool(pin), pr, q, max(0.0, now - last), (kid, m) in pending)
                     for k, m, u, w, b, n, busy, pin, pr, q, last in charges if k == kid)
        waits = tuple((m, need, max(0.0, now - since)) for k, m, need, since in requests if k == kid)
        out.append(ShareKernel(kid, pid, notebook, max(0.0, now - beat), _db.same_process(pid, started), queued,
                               mine, waits))
    who = {k.id: k.who for k in out}
    evictions = tuple(ShareEviction(who.get(k, f"kernel {k}"), m, freed or 0, who.get(r, f"kernel {r}"), fm,
                                    max(0.0, now - posted)) for k, m, freed, r, fm, posted in asked)
    return ShareReading(name, path, budget, room, tuple(out), evictions, now)
