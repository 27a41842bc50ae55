"""IPython extension: ``%load_ext gpuctx``, the ``%%gpuctx`` cell magic and ``%gpuctx`` line magics.

The magics are thin: ``%%gpuctx MODEL --vram 4GB`` means exactly what
``gpuctx.context_session("MODEL", vram="4GB")`` means in Python.

A foreground ``%%gpuctx`` cell is not run by the magic (a magic that calls ``run_cell``
breaks top-level ``await`` on ipykernel 7, ipython#14157). Instead an input transformer
rewrites the cell into ordinary code whose first line enters the session (waiting for the
model's turn), followed by the cell's own lines untouched; a ``post_run_cell`` hook leaves
the session. So ``await`` works, the last expression is displayed, and an exception is an
ordinary cell error. ``--background`` cells are compiled and run as a gpuctx Task.
"""

from __future__ import annotations

import ast
import shlex
import sys
from typing import Any

from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from traitlets import Bool, Float, Int, Unicode
from traitlets.config import Configurable

import gpuctx
from gpuctx.errors import GpuCtxError

__all__ = ["GpuCtx", "GpuCtxMagics", "load_ipython_extension", "unload_ipython_extension"]

_ENTER = "__gpuctx_enter__"


class GpuCtx(Configurable):
    """gpuctx settings (``c.GpuCtx.budget = "20GB"``; ``%config GpuCtx``). Same meaning as gpuctx.configure."""

    budget = Unicode("", help="VRAM budget like '20GB' (empty: device memory)").tag(config=True)
    safety_factor = Float(0.9, help="fraction of the budget the scheduler may use").tag(config=True)
    device = Unicode("auto", help="'auto', 'cpu', 'cuda' or 'cuda:N'").tag(config=True)
    keep_alive = Float(-1.0, help="seconds idle before a model is unloaded (-1: never)").tag(config=True)
    max_wait = Float(30.0, help="staleness bound in seconds").tag(config=True)
    oom_retries = Int(1, help="retries after an out-of-memory error").tag(config=True)
    offload = Bool(True, help="offload evicted torch modules to host RAM").tag(config=True)
    progress = Bool(False, help="show progress bars in gpuctx.wait").tag(config=True)
    live_status = Bool(True, help="%gpuctx status --live updates in place (off for nbval runs)").tag(config=True)

    def settings(self, names: list[str] | None = None) -> dict[str, Any]:
        """The traits as gpuctx.configure keyword arguments."""
        out: dict[str, Any] = {}
        for name in names or ["budget", "safety_factor", "device", "keep_alive", "max_wait", "oom_retries",
                              "offload", "progress"]:
            value = getattr(self, name)
            if name == "budget":
                value = value or None
            if name == "keep_alive":
                value = None if value < 0 else value
            out[name] = value
        return out


def _cell_parser_args(line: str) -> Any:
    return parse_argstring(GpuCtxMagics.gpuctx, line)


@magics_class
class GpuCtxMagics(Magics):
    """``%%gpuctx MODEL ...`` and ``%gpuctx COMMAND ...``."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.config_obj = GpuCtx(parent=shell)
        self._active: list = []
        self.config_obj.observe(self._on_trait, names=list(self.config_obj.settings()))
        defaults = GpuCtx()
        changed = [n for n in self.config_obj.settings() if getattr(self.config_obj, n) != getattr(defaults, n)]
        if changed:
            gpuctx.configure(**self.config_obj.settings(changed))

    def _on_trait(self, change: Any) -> None:
        try:
            gpuctx.configure(**self.config_obj.settings([change["name"]]))
        except GpuCtxError as exc:
            raise UsageError(str(exc)) from None

    # ------------------------------------------------------------------ the magic
    @magic_arguments()
    @argument("words", nargs="*", help="cell: MODEL. line: status|config|evict|wait|cancel|reset|stats|timeline ...")
    @argument("--vram", help="the model's size, e.g. 4.5GB (cell)")
    @argument("--priority", type=int, default=0, help="higher runs first (cell)")
    @argument("--after", nargs="+", default=[], metavar="NAME", help="Tasks in the user namespace to run after (cell)")
    @argument("--name", help="name of the Task bound in the user namespace (cell, --background)")
    @argument("--background", action="store_true", help="run the cell as a background Task (cell)")
    @argument("--graph", action="store_true", help="capture the body as a CUDA graph (cell, --background)")
    @argument("--all", action="store_true", help="evict: every idle model")
    @argument("--live", action="store_true", help="status: update the display until the queues are empty")
    @line_cell_magic
    def gpuctx(self, line: str, cell: str | None = None) -> Any:
        """Run a cell as a gpuctx task of MODEL, or show and steer the scheduler (see %gpuctx?)."""
        try:
            args = parse_argstring(self.gpuctx, line)
        except UsageError:
            raise
        except SystemExit:   # argparse on some versions
            raise UsageError(f"%gpuctx {line}: could not parse the arguments") from None
        try:
            if cell is not None:
                return self._cell(args, cell)
            return self._line(args)
        except GpuCtxError as exc:
            raise UsageError(f"{type(exc).__name__}: {exc}") from None

    # ------------------------------------------------------------------ cells
    def _session_kwargs(self, args: Any) -> dict[str, Any]:
        if len(args.words) != 1:
            raise UsageError("%%gpuctx MODEL [--vram SIZE] [--priority N] [--after NAME ...] [--name NAME] "
                             f"[--background]: expected exactly one MODEL, got {args.words or 'none'}")
        if args.vram is not None:
            gpuctx.parse_size(args.vram, arg="--vram")
        after = []
        for name in args.after:
            if name not in self.shell.user_ns:
                raise UsageError(f"--after {name}: no variable {name!r} in the notebook")
            task = self.shell.user_ns[name]
            if not isinstance(task, gpuctx.Task):
                raise UsageError(f"--after {name}: {name!r} is a {type(task).__name__}, expected a gpuctx.Task")
            after.append(task)
        return dict(vram=args.vram, priority=args.priority, after=after)

    def _cell(self, args: Any, cell: str) -> Any:
        kw = self._session_kwargs(args)
        model = args.words[0]
        if not args.background:
            # Reached only where the transformer did not rewrite the cell (e.g. run_cell_magic).
            with gpuctx.context_session(model, **kw):
                return self.shell.ex(cell)
        if not args.name:
            raise UsageError("%%gpuctx --background needs --name NAME: the Task is bound to NAME")
        if not args.name.isidentifier():
            raise UsageError(f"--name {args.name!r}: expected a Python identifier")
        code = compile(cell, f"<gpuctx cell {args.name}>", "exec")
        ns = self.shell.user_ns
        parent = _current_parent(self.shell)

        def body() -> Any:
            _set_parent(self.shell, parent)
            local: dict[str, Any] = {}
            exec(code, ns, local)   # noqa: S102 - the user's own cell
            ns.update(local)
            return local.get("result")

        fn = gpuctx.gpu_task(model=model, name=args.name, vram=kw["vram"], after=kw["after"],
                             priority=kw["priority"], cuda_graph=args.graph)(body)
        task = fn()
        ns[args.name] = task
        return None

    def enter(self, line: str) -> Any:
        """Enter the session of a rewritten foreground cell (called by the cell's first line)."""
        args = parse_argstring(self.gpuctx, line)
        try:
            kw = self._session_kwargs(args)
            session = gpuctx.context_session(args.words[0], **kw)
        except GpuCtxError as exc:
            raise UsageError(f"{type(exc).__name__}: {exc}") from None
        try:
            if not session.wait_granted(0.2):   # most turns come at once: then say nothing
                print(f"gpuctx: {args.words[0]!r} waits its turn: {_waiting_for(args.words[0])}", file=sys.stderr)
        except BaseException:
            session.withdraw()   # Ctrl-C in the first moments withdraws the request too
            raise
        obj = session.__enter__()   # KeyboardInterrupt here withdraws the request
        self._active.append(session)
        return obj

    def _post_run_cell(self, result: Any) -> None:
        while self._active:
            self._active.pop().__exit__(None, None, None)

    # ------------------------------------------------------------------ line commands
    def _line(self, args: Any) -> Any:
        words = args.words or ["status"]
        cmd, rest = words[0], words[1:]
        from IPython.display import display

        if cmd == "status":
            st = gpuctx.status()
            if args.live and self.config_obj.live_status:
                live = gpuctx.scheduler().tasks()
                handle = display(st, display_id=True)
                for task in live:
                    try:
                        task.exception(timeout=60)
                    except Exception:  # noqa: BLE001 - cancelled or timed out: show the latest state anyway
                        pass
                    handle.update(gpuctx.status())
                return None
            return st
        if cmd == "stats":
            return gpuctx.stats()
        if cmd == "config":
            settings = {}
            for item in rest:
                key, sep, raw = item.partition("=")
                if not sep:
                    raise UsageError(f"%gpuctx config {item}: expected key=value, e.g. budget=8GB")
                try:
                    settings[key] = ast.literal_eval(raw)
                except (ValueError, SyntaxError):
                    settings[key] = raw
            gpuctx.configure(**settings)
            return None
        if cmd == "evict":
            if args.all:
                return gpuctx.evict()
            if len(rest) != 1:
                raise UsageError("%gpuctx evict NAME | --all")
            return gpuctx.evict(rest[0])
        if cmd == "wait":
            tasks = [self._task(n) for n in rest] if rest else gpuctx.scheduler().tasks()
            gpuctx.wait(tasks)
            return None
        if cmd == "cancel":
            if len(rest) != 1:
                raise UsageError("%gpuctx cancel NAME")
            return self._task(rest[0]).cancel()
        if cmd == "reset":
            gpuctx.reset()
            return None
        if cmd == "timeline":
            return gpuctx.timeline()
        raise UsageError(f"%gpuctx {cmd}: unknown command; expected status, stats, config, evict, wait, cancel, "
                         "reset or timeline")

    def _task(self, name: str) -> Any:
        task = self.shell.user_ns.get(name)
        if not isinstance(task, gpuctx.Task):
            raise UsageError(f"{name}: expected the name of a gpuctx.Task in the notebook, got "
                             f"{type(task).__name__ if name in self.shell.user_ns else 'nothing'}")
        return task


def _waiting_for(model: str) -> str:
    running = [t for t in gpuctx.scheduler().tasks() if t.state.value == "running"]
    if not running:
        return "loading"
    return "running " + ", ".join(f"{t.name} ({t.model})" for t in running[:3])


def _current_parent(shell: Any) -> Any:
    kernel = getattr(shell, "kernel", None)
    if kernel is None:
        return None
    try:
        return kernel.get_parent("shell")
    except TypeError:
        return kernel.get_parent()


def _set_parent(shell: Any, parent: Any) -> None:
    """Route this thread's output to the cell that started it (ipykernel routes per thread)."""
    if parent is None:
        return
    for stream in (sys.stdout, sys.stderr):
        setter = getattr(stream, "set_parent", None)
        if setter is not None:
            try:
                setter(parent)
            except Exception:  # noqa: BLE001 - plain terminals
                pass
    display_pub = getattr(shell, "display_pub", None)
    if display_pub is not None and hasattr(display_pub, "set_parent"):
        display_pub.set_parent(parent)


def _rewrite(lines: list[str]) -> list[str]:
    """Turn a foreground ``%%gpuctx`` cell into plain code that enters the session first."""
    if not lines or not lines[0].startswith("%%gpuctx"):
        return lines
    head = lines[0][len("%%gpuctx"):].strip()
    if head.endswith("?") or not head:
        return lines
    try:
        words = shlex.split(head)
    except ValueError:
        return lines
    if "--background" in words or "-h" in words or "--help" in words:
        return lines
    return [f"{_ENTER}({head!r})\n"] + lines[1:]


_state: dict[str, Any] = {}


def load_ipython_extension(ip: Any) -> None:
    """Register the magics, the cell rewriter and the session exit hook."""
    if "magics" in _state:
        return
    magics = GpuCtxMagics(ip)
    ip.register_magics(magics)
    ip.configurables.append(magics.config_obj)   # so %config GpuCtx reaches it
    ip.input_transformers_cleanup.append(_rewrite)
    ip.events.register("post_run_cell", magics._post_run_cell)
    ip.user_ns[_ENTER] = magics.enter
    ip.user_ns_hidden[_ENTER] = magics.enter
    _state["magics"] = magics
    gpuctx.scheduler()


def unload_ipython_extension(ip: Any) -> None:
    """Remove the magics and hooks; shut the scheduler down, releasing its models."""
    magics = _state.pop("magics", None)
    if magics is None:
        return
    magics._post_run_cell(None)
    if _rewrite in ip.input_transformers_cleanup:
        ip.input_transformers_cleanup.remove(_rewrite)
    try:
        ip.events.unregister("post_run_cell", magics._post_run_cell)
    except ValueError:
        pass
    ip.user_ns.pop(_ENTER, None)
    ip.user_ns_hidden.pop(_ENTER, None)
    if magics.config_obj in ip.configurables:
        ip.configurables.remove(magics.config_obj)
    ip.magics_manager.magics["line"].pop("gpuctx", None)
    ip.magics_manager.magics["cell"].pop("gpuctx", None)
    gpuctx.shutdown(cancel_pending=True)
    gpuctx.configure()   # a later %load_ext starts a fresh scheduler
