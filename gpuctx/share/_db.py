"""The share's database: where it lives, who may open it, its tables, and which kernels are dead.

One SQLite file per share name, in a per-user runtime directory: ``$GPUCTX_SHARE_DIR`` when set
(tests), else ``$XDG_RUNTIME_DIR/gpuctx``, else ``<tmp>/gpuctx-<uid>``. The directory is mode
0700 and the file 0600, both owned by the user; anything else is refused with a
:class:`~gpuctx.errors.ShareError` that names the path and what to do, so another user's kernels
can neither read nor join a share. WAL mode lets readers (status) run beside a writer; every
claim, charge and release is one ``BEGIN IMMEDIATE`` transaction, so two kernels never both see
the same free bytes.

Tables::

    meta(key, value)                         budget (set by the kernel that created the share), schema,
                                             room (on a GPU: what NVML leaves the share once processes
                                             outside it are counted; see gpuctx.share._nvml)
    kernels(id, pid, started, heartbeat,     one row per live kernel; ``started`` is the process's start
            notebook, queued)                time (/proc), so a reused pid is not the dead kernel
    charges(kernel, model, used, working,    bytes charged per model or context in three parts, each
            base, nbytes, busy, pinned,      written by one path of its kernel: ``used`` (weights,
            priority, queued, last_used,     claimed before a load), ``working`` (a running task's
            load_cost)                       working memory), ``base`` (a context's reservation);
                                             ``nbytes`` = max(base, used + working), as the kernel's
                                             own ledger counts it (a generated column). The rest is
                                             what victim choice needs, published by the owner's
                                             heartbeat (last_used: wall-clock seconds, comparable
                                             across processes)
    requests(kernel, model, need, since)     a claim that did not fit: the kernel waits
    evictions(kernel, model, requester,      "please evict": posted by a requester, carried out by the
              for_model, posted)             owner's housekeeping, then deleted
"""

from __future__ import annotations

import os
import re
import sqlite3
import stat
import tempfile

from ..errors import ConfigError, ShareError

SCHEMA = 3   # 3: charges in parts (used, working, base); 2 charged weights only
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,99}")

_TABLES = """
CREATE TABLE IF NOT EXISTS meta(key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS kernels(id INTEGER PRIMARY KEY AUTOINCREMENT, pid INTEGER NOT NULL, started TEXT,
    heartbeat REAL NOT NULL, notebook TEXT, queued INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS charges(kernel INTEGER NOT NULL, model TEXT NOT NULL,
    used INTEGER NOT NULL DEFAULT 0, working INTEGER NOT NULL DEFAULT 0, base INTEGER NOT NULL DEFAULT 0,
    nbytes INTEGER GENERATED ALWAYS AS (MAX(base, used + working)) VIRTUAL, busy INTEGER NOT NULL DEFAULT 1,
    pinned INTEGER NOT NULL DEFAULT 0, priority INTEGER NOT NULL DEFAULT 0, queued INTEGER NOT NULL DEFAULT 0, last_used REAL NOT NULL DEFAULT 0, load_cost REAL NOT NULL DEFAULT 1,
    PRIMARY KEY(kernel, model));
CREATE TABLE IF NOT EXISTS requests(kernel INTEGER NOT NULL, model TEXT NOT NULL, need INTEGER NOT NULL,
    since REAL NOT NULL, PRIMARY KEY(kernel, model));
CREATE TABLE IF NOT EXISTS evictions(kernel INTEGER NOT NULL, model TEXT NOT NULL, requester INTEGER NOT NULL,
    for_model TEXT NOT NULL, posted REAL NOT NULL, PRIMARY KEY(kernel, model));
"""


def check_name(name: object, configure: bool = True) -> str:
    """``name`` if it can name a share file (letters, digits, ``.``, ``_``, ``-``); ConfigError if
    not, saying what else ``configure(share=...)`` takes when ``configure`` (not on a command line)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or ".." in name:
        raise ConfigError(
            f"share={name!r}: expected a name of letters, digits, '.', '_' or '-' (1-100 characters, starting "
            "with a letter or digit, no path characters such as '/' or '..')"
            + (", True for the default share, or False to work alone" if configure else ""))
    return name


def share_dir() -> str:
    """The per-user directory the shares live in (not created here)."""
    forced = os.environ.get("GPUCTX_SHARE_DIR")
    if forced:
        return forced
    runtime = os.environ.get("XDG_RUNTIME_DIR")
    if runtime and os.path.isdir(runtime):
        return os.path.join(runtime, "gpuctx")
    return os.path.join(tempfile.gettempdir(), f"gpuctx-{os.getuid()}")


def share_path(name: str) -> str:
    """The database file of share ``name``."""
    return os.path.join(share_dir(), check_name(name) + ".sqlite3")


def _owned_private(path: str, st: os.stat_result, what: str, mode: int) -> None:
    if st.st_uid != os.getuid():
        raise ShareError(f"share {what} {path} belongs to uid {st.st_uid}, not to you (uid {os.getuid()}): "
                         "another user's kernels cannot be joined; use another share name or set "
                         "GPUCTX_SHARE_DIR to a directory of yours")
    if stat.S_IMODE(st.st_mode) & 0o077:
        raise ShareError(f"share {what} {path} has mode {stat.S_IMODE(st.st_mode):04o}: others could read it; "
                         f"run `chmod {mode:o} {path}` (expected {mode:04o})")


def connect(path: str, budget: int | None) -> tuple[sqlite3.Connection, int | None]:
    """Open (or create) the share at ``path``; returns the connection and the share's budget
    (``budget`` sets it when the share has none yet; None only looks).

    Raises:
        ShareError: the directory or file belongs to someone else or is readable by others, or
            the file is not a gpuctx share database (corrupt); the message names the path.
    """
    if sqlite3.sqlite_version_info < (3, 31):   # generated columns (charges.nbytes)
        raise ShareError(f"share database {path}: SQLite {sqlite3.sqlite_version} is too old (3.31 or newer is "
                         "needed); use a Python built with a newer SQLite, or configure(share=False)")
    folder = os.path.dirname(path)
    try:
        os.makedirs(folder, mode=0o700, exist_ok=True)
        _owned_private(folder, os.stat(folder), "directory", 0o700)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | getattr(os, "O_NOFOLLOW", 0), 0o600)
        try:
            _owned_private(path, os.fstat(fd), "file", 0o600)
        finally:
            os.close(fd)
    except OSError as exc:
        raise ShareError(f"share database {path}: cannot be opened ({exc}); check the directory's owner "
                         "and mode, or set GPUCTX_SHARE_DIR") from exc
    conn = None
    try:
        conn = sqlite3.connect(path, timeout=5.0, isolation_level=None, check_same_thread=False)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.executescript(_TABLES)   # idempotent; executescript runs outside a transaction
        conn.execute("BEGIN IMMEDIATE")
        conn.execute("INSERT OR IGNORE INTO meta VALUES ('schema', ?)", (str(SCHEMA),))
        if budget is not None:
            conn.execute("INSERT OR IGNORE INTO meta VALUES ('budget', ?)", (str(budget),))
        rows = dict(conn.execute("SELECT key, value FROM meta").fetchall())
        conn.execute("COMMIT")
        if rows.get("schema") != str(SCHEMA):
            raise sqlite3.DatabaseError(f"schema {rows.get('schema')!r}, expected {SCHEMA}")
        return conn, int(rows["budget"]) if "budget" in rows else None
    except (sqlite3.Error, ValueError, KeyError) as exc:
        if conn is not None:
            conn.close()
        raise ShareError(f"share database {path} is not a usable gpuctx share ({type(exc).__name__}: {exc}); "
                         "if no kernel uses this share, delete the file (and its -wal and -shm files) or choose "
                         "another share name") from exc


def process_start(pid: int) -> str | None:
    """When process ``pid`` started (clock ticks since boot, from /proc), or None where unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data.rsplit(b")", 1)[-1].split()
    return fields[19].decode() if len(fields) > 19 else None


def same_process(pid: int, started: str | None) -> bool:
    """True when process ``pid`` is alive and, where its start time is known, is the one recorded."""
    if started is not None and os.path.exists("/proc/self/stat"):
        return process_start(pid) == started
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def reap(conn: sqlite3.Connection, me: int, now: float, stale_after: float) -> list[int]:
    """Delete the kernels (and their charges, requests, evictions) that missed their heartbeats
    and whose process is gone or is another one with the same pid. Call inside a write transaction."""
    dead = [kid for kid, pid, started in conn.execute(
        "SELECT id, pid, started FROM kernels WHERE id != ? AND heartbeat < ?", (me, now - stale_after)).fetchall()
        if not same_process(pid, started)]
    for kid in dead:
        forget(conn, kid)
    return dead


def forget(conn: sqlite3.Connection, kid: int) -> None:
    """Delete kernel ``kid`` and everything it holds or asked for (inside a write transaction)."""
    conn.execute("DELETE FROM kernels WHERE id = ?", (kid,))
    conn.execute("DELETE FROM charges WHERE kernel = ?", (kid,))
    conn.execute("DELETE FROM requests WHERE kernel = ?", (kid,))
    conn.execute("DELETE FROM evictions WHERE kernel = ? OR requester = ?", (kid, kid))
