"""A budget shared by several kernels of one user: an SQLite ledger and cooperative eviction.

``gpuctx.configure(share="NAME")`` makes this kernel a member of share ``NAME``: kernels of the
same user with the same share name keep the sum of their charges within one budget, and a
kernel that needs memory asks the others to evict idle models for it (it never evicts them
itself). :mod:`gpuctx.share._db` is the database (where, who may open it, the tables, dead
kernels); :mod:`gpuctx.share._client` one kernel's side (claim, release, heartbeat);
:mod:`gpuctx.share._nvml` NVML's view set against the charges on a GPU. The
decisions (victims, fairness) are pure functions in :mod:`gpuctx.policy`. docs/sharing.md
tells the whole story.

Nothing here imports the engine: ``gpuctx.api`` hands the client two of the scheduler's
public methods (``share_rows`` and ``evict_for_share``) and attaches the client to it.
"""

from __future__ import annotations

from typing import Any

from ._client import HEARTBEAT, POLL, STALE, KernelInfo, ShareClient
from ._db import check_name, share_dir, share_path
from ._nvml import Reconciled, device_uuid, nvml_probe, reconcile

__all__ = ["HEARTBEAT", "POLL", "STALE", "KernelInfo", "Reconciled", "ShareClient", "check_name", "default_name",
           "device_uuid", "follow", "leave", "nvml_probe", "probe", "reconcile", "share_dir", "share_path", "target"]


def default_name(device: Any) -> str | None:
    """The share a kernel joins when ``share`` is not set: on a CUDA device its UUID (so two
    notebooks on one card cooperate with no setup); on the CPU none (the share is explicit).

    The UUID comes from torch, else from NVML (:func:`gpuctx.share._nvml.device_uuid`).
    """
    uuid = device_uuid(device)
    if uuid is None:
        return None
    safe = "".join(ch if ch.isalnum() or ch in "._-" else "-" for ch in uuid).strip("-.")
    return check_name(safe) if safe else None


def target(setting: str | bool | None, device: Any) -> str | None:
    """The share a kernel with ``configure(share=setting)`` joins: a name, the default (None or
    True: the device's UUID on a GPU, none on the CPU), or none (False)."""
    if setting is False:
        return None
    if setting is None or setting is True:
        return default_name(device)
    return check_name(setting)


def probe(name: str) -> None:
    """Open share ``name`` and close it again: ShareError now (naming the path) instead of later."""
    from ._db import connect

    conn, _ = connect(share_path(name), None)
    conn.close()


def follow(sched: Any, setting: str | bool | None, strict: bool) -> None:
    """Make scheduler ``sched`` take part in the share ``setting`` names (leaving any other one).

    Args:
        sched: the scheduler (its public ``share``, ``attach_share``, ``share_rows``, ``evict_for_share``).
        setting: ``configure(share=...)``.
        strict: raise a ShareError when the share cannot be joined (an explicit ``configure``);
            otherwise warn and work alone (a scheduler starting with a default or earlier setting).
    """
    import warnings

    from ..errors import ShareError

    want = target(setting, sched.device)
    current = sched.share
    if current is not None and current.name == want and not current.alone:
        return
    if current is not None:
        sched.attach_share(None)
        current.close()
    if want is None:
        return
    client = None
    try:
        client = ShareClient(want, sched.budget, sched.share_rows, sched.evict_for_share,
                             probe=nvml_probe(sched.device), safety_factor=sched.config.safety_factor)
        sched.attach_share(client)   # ShareError when the share cannot hold what this kernel holds already
    except ShareError as exc:
        if client is not None:
            client.close()
        if strict:
            raise
        warnings.warn(f"gpuctx: {exc}; this kernel works alone", RuntimeWarning, stacklevel=3)


def leave(sched: Any) -> None:
    """``sched`` leaves its share, if any (at shutdown)."""
    current = sched.share
    if current is not None:
        sched.attach_share(None)
        current.close()
