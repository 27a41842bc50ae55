"""gpuctx on a Ray cluster: one engine per GPU (a worker actor), calls routed to where their model lives.

``gpuctx.configure(cluster="ray")`` starts the workers; the API's functions then go through
:class:`~gpuctx.cluster._driver.ClusterScheduler` instead of a local engine. Routing is
``gpuctx.policy.route``; each worker is a plain engine (:mod:`gpuctx.cluster._worker`).
Importing this package does not import ray: the driver does, when a cluster starts.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:  # pragma: no cover
    from ..engine import Config
    from ._driver import ClusterScheduler

__all__ = ["start"]


def start(config: "Config") -> "ClusterScheduler":
    """Start the workers ``config`` asks for (``ray.init()`` first when Ray is not running)."""
    try:
        import ray  # noqa: F401
    except ImportError:
        from ..errors import ConfigError

        raise ConfigError("configure(cluster='ray'): ray is not installed; pip install 'gpuctx[ray]'") from None
    from ._driver import ClusterScheduler

    return ClusterScheduler(config)
