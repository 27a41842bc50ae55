"""The engine: the scheduler's state, its transitions, and the drivers that run them.

See ``docs/architecture.md`` for the layer picture. The public names are re-exported here;
every other module of this package is internal to the engine.
"""

from __future__ import annotations

from .drivers import Deadlock, ThreadedDriver, VirtualDriver
from .scheduler import Scheduler
from .session import Session
from .spec import Config, TaskSpec, current_frame
from .state import IllegalTransition


__all__ = ["Config", "Deadlock", "IllegalTransition", "Scheduler", "Session", "TaskSpec", "ThreadedDriver",
           "VirtualDriver", "current_frame"]
