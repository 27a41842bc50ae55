"""One kernel's side of a share: claim before a load, release after an eviction, and a heartbeat
that publishes this kernel's models and carries out the evictions other kernels asked for.

Protocol (all of it in :mod:`gpuctx.share._db`'s tables, one transaction per step):

1. **Claim.** Before the engine counts bytes (a load's weights, a context's reservation, a task's
   working memory: the three parts of a charge, see :mod:`gpuctx.engine.sharing`),
   :meth:`ShareClient.claim` asks the share for them. When they fit (and the fairness rule allows it: :func:`gpuctx.policy.share_may_take`)
   the charge is written and the load goes on. When not, the claim records a *request*, picks
   victims among the other kernels' idle, unpinned models (:func:`gpuctx.policy.share_victims`)
   and posts one *eviction* row per victim; then it polls every ``POLL`` seconds.
2. **Evict.** Each kernel's heartbeat (every ``HEARTBEAT`` seconds) reads the eviction rows
   addressed to it and evicts those models through its own engine (``evict_for_share``: the
   normal eviction path, never under the share's lock, with a model that became busy in the
   meantime declined). The engine's release writes the lower charge; the row is deleted.
3. **Grant.** The requester's next poll finds the bytes free and takes them.

Between two heartbeats each kernel reads (no write) every ``POLL`` seconds whether an eviction
was asked of it, and a group's end wakes the heartbeat (a model just turned idle), so a
request is seen within ``POLL``, not a whole heartbeat.

On a GPU each heartbeat also sets NVML's per-process view against the charges
(:mod:`gpuctx.share._nvml`): memory of processes outside the share shrinks the room claims see.

A kernel never evicts another's model: it only asks. Dead kernels (SIGKILL, a crash) stop
heartbeating; after ``STALE`` seconds without one, the next kernel to touch the share checks
that the pid is gone or now belongs to a process with another start time, and deletes the dead
kernel's rows (charges, requests, evictions). A kernel that loses the database (an I/O error, a
file removed under it) warns once and works alone with its own budget from then on.
"""

from __future__ import annotations

import os
import sqlite3
import threading
import time
import warnings
from dataclasses import dataclass
from typing import Callable

from .. import policy
from . import _db
from ..units import format_size
from ._nvml import Reconciled, reconcile

__all__ = ["ShareClient", "KernelInfo"]

# Seconds between heartbeats (publish, reap, carry out evictions); GPUCTX_SHARE_HEARTBEAT
# changes it for every kernel started with it (the tests' stress run uses 5 ms).
HEARTBEAT = float(os.environ.get("GPUCTX_SHARE_HEARTBEAT") or 0.05)
STALE = 2.5 * HEARTBEAT   # a kernel this long without a heartbeat is checked for death (2 missed beats)
POLL = min(0.01, HEARTBEAT / 2)   # seconds between the tries of a waiting claim


@dataclass(frozen=True)
class KernelInfo:
    """Another kernel of the share, as its database shows it."""

    id: int
    pid: int
    notebook: str | None
    queued: int
    nbytes: int
    models: tuple[tuple[str, int], ...]   # (model, bytes charged)
    waiting: int                          # bytes it waits for (0: none)


class ShareClient:
    """This kernel's membership of share ``name``: a row in its database and a heartbeat thread.

    Args:
        name: the share's name (validated: no path characters).
        budget: this kernel's budget; the kernel that creates the share sets the share's.
        rows: ``() -> (live tasks, [(model, bytes, busy, pinned, priority, queued, idle_for, load_cost)])``,
            this kernel's models now (the engine's ``share_rows``).
        evict: ``(model, why) -> bool``, evict one idle model for another kernel (``evict_for_share``).
        probe: on a CUDA device, ``() -> (total bytes, {pid: bytes used})`` from NVML
            (:func:`gpuctx.share.nvml_probe`); each heartbeat reconciles the charges with it.
            None (the CPU device): no reconciliation.
        safety_factor: the share of the card's total memory the share may charge at most (the
            configuration's ``safety_factor``), with a probe only.
    """

    def __init__(self, name: str, budget: int, rows: Callable[[], tuple[int, list[tuple]]],
                 evict: Callable[[str, str], bool], probe: Callable[[], tuple[int, dict]] | None = None,
                 safety_factor: float = 1.0) -> None:
        self.name = _db.check_name(name)
        self.path = _db.share_path(name)
        self._conn, shared = _db.connect(self.path, budget)
        self.budget: int = shared if shared is not None else budget
        self._rows, self._evict = rows, evict
        self._probe, self._safety = probe, safety_factor
        self.reconciled: Reconciled | None = None   # NVML's view at the last heartbeat (a GPU only)
        self._warned: set[int] = set()               # pids warned about being above their charges
        self._lock = threading.Lock()   # one connection, used by workers, the engine and the heartbeat
        self._alone = False
        self._stop = threading.Event()
        self._wake = threading.Event()
        self.pid = os.getpid()
        with self._txn() as c:
            cur = c.execute("INSERT INTO kernels(pid, started, heartbeat, notebook) VALUES (?, ?, ?, ?)",
                            (self.pid, _db.process_start(self.pid), time.time(), os.environ.get("JPY_SESSION_NAME")))
            self.id = int(cur.lastrowid)
        self._thread = threading.Thread(target=self._beat_loop, name="gpuctx-share", daemon=True)
        self._thread.start()

    # ------------------------------------------------------------------ plumbing
    def _txn(self) -> "_Txn":
        return _Txn(self._conn)

    def _go_alone(self, exc: BaseException) -> None:
        if self._alone:
            return
        self._alone = True
        self._stop.set()
        self._wake.set()
        warnings.warn(f"gpuctx: share {self.name!r} ({self.path}) cannot be reached ({type(exc).__name__}: {exc}); "
                      "this kernel works alone with its own budget from now on", RuntimeWarning, stacklevel=3)

    @property
    def alone(self) -> bool:
        """True once the share was lost (or left): claims are then only this kernel's own."""
        return self._alone

    # ------------------------------------------------------------------ the engine's calls
    def claim(self, model: str, nbytes: int, closed: Callable[[], bool], part: str = "used",
              patience: float | None = None) -> bool:
        """Set ``part`` of ``model``'s charge to ``nbytes``, waiting (outside every lock) while other
        kernels evict: ``part`` is "used" (weights, before a load), "working" (a task's working
        memory, before it starts) or "base" (a context's reservation); the charge is
        max(base, used + working), as the kernel's own ledger counts it.

        Returns False when ``closed()`` turned True while waiting, or, with ``patience`` (seconds),
        when the bytes did not come free within it or no idle model of another kernel can free
        them now (an admission: it does not wait for running work); the request is then withdrawn.
        """
        column = _column(part)
        since = time.time()
        deadline = None if patience is None else time.monotonic() + patience
        while not self._alone:
            try:
                with self._lock:
                    got = self._try_claim(model, nbytes, since, column)
                    if got is True:
                        return True
                    if closed() or (deadline is not None and (got is None or time.monotonic() >= deadline)):
                        with self._txn() as c:
                            c.execute("DELETE FROM requests WHERE kernel = ? AND model = ?", (self.id, model))
                            c.execute("DELETE FROM evictions WHERE requester = ? AND for_model = ?", (self.id, model))
                        return False
            except sqlite3.Error as exc:
                self._go_alone(exc)
                break
            time.sleep(POLL)
        return True

    def _try_claim(self, model: str, nbytes: int, since: float, column: str) -> bool | None:
        """One try: True granted; False waiting (victims asked, or coming); None: nothing can free it now."""
        me = self.id
        with self._txn() as c:
            _db.reap(c, me, time.time(), STALE)
            budget = self._budget_now(c)
            held = dict(c.execute("SELECT kernel, SUM(nbytes) FROM charges GROUP BY kernel").fetchall())
            row = c.execute("SELECT used, working, base FROM charges WHERE kernel = ? AND model = ?",
                            (me, model)).fetchone()
            parts = dict(zip(_PARTS, row or (0, 0, 0)))
            before = max(parts["base"], parts["used"] + parts["working"])
            parts[column] = nbytes
            extra = max(parts["base"], parts["used"] + parts["working"]) - before
            demands = _demands(c, held)
            if extra <= 0 or policy.share_may_take(budget, demands, me, extra):
                # in use from now (last_used too: until the owner's next heartbeat it is not "idle for ever")
                c.execute(f"INSERT INTO charges(kernel, model, {column}, last_used) VALUES (?, ?, ?, ?) ON CONFLICT"
                          f"(kernel, model) DO UPDATE SET {column} = excluded.{column}, busy = 1, last_used = "
                          "excluded.last_used", (me, model, nbytes, time.time()))
                c.execute("DELETE FROM requests WHERE kernel = ? AND model = ?", (me, model))
                c.execute("DELETE FROM evictions WHERE requester = ? AND for_model = ?", (me, model))
                return True
            c.execute("INSERT INTO requests VALUES (?, ?, ?, ?) ON CONFLICT(kernel, model) DO UPDATE SET need = "
                      "excluded.need", (me, model, extra, since))
            # what an eviction frees: the charge less what stays (a context's reservation)
            coming = c.execute(f"SELECT COALESCE(SUM({_FREED}), 0) FROM evictions e JOIN charges c ON c.kernel = "
                               "e.kernel AND c.model = e.model WHERE e.requester = ? AND e.for_model = ?",
                               (me, model)).fetchone()[0]
            short = extra - (budget - sum(held.values())) - coming
            if short <= 0:
                return False
            asked = set(c.execute("SELECT kernel, model FROM evictions").fetchall())
            now = time.time()
            models = [policy.SharedModel(k, m, n, bool(b), bool(p), pr, q, now - used, lc) for k, m, n, b, p, pr,
                      q, used, lc in c.execute(f"SELECT kernel, model, {_FREED}, busy, pinned, priority, queued, "
                                               "last_used, load_cost FROM charges c").fetchall() if (k, m) not in asked]
            victims = policy.share_victims(models, short, me, budget, _with_me(demands, me, extra))
            for k, m in victims or ():
                c.execute("INSERT OR IGNORE INTO evictions VALUES (?, ?, ?, ?, ?)", (k, m, me, model, time.time()))
            return False if victims or coming else None

    def _budget_now(self, c: sqlite3.Connection) -> int:
        """The share's budget, or less on a GPU: the room NVML leaves once processes outside the
        share are counted (written by the heartbeats of kernels on a GPU; none on the CPU)."""
        row = c.execute("SELECT value FROM meta WHERE key = 'room'").fetchone()
        return self.budget if row is None else min(self.budget, int(row[0]))

    def settle(self, model: str, nbytes: int, part: str = "used") -> None:
        """``part`` of ``model``'s charge is now at most ``nbytes`` (less than it claimed, 0 after an
        eviction or a task's end). Called under the engine's lock, so a release is never written
        after the next claim of the same model. Never raises the charge."""
        if self._alone:
            return
        column = _column(part)
        try:
            with self._lock, self._txn() as c:
                c.execute(f"UPDATE charges SET {column} = MIN({column}, ?) WHERE kernel = ? AND model = ?",
                          (max(0, nbytes), self.id, model))
                c.execute("DELETE FROM charges WHERE kernel = ? AND model = ? AND used = 0 AND working = 0 "
                          "AND base = 0", (self.id, model))
                if column == "used" and nbytes <= 0:
                    c.execute("DELETE FROM evictions WHERE kernel = ? AND model = ?", (self.id, model))
        except sqlite3.Error as exc:
            self._go_alone(exc)

    def free(self) -> int:
        """Bytes of the share's budget charged to no kernel now."""
        if self._alone:
            return self.budget
        try:
            with self._lock:
                c = self._conn
                return self._budget_now(c) - c.execute("SELECT COALESCE(SUM(nbytes), 0) FROM charges").fetchone()[0]
        except sqlite3.Error as exc:
            self._go_alone(exc)
            return self.budget

    # ------------------------------------------------------------------ the heartbeat
    def wake(self) -> None:
        """Beat now, not at the next tick (the engine calls this when a group ends: a model just
        turned idle, so a kernel waiting for it need not wait a heartbeat to see it)."""
        self._wake.set()

    def _beat_loop(self) -> None:
        # A full beat (a write) every HEARTBEAT, or at once when woken or asked to evict; between
        # beats, a read every POLL looks for eviction requests, so one waits ~POLL, not a beat.
        last = 0.0
        while not self._stop.is_set():
            woken = self._wake.wait(POLL)
            self._wake.clear()
            if self._stop.is_set():
                return
            try:
                if not (woken or time.monotonic() - last >= HEARTBEAT or self._asked()):
                    continue
                last = time.monotonic()
                self.beat()
            except sqlite3.Error as exc:
                self._go_alone(exc)
            except Exception as exc:  # noqa: BLE001 - the engine closed under us: nothing left to share
                if not self._stop.is_set():
                    self._go_alone(exc)

    def _asked(self) -> bool:
        with self._lock:
            return self._conn.execute("SELECT 1 FROM evictions WHERE kernel = ? LIMIT 1", (self.id,)).fetchone() is not None

    def beat(self) -> int:
        """One heartbeat: publish this kernel's models, reap dead kernels, carry out the evictions
        asked of it. Returns how many it did (the heartbeat thread calls this)."""
        live, rows = self._rows()
        seen = self._probe() if self._probe is not None else None   # NVML, outside the share's lock
        now = time.time()   # idle ages become wall-clock times: comparable across processes
        with self._lock, self._txn() as c:
            if c.execute("UPDATE kernels SET heartbeat = ?, queued = ? WHERE id = ?",
                         (time.time(), live, self.id)).rowcount == 0:
                raise sqlite3.OperationalError(f"this kernel's row (id {self.id}) was removed from the share")
            c.executemany("UPDATE charges SET busy = ?, pinned = ?, priority = ?, queued = ?, last_used = ?, "
                          "load_cost = ? WHERE kernel = ? AND model = ?",
                          [(int(b), int(p), pr, q, now - idle, lc, self.id, m) for m, _n, b, p, pr, q, idle, lc in rows])
            _db.reap(c, self.id, time.time(), STALE)
            if seen is not None:
                self._reconcile_locked(c, *seen)
            asked = c.execute("SELECT e.model, e.requester, k.pid, k.notebook FROM evictions e LEFT JOIN kernels k "
                              "ON k.id = e.requester WHERE e.kernel = ?", (self.id,)).fetchall()
        done = 0
        for model, _req, pid, notebook in asked:
            ok = self._evict(model, f"kernel {notebook or f'pid {pid}'} of share {self.name!r}")
            done += ok
            with self._lock, self._txn() as c:
                c.execute("DELETE FROM evictions WHERE kernel = ? AND model = ?", (self.id, model))
                if not ok:   # it became busy: not a victim until the next heartbeat says otherwise
                    c.execute("UPDATE charges SET busy = 1 WHERE kernel = ? AND model = ?", (self.id, model))
        return done

    def _reconcile_locked(self, c: sqlite3.Connection, total: int, used: dict[int, int | None]) -> None:
        """Set NVML's per-process use against the charges (inside the heartbeat's transaction):
        the room left by processes outside the share goes to the database, for every kernel's
        claims; a kernel above its charges is named in a warning, once until it is back within."""
        kernels = c.execute("SELECT k.pid, k.notebook, COALESCE(SUM(c.nbytes), 0) FROM kernels k LEFT JOIN charges c "
                            "ON c.kernel = k.id GROUP BY k.id").fetchall()
        charged: dict[int, int] = {}
        names: dict[int, str] = {}
        for pid, notebook, nbytes in kernels:
            charged[pid] = charged.get(pid, 0) + nbytes
            names[pid] = "this kernel" if pid == self.pid else f"kernel {notebook or f'pid {pid}'}"
        r = self.reconciled = reconcile(charged, used, self.pid)
        if not r.matched:
            if -1 not in self._warned:
                self._warned.add(-1)
                warnings.warn(f"gpuctx: share {self.name!r}: NVML does not list this kernel's pid {self.pid} among the "
                              "card's processes (a container with its own pid namespace?); memory of processes "
                              "outside the share is not subtracted", RuntimeWarning, stacklevel=2)
            return
        c.execute("INSERT INTO meta VALUES ('room', ?) ON CONFLICT(key) DO UPDATE SET value = excluded.value",
                  (str(r.room(total, self._safety)),))
        over = {pid for pid, _, _ in r.over}
        for pid, nbytes, real in r.over:
            if pid not in self._warned:
                warnings.warn(f"gpuctx: share {self.name!r}: {names[pid]} uses {format_size(real)} of the card "
                              f"(NVML) but is charged {format_size(nbytes)}: undeclared working memory or memory "
                              "allocated outside gpuctx; the share cannot see it", RuntimeWarning, stacklevel=2)
        self._warned = {p for p in self._warned if p < 0 or p in over} | over

    # ------------------------------------------------------------------ views and the end
    def others(self) -> tuple[KernelInfo, ...]:
        """The other live kernels of the share, with their charged models and what they wait for."""
        if self._alone:
            return ()
        try:
            with self._lock:
                c = self._conn
                c.execute("BEGIN")
                try:
                    kernels = c.execute("SELECT id, pid, notebook, queued FROM kernels WHERE id != ? ORDER BY id",
                                        (self.id,)).fetchall()
                    charges = c.execute("SELECT kernel, model, nbytes FROM charges ORDER BY kernel, model").fetchall()
                    waits = dict(c.execute("SELECT kernel, SUM(need) FROM requests GROUP BY kernel").fetchall())
                finally:
                    c.execute("COMMIT")
        except sqlite3.Error as exc:
            self._go_alone(exc)
            return ()
        out = []
        for kid, pid, notebook, queued in kernels:
            models = tuple((m, n) for k, m, n in charges if k == kid)
            out.append(KernelInfo(kid, pid, notebook, queued, sum(n for _, n in models), models, waits.get(kid, 0)))
        return tuple(out)

    def close(self) -> None:
        """Leave the share: stop the heartbeat, delete this kernel's rows, close the database."""
        self._stop.set()
        self._wake.set()
        if self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
        with self._lock:
            if not self._alone:
                try:
                    with self._txn() as c:
                        _db.forget(c, self.id)
                except sqlite3.Error:
                    pass
            self._alone = True
            self._conn.close()


_PARTS = ("used", "working", "base")
_FREED = "c.nbytes - MAX(c.base, c.working)"   # what evicting a (charges c) row's model gives back


def _column(part: str) -> str:
    if part not in _PARTS:
        raise ValueError(f"part={part!r}: expected one of {', '.join(_PARTS)}")
    return part


class _Txn:
    """``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on an error): one writer at a time across processes."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._c = conn

    def __enter__(self) -> sqlite3.Connection:
        self._c.execute("BEGIN IMMEDIATE")
        return self._c

    def __exit__(self, kind: object, exc: object, tb: object) -> None:
        if kind is None:
            self._c.execute("COMMIT")
        elif self._c.in_transaction:
            self._c.execute("ROLLBACK")


def _demands(c: sqlite3.Connection, held: dict[int, int]) -> list[policy.ShareDemand]:
    waiting = dict(c.execute("SELECT kernel, SUM(need) FROM requests GROUP BY kernel").fetchall())
    return [policy.ShareDemand(k, held.get(k, 0), q, waiting.get(k, 0))
            for k, q in c.execute("SELECT id, queued FROM kernels").fetchall()]


def _with_me(demands: list[policy.ShareDemand], me: int, extra: int) -> list[policy.ShareDemand]:
    return [policy.ShareDemand(d.kernel, d.held, d.queued, extra) if d.kernel == me else d for d in demands]
