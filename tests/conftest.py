"""Shared fixtures: every test gets a fresh CPU scheduler with a declared budget."""

from __future__ import annotations

import threading

import pytest

import gpuctx


@pytest.fixture
def fresh():
    """A clean gpuctx on the CPU device with a 10 GB budget and safety factor 1.0."""
    gpuctx.reset()
    gpuctx.configure(device="cpu", budget="10GB", safety_factor=1.0)
    yield gpuctx
    gpuctx.reset()


@pytest.fixture
def gate():
    """A factory of threading.Events that tests open to let a task body finish."""
    events: list[threading.Event] = []

    def make() -> threading.Event:
        ev = threading.Event()
        events.append(ev)
        return ev

    yield make
    for ev in events:   # never leave a worker blocked
        ev.set()
