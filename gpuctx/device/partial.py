"""Partial loading: a model larger than the free budget runs with only a prefix of it on the card.

:func:`place_partial` takes a module whose tensors are on the host, plans with
:func:`~gpuctx.device.pipeline.plan_partial` which layers (the modules that own tensors, in
execution order) stay resident, copies those to the device, pins the others, and installs a
:class:`LayerStreamer`. For each streamed layer the streamer's forward pre-hook makes sure its
copy was queued (on copy lane ``i % lanes``: two copy streams, so one layer's copy overlaps the
previous one's and the compute), makes the computing stream wait for it, and queues the copy of
the next streamed layer while this one computes; the post-hook points the layer back at its
pinned host tensors, and the device copy is freed once the compute that used it is done.

At most ``buffers`` streamed layers are on the card at once (a pre-hook that finds them all
taken, a forward out of order, gives one back first), so the bytes in flight never exceed
:attr:`~gpuctx.device.pipeline.PartialPlan.buffer_bytes`, which the ledger charges with the
resident prefix. A tensor shared by several modules (tied weights) stays resident: streaming it
for one module would move it under another.

The copies are a :class:`~gpuctx.device.hostcopy.Transport`'s, so the tests run this on the CPU.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

from .base import span_bytes
from .hostcopy import Transport, _rebind
from .pipeline import STREAM_BUFFERS, PartialPlan, execution_order, plan_partial

__all__ = ["LayerStreamer", "PartialHandle", "partial_layers", "place_partial"]


def partial_layers(module: Any) -> tuple[list[tuple[Any, list]], list]:
    """(layers, shared): each module owning tensors with the (owner, "data") items only it holds,
    in execution order; and the items of tensors that several modules hold (kept resident)."""
    holders: dict[int, int] = {}
    per_module = []
    for m in execution_order(module):
        own = [t for t in [*m.parameters(recurse=False), *m.buffers(recurse=False)]]
        per_module.append((m, own))
        for t in own:
            holders[id(t)] = holders.get(id(t), 0) + 1
    shared: dict[int, Any] = {}
    layers = []
    for m, own in per_module:
        layers.append((m, [(t, "data") for t in own if holders[id(t)] == 1]))
        shared.update((id(t), (t, "data")) for t in own if holders[id(t)] > 1)
    return layers, list(shared.values())


def _to_host(tr: Transport, items: list) -> None:
    """Bring the items that are on the device to the host first (a loader that returned part of the model there)."""
    on = [it for it in items if tr.on_device(getattr(*it))]
    if on:
        copies = [tr.to_host(getattr(o, a)) for o, a in on]
        tr.fence()
        _rebind(on, copies)


def _bytes(items: list) -> int:
    return span_bytes([getattr(o, a) for o, a in items])


class LayerStreamer:
    """Forward hooks that bring streamed layers in and out of the card (see the module docstring).

    ``fetch(i)`` queues layer ``i``'s copy and returns its event, ``wait(event)`` makes the
    current stream wait for it, ``give_back(i)`` points layer ``i`` back at the host.
    ``peak`` is the most streamed layers ever on the card at once.
    """

    def __init__(self, modules: Sequence[Any], streamed: Sequence[int], fetch: Callable[[int], Any],
                 wait: Callable[[Any], None], give_back: Callable[[int], None], buffers: int = STREAM_BUFFERS) -> None:
        self._fetch, self._wait, self._give_back = fetch, wait, give_back
        self.buffers = buffers
        self.streamed = list(streamed)
        self.on_card: dict[int, Any] = {}    # layer index -> its copy's event, in fetch order
        self.peak = 0
        self.fetches = 0
        self._next = {a: b for a, b in zip(self.streamed, self.streamed[1:])}
        self._handles = []
        for i in self.streamed:
            m = modules[i]
            self._handles.append(m.register_forward_pre_hook(self._pre(i)))
            self._handles.append(m.register_forward_hook(self._post(i)))

    def _bring(self, i: int) -> None:
        if i in self.on_card:
            return
        while len(self.on_card) >= self.buffers:   # out of order: give the oldest back first
            self._drop(next(iter(self.on_card)))
        self.on_card[i] = self._fetch(i)
        self.fetches += 1
        self.peak = max(self.peak, len(self.on_card))

    def _drop(self, i: int) -> None:
        self.on_card.pop(i)
        self._give_back(i)

    def _pre(self, i: int) -> Callable:
        def pre_hook(module: Any, args: Any) -> None:
            self._bring(i)
            self._wait(self.on_card[i])
            j = self._next.get(i)
            if j is not None and j not in self.on_card and len(self.on_card) < self.buffers:
                self._bring(j)   # the next streamed layer's copy overlaps this one's compute
        return pre_hook

    def _post(self, i: int) -> Callable:
        def post_hook(module: Any, args: Any, output: Any) -> None:
            if i in self.on_card:
                self._drop(i)
        return post_hook

    def remove(self) -> None:
        """Remove the hooks and give every streamed layer still on the card back (idempotent)."""
        for h in self._handles:
            h.remove()
        self._handles = []
        for i in list(self.on_card):
            self._drop(i)


class PartialHandle:
    """A placed partial model: its plan and its streamer."""

    def __init__(self, plan: PartialPlan, streamer: LayerStreamer, resident_items: list) -> None:
        self.plan = plan
        self.streamer = streamer
        self.resident_items = resident_items

    def remove(self) -> None:
        """Stop streaming (the resident layers stay where they are)."""
        self.streamer.remove()


def place_partial(module: Any, budget: int, lanes: Sequence[Transport], where: Any,
                  pin: Callable[[Any], Any], buffers: int = STREAM_BUFFERS) -> PartialHandle | None:
    """Put the prefix of ``module`` that fits ``budget`` (with ``buffers`` in-flight layers) on the
    device at ``where``, pin the rest and stream it per forward on the copy ``lanes``; None (and
    ``module`` unchanged) when not even streaming every layer fits."""
    layers, shared = partial_layers(module)
    _to_host(tr := lanes[0], [*shared, *[it for _, items in layers for it in items]])
    base = _bytes(shared)
    sizes = [_bytes(items) for _, items in layers]
    plan = plan_partial(sizes, budget - base, buffers) if budget >= base else None
    if plan is None:
        return None
    plan = PartialPlan(plan.resident, plan.streamed, plan.resident_bytes + base, plan.buffer_bytes,
                       plan.total_bytes + base)
    resident = [*shared, *[it for i in plan.resident for it in layers[i][1]]]
    copies = [tr.to_device(getattr(o, a), where) for o, a in resident]
    tr.fence()
    _rebind(resident, copies)
    streamed_items = {i: layers[i][1] for i in plan.streamed}
    for items in streamed_items.values():
        _rebind(items, [pin(getattr(o, a)) for o, a in items])
    host = {i: [getattr(o, a) for o, a in items] for i, items in streamed_items.items()}
    lane_of = {i: lanes[k % len(lanes)] for k, i in enumerate(plan.streamed)}
    freed: dict[int, Any] = {}   # lane -> the event after the compute of the layer it copied last

    def fetch(i: int) -> Any:
        lane = lane_of[i]
        # The host runs ahead of the GPU: without this wait it would queue copies for every layer,
        # and the allocator, which frees a block only once the compute that used it is done, would
        # hold them all at once. Waiting for the lane's previous layer bounds the card to the plan.
        lane.block(freed.pop(id(lane), None))
        _rebind(streamed_items[i], [lane.to_device(h, where) for h in host[i]])
        return lane.mark()

    def give_back(i: int) -> None:
        lane = lane_of[i]
        freed[id(lane)] = lane.done()
        _rebind(streamed_items[i], host[i])

    streamer = LayerStreamer([m for m, _ in layers], plan.streamed, fetch, tr.wait, give_back, buffers)
    return PartialHandle(plan, streamer, resident)
