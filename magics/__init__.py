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
import difflib
import shlex
import sys
from typing import Any

from IPython import display as _ipd
from IPython.core.error import UsageError
from IPython.core.magic import Magics, line_cell_magic, magics_class
from IPython.core.magic_arguments import argument, magic_arguments, parse_argstring
from traitlets import Bool, Float, Int, TraitError, Unicode, validate
from traitlets.config import Configurable

import gpuctx
from gpuctx._holders import free_output_cache
from gpuctx.errors import GpuCtxError

__all__ = ["GpuCtx", "GpuCtxMagics", "load_ipython_extension", "unload_ipython_extension"]

_ENTER = "__gpuctx_enter__"


_SETTINGS = ("budget", "safety_factor", "device", "keep_alive", "max_wait", "oom_retries", "offload", "progress")


def _to_setting(name: str, value: Any) -> Any:
    """A trait's value as the gpuctx.configure keyword argument."""
    if name == "budget":
        return value or None
    if name == "keep_alive":
        return None if value < 0 else value
    return value


def _to_trait(name: str, value: Any) -> Any:
    """A live gpuctx setting as the trait shows it."""
    if name == "budget":
        return "" if value is None else _size_text(value)
    if name == "keep_alive":
        return -1.0 if value is None else float(value)
    if name in ("safety_factor", "max_wait"):
        return float(value)
    return value


def _size_text(n: int) -> str:
    """Bytes as the shortest exact size string: 8000000000 -> '8GB', 2**31 -> '2GiB'."""
    for unit, scale in (("TB", gpuctx.TB), ("TiB", gpuctx.TiB), ("GB", gpuctx.GB), ("GiB", gpuctx.GiB),
                        ("MB", gpuctx.MB), ("MiB", gpuctx.MiB), ("kB", gpuctx.KB)):
        if n >= scale and n % scale == 0:
            return f"{n // scale}{unit}"
    return f"{n}B"


def _live_config() -> Any:
    """The settings gpuctx runs with now (what the last gpuctx.configure/reset left)."""
    return gpuctx.api.current_config()


class GpuCtx(Configurable):
    """gpuctx settings (``c.GpuCtx.budget = "20GB"``; ``%config GpuCtx``). Same meaning as gpuctx.configure.

    Not a second copy of the settings: an assignment is applied by gpuctx.configure at once
    (an invalid value is refused with its error, and the trait keeps its value), and reading
    a setting reads gpuctx's live configuration, so ``%config GpuCtx`` shows what
    ``configure()`` or ``%gpuctx reset`` left.
    """

    budget = Unicode("", help="VRAM budget like '20GB' (empty: device memory)").tag(config=True)
    safety_factor = Float(0.9, help="fraction of the budget the scheduler may use").tag(config=True)
    device = Unicode("auto", help="'auto', 'cpu', 'cuda' or 'cuda:N'").tag(config=True)
    keep_alive = Float(-1.0, help="seconds idle before a model is unloaded (-1: never)").tag(config=True)
    max_wait = Float(30.0, help="staleness bound in seconds").tag(config=True)
    oom_retries = Int(1, help="retries after an out-of-memory error").tag(config=True)
    offload = Bool(True, help="offload evicted torch modules to host RAM").tag(config=True)
    progress = Bool(False, help="show progress bars in gpuctx.wait").tag(config=True)
    live_status = Bool(True, help="%gpuctx status --live updates in place (off for nbval runs)").tag(config=True)

    @validate(*_SETTINGS)
    def _apply(self, proposal: Any) -> Any:
        name, value = proposal["trait"].name, proposal["value"]
        try:
            gpuctx.configure(**{name: _to_setting(name, value)})
        except GpuCtxError as exc:
            raise TraitError(f"GpuCtx.{name} = {value!r}: {exc}") from None
        return _to_trait(name, getattr(_live_config(), name))

    def __getattribute__(self, name: str) -> Any:
        # A setting reads the live configuration, except while traitlets validates a batch of
        # assignments (then the value being validated is the one stored).
        if name in _SETTINGS:
            try:
                holding = object.__getattribute__(self, "_cross_validation_lock")
            except AttributeError:   # during __init__
                holding = True
            if not holding:
                live = _to_trait(name, getattr(_live_config(), name))
                object.__getattribute__(self, "_trait_values")[name] = live
                return live
        return super().__getattribute__(name)

    def _load_config(self, cfg: Any, section_names: Any = None, traits: Any = None) -> None:
        # Compare new values with the live settings, not with what the traits last held: a
        # value equal to a stale trait must still be applied, one equal to the live one is a no-op.
        for name in _SETTINGS:
            getattr(self, name)
        super()._load_config(cfg, section_names=section_names, traits=traits)

    def forget(self) -> None:
        """Drop the ``GpuCtx`` section that IPython keeps in the shell's config.

        ``%config GpuCtx.x = v`` merges ``v`` into the shell's config even when it was refused,
        and a later ``%load_ext gpuctx`` would apply it again. The values were applied (or
        refused) when assigned and the live configuration holds them, so after a reset or an
        unload the section is stale: drop it.
        """
        holders = [self] + ([self.parent] if self.parent is not None else [])
        for holder in holders:
            if "GpuCtx" in holder.config:
                cfg = holder.config.copy()
                cfg.pop("GpuCtx")
                with holder.hold_trait_notifications():   # no reload of other sections
                    holder._trait_values["config"] = cfg


def _cell_parser_args(line: str) -> Any:
    return parse_argstring(GpuCtxMagics.gpuctx, line)


@magics_class
class GpuCtxMagics(Magics):
    """``%%gpuctx MODEL ...`` and ``%gpuctx COMMAND ...``."""

    def __init__(self, shell: Any) -> None:
        super().__init__(shell)
        self.config_obj = GpuCtx(parent=shell)   # settings from the profile are applied as they load
        self._active: list = []

    # ------------------------------------------------------------------ the magic
    @magic_arguments()
    @argument("words", nargs="*", help="cell: MODEL. line: a command and its words (listed above)")
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
        """Run a cell as a gpuctx task of MODEL, or show and steer the scheduler.

        Cell magic:
          %%gpuctx MODEL [--vram SIZE] [--priority N] [--after TASK ...]
              Run the cell with MODEL resident, on its stream, once it is MODEL's turn.
              MODEL is a model registered with @gpuctx.model, a context from
              gpuctx.create_context, or any name given its size with --vram.
          %%gpuctx MODEL --background --name NAME [--graph] [...]
              Run the cell as a background gpuctx.Task bound to NAME in the notebook;
              its result is the cell's last expression (or the variable `result`).

        Line magic:
          %gpuctx [status] [--live]     budget, resident models, queues, running tasks
          %gpuctx stats                 loads, evictions, switches, wait/run times per model
          %gpuctx config KEY=VALUE ...  gpuctx.configure(KEY=VALUE, ...), e.g. budget=8GB
          %gpuctx evict NAME | --all    unload an idle model now (--all: every idle one)
          %gpuctx wait [TASK ...]       wait for these Tasks (default: every live task)
          %gpuctx cancel TASK           cancel a Task that has not started
          %gpuctx reset                 shut down; forget models, contexts and settings
          %gpuctx dashboard             a live view that updates while other cells run
                                        (gpuctx.dashboard(); close it with .close())
          %gpuctx timeline              the timeline figure of what ran
          %gpuctx free                  drop IPython's output-cache references (Out[n], _) to models
                                        and tensors, so evicted models are really freed
          %gpuctx -h | --help           this text
        """
        if _wants_help(line):
            print(self.gpuctx.__doc__)
            return None
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
        else:
            _check_known(args.words[0])
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
        run_cell = _compile_cell(self.shell.transform_cell(cell), f"<gpuctx cell {args.name}>")
        ns = self.shell.user_ns
        parent = _current_parent(self.shell)

        def body() -> Any:
            _set_parent(self.shell, parent)
            return run_cell(ns)

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
            session.request()   # a request refused (too large, closed) is a usage error of the cell
        except GpuCtxError as exc:
            raise UsageError(f"{type(exc).__name__}: {exc}") from None
        try:
            self._wait_turn(session, args.words[0])
        except BaseException:
            session.withdraw()   # Ctrl-C while waiting withdraws the request too
            raise
        obj = session.__enter__()   # KeyboardInterrupt here withdraws the request
        self._active.append(session)
        return obj

    def _wait_turn(self, session: Any, model: str) -> None:
        """Wait for the session's turn; after a quiet moment, say what it waits for.

        In a kernel the note is an ordinary display (not stderr, which JupyterLab shows as an
        error) that is updated in place while the wait lasts and emptied when the cell starts;
        in a terminal it is one line on stdout.
        """
        handle, last = None, None
        while not session.wait_granted(_QUIET if handle is None else _REFRESH):
            note = f"gpuctx: {model!r} waits its turn: {_waiting_for(model)}"
            if getattr(self.shell, "kernel", None) is None:
                if last is None:
                    print(note)
                last = note
                continue
            if handle is None:
                handle = _ipd.display(_ipd.Pretty(note), display_id=True)
            elif note != last:
                handle.update(_ipd.Pretty(note))
            last = note
        if handle is not None:
            handle.update({"text/plain": ""}, raw=True)

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
            self.config_obj.forget()
            return None
        if cmd == "timeline":
            return gpuctx.timeline()
        if cmd == "dashboard":
            if rest:
                raise UsageError(f"%gpuctx dashboard: takes no words, got {' '.join(rest)!r}")
            return gpuctx.dashboard()
        if cmd == "free":
            dropped = free_output_cache(_heavy_test())
            print("gpuctx: dropped " + (", ".join(dropped) if dropped else "nothing: no output holds a model or tensor"))
            return None
        raise UsageError(f"%gpuctx {cmd}: unknown command; expected status, stats, config, evict, wait, cancel, "
                         "reset, timeline, dashboard or free")

    def _task(self, name: str) -> Any:
        task = self.shell.user_ns.get(name)
        if not isinstance(task, gpuctx.Task):
            raise UsageError(f"{name}: expected the name of a gpuctx.Task in the notebook, got "
                             f"{type(task).__name__ if name in self.shell.user_ns else 'nothing'}")
        return task


_QUIET = 0.2      # seconds: most turns come at once, and then nothing is said
_REFRESH = 1.0    # seconds between updates of the "waits its turn" note


def _wants_help(line: str) -> bool:
    try:
        words = shlex.split(line)
    except ValueError:
        return False
    return "-h" in words or "--help" in words


def _check_known(name: str) -> None:
    """A cell without --vram names a model or context that exists; else a typo is likely."""
    known = [s.name for s in gpuctx.scheduler().slots()
             if s.loader is not None or s.size_source != "label" or s.explicit_context]
    if name in known:
        return
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.6)
    hint = (f"; did you mean {' or '.join(repr(c) for c in close)}?" if close
            else f"; known: {', '.join(sorted(known))}" if known else "")
    raise UsageError(f"%%gpuctx {name}: no model or context called {name!r} (register it with "
                     f"@gpuctx.model or gpuctx.create_context, or give its size with --vram){hint}")


def _compile_cell(source: str, filename: str) -> Any:
    """``run(ns)``: run the cell in the one namespace ``ns`` (so its functions and
    comprehensions see its names) and return its last expression, like ``Out[n]``, or
    else the ``result`` it assigned, or else None."""
    tree = ast.parse(source, filename)
    last = None
    if tree.body and isinstance(tree.body[-1], ast.Expr):
        last = compile(ast.Expression(tree.body.pop().value), filename, "eval")
    assigns_result = any(isinstance(n, ast.Name) and n.id == "result" and isinstance(n.ctx, ast.Store)
                         for n in ast.walk(tree))
    body = compile(tree, filename, "exec")

    def run(ns: dict) -> Any:
        exec(body, ns)   # noqa: S102 - the user's own cell
        if last is not None:
            return eval(last, ns)   # noqa: S307 - the user's own cell
        return ns.get("result") if assigns_result else None

    return run


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
    from gpuctx.panel import close_all

    close_all()   # before the shutdown: no dashboard update after %unload_ext
    magics._post_run_cell(None)
    magics.config_obj.forget()
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


def _heavy_test() -> Any:
    """A test for values worth dropping from the output cache: gpuctx's model objects and tensors."""
    sched = gpuctx.scheduler()
    models = {id(s.obj) for s, _ in sched.view().slots if s.obj is not None} | {id(o) for o in sched.still_held()}
    torch = sys.modules.get("torch")

    def heavy(value: Any, depth: int = 0) -> bool:
        if id(value) in models or (torch is not None and isinstance(value, (torch.Tensor, torch.nn.Module))):
            return True
        if depth < 2 and isinstance(value, (list, tuple)):
            return any(heavy(v, depth + 1) for v in value)
        if depth < 2 and isinstance(value, dict):
            return any(heavy(v, depth + 1) for v in value.values())
        return False

    return heavy
