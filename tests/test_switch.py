"""Issue 18 on the CPU: free eviction (clean host copies), pipelined restore, partial-load planning.

The module offload/restore code the CUDA backend runs (``gpuctx.device.hostcopy``) is driven here
through a fake transport: "device" tensors are host tensors the transport made, copies are
counted, events are tokens and the waits a forward makes are recorded.
"""

from __future__ import annotations

import weakref

import pytest

torch = pytest.importorskip("torch")

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import gpuctx  # noqa: E402
from gpuctx.device.hostcopy import HostCopies, choose_host_drops, offload_module, restore_module  # noqa: E402
from gpuctx.device.pipeline import (GroupWaits, execution_order, plan_groups, plan_partial,  # noqa: E402
                                    traced_order)


class FakeTransport:
    """A device made of host tensors: those this transport created are "on the device"."""

    def __init__(self) -> None:
        self._device: list = []          # kept alive, so no host tensor ever reuses their addresses
        self.h2d = self.d2h = 0
        self.fences = 0
        self.marks: list[str] = []
        self.waited: list[str] = []
        self.blocked: list[str] = []

    def _ptrs(self) -> set:
        return {t.data_ptr() for t in self._device}

    def on_device(self, t):
        return t.numel() > 0 and t.data_ptr() in self._ptrs()

    def where(self, t):
        return "fake:0"

    def to_host(self, t):
        self.d2h += t.numel() * t.element_size()
        return t.detach().clone()

    def to_device(self, t, where):
        assert where == "fake:0"
        c = t.detach().clone()
        self._device.append(c)
        self.h2d += t.numel() * t.element_size()
        return c

    def fence(self):
        self.fences += 1

    def mark(self):
        self.marks.append(f"event{len(self.marks)}")
        return self.marks[-1]

    def wait(self, event):
        self.waited.append(event)

    def done(self):
        self.marks.append(f"done{len(self.marks)}")
        return self.marks[-1]

    def block(self, event):
        if event is not None:
            self.blocked.append(event)

    def checksum(self, tensors):
        from gpuctx.device.hostcopy import _checksum

        return _checksum(torch, tensors)

    def same(self, a, b):
        return bool(torch.equal(a, b))


def _net(width: int = 16, depth: int = 4) -> torch.nn.Module:
    torch.manual_seed(0)
    layers = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers)


def _on_device(net, tr: FakeTransport):
    """Put ``net`` "on the device" the way a first load would: every tensor replaced by a device copy."""
    for p in [*net.parameters(), *net.buffers()]:
        p.data = tr.to_device(p.data, "fake:0")
    tr.h2d = 0
    return net


def _bytes(net) -> int:
    return sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers()])


def _cycle(store, tr, net, group_bytes=None):
    """offload, then restore: the state just after a restore of an offloaded model."""
    assert offload_module(store, tr, "m", net) is False
    restore_module(store, tr, "m", net, "fake:0", group_bytes)


# --------------------------------------------------------------------------- free eviction
def test_evicting_an_unmodified_model_copies_nothing_back_and_keeps_its_bytes_counted():
    tr, store = FakeTransport(), HostCopies()
    net = _on_device(_net(), tr)
    x = torch.randn(3, 16)
    expected = net(x)
    _cycle(store, tr, net)
    nbytes = _bytes(net)
    assert tr.d2h == nbytes and tr.h2d == nbytes
    assert all(tr.on_device(p) for p in net.parameters())
    assert store.used == nbytes and store.clean_copies() == nbytes   # the clean copy stays counted

    net(x)                                         # inference does not write weights
    assert offload_module(store, tr, "m", net) is True
    assert tr.d2h == nbytes                        # nothing copied back
    assert not any(tr.on_device(p) for p in net.parameters())
    assert store.used == nbytes and store.clean_copies() == 0 and store.free_evictions == 1
    restore_module(store, tr, "m", net, "fake:0", None)
    assert torch.equal(net(x), expected)


@pytest.mark.parametrize("write", ["optimizer step", "in-place add", "load_state_dict", "rebind", "buffer"])
def test_a_modified_model_is_copied_back_bit_exact(write):
    tr, store = FakeTransport(), HostCopies()
    net = _on_device(torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.BatchNorm1d(8)), tr)
    _cycle(store, tr, net)
    before = tr.d2h
    if write == "optimizer step":
        opt = torch.optim.SGD(net.parameters(), lr=0.5)
        net(torch.randn(4, 8)).sum().backward()
        opt.step()
    elif write == "in-place add":
        with torch.no_grad():
            net[0].bias.add_(1.0)
    elif write == "load_state_dict":
        state = {k: v + 1 for k, v in net.state_dict().items()}
        net.load_state_dict(state)
    elif write == "rebind":
        net[0].weight.data = tr.to_device(torch.ones(8, 8), "fake:0")
    else:
        net.train()
        net(torch.randn(4, 8))                      # batch norm's running stats are buffers, written in place
    now = [t.detach().clone() for t in [*net.parameters(), *net.buffers()]]
    assert offload_module(store, tr, "m", net) is False
    assert tr.d2h > before and store.copy_backs == 1
    assert all(torch.equal(a, b) for a, b in zip([*net.parameters(), *net.buffers()], now))
    assert store.used == tr.d2h - before            # the stale copy's bytes went, the new copy's came


def test_a_write_through_data_escapes_version_counters_and_a_checksum_catches_it():
    for verify, free in (("version", True), ("checksum", False)):
        tr, store = FakeTransport(), HostCopies(verify=verify)
        net = _on_device(torch.nn.Linear(4, 4), tr)
        _cycle(store, tr, net)
        net.weight.data.add_(1.0)                   # `.data` has its own version counter
        changed = net.weight.detach().clone()
        assert offload_module(store, tr, "m", net) is free, verify
        if not free:
            assert torch.equal(net.weight, changed)


def test_a_checksummed_unmodified_model_is_still_evicted_free():
    tr, store = FakeTransport(), HostCopies(verify="checksum")
    net = _on_device(_net(), tr)
    _cycle(store, tr, net, group_bytes=1)           # checksum mode restores in one piece
    assert tr.marks == [] and tr.fences >= 2
    assert offload_module(store, tr, "m", net) is True


def test_keep_clean_off_gives_the_host_bytes_back_at_restore():
    tr, store = FakeTransport(), HostCopies(keep_clean=False)
    net = _on_device(_net(), tr)
    _cycle(store, tr, net)
    assert store.used == 0
    assert offload_module(store, tr, "m", net) is False


def test_unknown_verify_mode_is_a_config_error():
    with pytest.raises(gpuctx.ConfigError, match=r"verify='hash': expected one of 'version', 'checksum'"):
        HostCopies(verify="hash")


def test_host_budget_drops_clean_copies_least_recently_used_first_never_an_only_copy():
    tr = FakeTransport()
    nets = {n: _on_device(torch.nn.Linear(16, 16), tr) for n in "abc"}
    size = _bytes(nets["a"])
    store = HostCopies(budget=2 * size)
    _cycle(store, tr, nets["a"])                    # a: resident, clean copy (droppable)
    _cycle(store, tr, nets["b"])                    # b: resident, clean copy, used after a
    offload_module(store, tr, "c", nets["c"])      # needs room: a's clean copy goes (least recently used)
    assert store.get(nets["a"]) is None and store.get(nets["b"]).resident and store.dropped == 1
    assert store.used == 2 * size
    offload_module(store, tr, "a", nets["a"])      # a needs room too: b's clean copy goes; c's only copy stays
    assert store.get(nets["b"]) is None and not store.get(nets["c"]).resident
    with pytest.raises(gpuctx.BudgetError, match=r"offload of 'b': .*host_budget=.*already held"):
        offload_module(store, tr, "b", nets["b"])  # only copies left: nothing may go
    assert store.used == 2 * size and all(tr.on_device(p) for p in nets["b"].parameters())


def test_choose_host_drops_is_lru_and_all_or_nothing():
    cands = [("x", 10, 3), ("y", 5, 1), ("z", 7, 2)]
    assert choose_host_drops(cands, 0) == []
    assert choose_host_drops(cands, 5) == ["y"]
    assert choose_host_drops(cands, 6) == ["y", "z"]
    assert choose_host_drops(cands, 22) == ["y", "z", "x"]
    assert choose_host_drops(cands, 23) is None


def test_a_module_dropped_while_resident_gives_its_clean_copy_back():
    import gc

    tr, store = FakeTransport(), HostCopies()
    net = _on_device(_net(), tr)
    _cycle(store, tr, net)
    assert store.used > 0
    del net
    gc.collect()
    assert store.used == 0


# --------------------------------------------------------------------------- pipelined restore
def test_restore_in_groups_waits_per_group_in_forward_order_then_removes_its_hooks():
    tr, store = FakeTransport(), HostCopies()
    net = _on_device(_net(width=16, depth=4), tr)  # 4 Linear layers of 1088 bytes
    x = torch.randn(2, 16)
    expected = net(x)
    offload_module(store, tr, "m", net)
    waits = restore_module(store, tr, "m", net, "fake:0", group_bytes=2000)   # 2 layers a group
    assert tr.marks == ["event0", "event1"] and waits.active
    assert all(tr.on_device(p) for p in net.parameters())
    assert tr.waited == []                          # the host waited for nothing
    out = net(x)
    assert tr.waited == ["event0", "event1"] and not waits.active
    assert all(not m._forward_pre_hooks for m in net.modules())
    assert torch.equal(out, expected)
    net(x)
    assert tr.waited == ["event0", "event1"]        # hooks gone: no more waits


def test_groups_follow_execution_order_and_each_waits_once_even_out_of_order():
    class Backwards(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.first, self.second = torch.nn.Linear(64, 64), torch.nn.Linear(64, 64)

        def forward(self, x):
            return self.first(self.second(x))

    tr, store = FakeTransport(), HostCopies()
    net = _on_device(Backwards(), tr)
    assert execution_order(net) == [net.first, net.second]
    assert traced_order(net, lambda: net(torch.randn(1, 64))) == [net.second, net.first]
    assert not any(m._forward_pre_hooks for m in net.modules())
    offload_module(store, tr, "m", net)
    waits = restore_module(store, tr, "m", net, "fake:0", group_bytes=1)
    net(torch.randn(1, 64))
    assert tr.waited == ["event1", "event0"] and not waits.active   # a later event implies the earlier copies


def test_an_eviction_before_every_group_ran_removes_the_hooks_and_waits_for_the_last_copy():
    tr, store = FakeTransport(), HostCopies()
    net = _on_device(_net(), tr)
    offload_module(store, tr, "m", net)
    waits = restore_module(store, tr, "m", net, "fake:0", group_bytes=1)
    assert waits.active and len(tr.marks) == 4
    assert offload_module(store, tr, "m", net) is True
    assert not waits.active and tr.waited == ["event3"]


def test_a_pipelined_restore_matches_a_plain_one():
    outs = []
    for group_bytes in (None, 1, 3000, 10**9):
        tr, store = FakeTransport(), HostCopies()
        net = _on_device(_net(width=24, depth=5), tr)
        offload_module(store, tr, "m", net)
        restore_module(store, tr, "m", net, "fake:0", group_bytes)
        torch.manual_seed(1)
        outs.append(net(torch.randn(4, 24)))
    assert all(torch.equal(outs[0], o) for o in outs[1:])


def test_plan_groups_rule():
    mb = 1 << 20
    assert plan_groups([], 32 * mb) == []
    assert plan_groups([10 * mb] * 7, 32 * mb) == [range(0, 4), range(4, 7)]     # 40 MB, then 30 MB (>= half)
    assert plan_groups([10 * mb] * 5, 32 * mb) == [range(0, 5)]                  # a 10 MB tail joins
    assert plan_groups([100 * mb, 1, 1], 32 * mb) == [range(0, 3)]
    assert plan_groups([5, 5, 5], 0) == [range(0, 1), range(1, 2), range(2, 3)]  # 0: per layer


@settings(max_examples=200, deadline=None)
@given(st.lists(st.integers(0, 100), max_size=30), st.integers(0, 300))
def test_plan_groups_covers_every_layer_once_in_order(sizes, min_bytes):
    groups = plan_groups(sizes, min_bytes)
    assert [i for g in groups for i in g] == list(range(len(sizes)))
    for g in groups[:-1]:
        assert sum(sizes[i] for i in g) >= min_bytes


def test_group_waits_needs_one_event_per_group():
    with pytest.raises(ValueError, match="2 groups but 1 events"):
        GroupWaits([[torch.nn.Linear(1, 1)], [torch.nn.Linear(1, 1)]], ["e"], lambda e: None)


# --------------------------------------------------------------------------- partial loading (planning)
def test_plan_partial_keeps_the_longest_prefix_that_fits_with_its_buffers():
    sizes = [10, 10, 10, 10, 10]
    plan = plan_partial(sizes, budget=35)
    assert plan.resident == (0,) and plan.streamed == (1, 2, 3, 4)
    assert plan.buffer_bytes == 20 and plan.charged == 30 and plan.resident_fraction == pytest.approx(0.2)
    full = plan_partial(sizes, budget=50)
    assert full.streamed == () and full.buffer_bytes == 0 and full.resident_fraction == 1.0
    assert plan_partial(sizes, budget=19) is None                  # two buffers of 10 do not fit
    one = plan_partial([10, 10], budget=40, buffers=2)
    assert one.streamed == () and one.charged == 20
    # the largest layer streamed sets the buffer size: keeping it resident can make more fit
    big_first = plan_partial([40, 5, 5, 5], budget=50)
    assert big_first.resident == (0,) and big_first.buffer_bytes == 10 and big_first.charged == 50
    assert plan_partial([5, 5, 5, 40], budget=50) is None          # 40 streamed twice never fits
    with pytest.raises(ValueError, match="budget=-1"):
        plan_partial(sizes, budget=-1)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.integers(0, 50), max_size=20), st.integers(0, 400), st.integers(1, 3))
def test_plan_partial_never_exceeds_the_budget_and_no_longer_prefix_fits(sizes, budget, buffers):
    plan = plan_partial(sizes, budget, buffers)

    def charged(k):
        rest = sizes[k:]
        return sum(sizes[:k]) + (min(buffers, len(rest)) * max(rest) if rest else 0)

    if plan is None:
        assert all(charged(k) > budget for k in range(len(sizes) + 1))
        return
    k = len(plan.resident)
    assert plan.charged == charged(k) <= budget
    assert plan.resident + plan.streamed == tuple(range(len(sizes)))
    assert all(charged(j) > budget for j in range(k + 1, len(sizes) + 1))


def test_a_module_with_a_tied_weight_waits_for_the_group_that_copied_it():
    class Tied(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = torch.nn.Linear(32, 32, bias=False)
            self.mid = torch.nn.Linear(32, 32)
            self.head = torch.nn.Linear(32, 32, bias=False)
            self.head.weight = self.embed.weight

        def forward(self, x):
            return self.mid(self.head(x))           # the tied head runs before the module that owns it

    tr, store = FakeTransport(), HostCopies()
    net = _on_device(Tied(), tr)
    x = torch.randn(2, 32)
    expected = net(x)
    offload_module(store, tr, "m", net)
    restore_module(store, tr, "m", net, "fake:0", group_bytes=1)
    assert net.head.weight is net.embed.weight and tr.on_device(net.head.weight)
    out = net(x)
    assert tr.waited[0] == "event0"                 # the head waited for the embedding's copy
    assert torch.equal(out, expected)


# --------------------------------------------------------------------------- partial loading (streaming)
class _Lane(FakeTransport):
    """One copy lane of the fake device; the meter counts what the module points at on the card."""

    def __init__(self, name, meter):
        super().__init__()
        self.name, self.meter = name, meter

    def to_device(self, t, where):
        c = t.detach().clone()
        self.meter["alive"].append(c)                # kept, so no host tensor ever reuses its address
        self.meter["made"].add(c.data_ptr())
        return c

    def on_device(self, t):
        return t.numel() > 0 and t.data_ptr() in self.meter["made"]

    def mark(self):                                  # a layer's copies were queued and bound: count the card
        if "net" in self.meter:
            self.meter["peak"] = max(self.meter["peak"], _on_card(self.meter))
        return f"{self.name}:{super().mark()}"


def _partial_setup(budget, depth=6, width=16):
    from gpuctx.device.partial import place_partial

    net = _net(width=width, depth=depth)            # on the host, as a partial loader returns it
    x = torch.randn(3, width)
    expected = net(x)
    meter = {"made": set(), "alive": [], "peak": 0}
    lanes = [_Lane("a", meter), _Lane("b", meter)]
    handle = place_partial(net, budget, lanes, "fake:0", pin=lambda t: t.clone())
    meter["net"] = weakref.ref(net)
    return net, x, expected, lanes, meter, handle


def _on_card(meter):
    net = meter["net"]()
    return sum(p.numel() * p.element_size() for p in net.parameters() if p.data_ptr() in meter["made"])


def test_a_partial_model_runs_with_its_prefix_resident_and_the_rest_streamed_within_budget():
    layer = 16 * 16 * 4 + 16 * 4                    # 1088 bytes per Linear
    net, x, expected, lanes, meter, handle = _partial_setup(budget=4 * layer)
    plan = handle.plan
    assert plan.resident == (0, 1) and plan.streamed == (2, 3, 4, 5)
    assert plan.buffer_bytes == 2 * layer and plan.charged == 4 * layer
    assert plan.resident_fraction == pytest.approx(2 / 6)
    assert _on_card(meter) == 2 * layer              # only the prefix went to the card
    with torch.no_grad():                            # inference: nothing keeps a streamed copy alive
        for _ in range(3):
            assert torch.equal(net(x), expected)
    assert handle.streamer.peak == 2 and handle.streamer.fetches == 12
    assert meter["peak"] == plan.charged <= 4 * layer   # in-flight copies included, never above the budget
    assert _on_card(meter) == 2 * layer              # every streamed layer went back after its forward
    assert not handle.streamer.on_card
    waited = lanes[0].waited                         # the computing stream waited per streamed layer
    assert len(waited) == 12 and {w.split(":")[0] for w in waited} == {"a", "b"}
    # each lane's next copy waited (on the host) for the compute of the layer it copied before:
    # 12 fetches, 6 per lane, all but each lane's first
    assert len(lanes[0].blocked) == len(lanes[1].blocked) == 5
    assert all(e.startswith("done") for e in lanes[0].blocked + lanes[1].blocked)
    handle.remove()
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in net.modules())


def test_a_partial_model_whose_buffers_alone_do_not_fit_is_refused_unchanged():
    net, x, expected, lanes, meter, handle = _partial_setup(budget=1000)
    assert handle is None and not meter["made"]
    assert all(not m._forward_pre_hooks for m in net.modules())
    assert torch.equal(net(x), expected)


def test_tied_weights_stay_resident_in_a_partial_model():
    from gpuctx.device.partial import partial_layers

    m = torch.nn.Module()
    m.a = torch.nn.Linear(4, 4, bias=False)
    m.b = torch.nn.Linear(4, 4, bias=False)
    m.b.weight = m.a.weight
    layers, shared = partial_layers(m)
    assert [len(items) for _, items in layers] == [0, 0] and len(shared) == 1


# --------------------------------------------------------------------------- the engine with a streaming fake device
class StreamingDevice(gpuctx.device.CpuDevice):
    """A CPU device that offloads, restores and places partial models through the real module code
    (``hostcopy``, ``partial``) on a fake transport: what CudaDevice does, minus CUDA."""

    def __init__(self, budget: int) -> None:
        super().__init__(budget=budget)
        self.name = "streaming"
        self.meter = {"made": set(), "alive": [], "peak": 0}
        self.tr = _Lane("a", self.meter)
        self.lanes = [self.tr, _Lane("b", self.meter)]
        self.store = HostCopies()
        self.placed: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()

    @property
    def host_budget(self):
        return self.store.budget

    @host_budget.setter
    def host_budget(self, value):
        self.store.budget = value

    def can_offload(self, obj):
        return isinstance(obj, torch.nn.Module)

    def offload(self, context, obj):
        handle = self.placed.pop(obj, None)
        if handle is not None:
            handle.remove()
        offload_module(self.store, self.tr, context, obj)
        return obj

    def restore(self, context, obj):
        restore_module(self.store, self.tr, context, obj, "fake:0", group_bytes=1)
        return obj

    def place_partial(self, context, obj, nbytes):
        from gpuctx.device.partial import place_partial

        self.store.forget(obj)
        handle = place_partial(obj, nbytes, self.lanes, "fake:0", pin=lambda t: t.clone())
        if handle is None:
            return None
        self.placed[obj] = handle
        self.meter["net"] = weakref.ref(obj)
        return handle.plan.resident_fraction


def test_a_partial_model_runs_through_the_scheduler_within_budget_and_status_shows_its_fraction():
    from gpuctx.engine import Config, Scheduler, TaskSpec
    from gpuctx.status import Status

    layer = 16 * 16 * 4 + 16 * 4
    dev = StreamingDevice(budget=5 * layer)        # big's share (4 layers) and small (2) do not fit together
    sched = Scheduler(Config(safety_factor=1.0), device=dev)
    x = torch.randn(2, 16)
    with torch.no_grad():
        expected = _net(width=16, depth=6)(x)

    def run(v):
        with torch.no_grad():
            return gpuctx.current_model()(v)

    try:
        sched.register_model("big", lambda: _net(width=16, depth=6), vram=4 * layer, partial=True)
        sched.register_model("small", lambda: _on_device(torch.nn.Linear(16, 16), dev.tr), vram=2 * layer)
        for model in ("big", "small", "big"):
            out = sched.submit(TaskSpec(fn=run, name="f", model=model), (x,), {}).result(30)
            if model == "big":
                assert torch.equal(out, expected)
                status = Status.of(sched)
                row = next(m for m in status.models if m.name == "big")
                assert row.resident_fraction == pytest.approx(2 / 6) and "partial 33% resident" in str(status)
                assert "resident (33% resident)" in status._repr_html_()
                assert row.used == 4 * layer
        kinds = [(e.kind, e.model) for e in sched.trace.events if e.kind in ("offload", "restore", "load_end")]
        assert kinds == [("load_end", "big"), ("offload", "big"), ("load_end", "small"), ("offload", "small"),
                         ("restore", "big")]
        assert dev.meter["peak"] <= 4 * layer         # on the card: the prefix and the in-flight layers, in its share
        assert max(e.vram or 0 for e in sched.trace.events) <= 5 * layer
    finally:
        sched.shutdown()


def test_partial_needs_a_declared_share_and_on_the_cpu_device_loads_whole(fresh):
    with pytest.raises(gpuctx.ConfigError, match=r"partial=True with vram=None: expected partial=True with vram="):
        gpuctx.model("p", partial=True)(lambda: None)
    with pytest.raises(gpuctx.ConfigError, match=r"partial='yes'"):
        gpuctx.model("p", vram="1MB", partial="yes")(lambda: None)

    @gpuctx.model("whole", vram=900, partial=True)
    def load():
        return torch.nn.Linear(16, 16)             # 1088 bytes: more than its declared share

    @gpuctx.gpu_task(model="whole")
    def f(v):
        return gpuctx.current_model()(v).shape

    with pytest.warns(RuntimeWarning, match=r"measured 1.09 kB at load, more than 10% above the declared vram=900"):
        assert f(torch.randn(1, 16)).result(30) == (1, 16)
    row = next(m for m in gpuctx.status().models if m.name == "whole")
    assert row.resident_fraction is None and row.used == 1088   # the fallback: all of it, counted


# --------------------------------------------------------------------------- graphs that survive a restore (detection only)
class _FakeDriver:
    def __init__(self, init=0, attribute=0, value=1):
        self.init, self.attribute, self.value = init, attribute, value

    def cuInit(self, flags):
        return self.init

    def cuDeviceGet(self, ptr, index):
        ptr._obj.value = index
        return 0

    def cuDeviceGetAttribute(self, ptr, attr, dev):
        assert attr == 102
        ptr._obj.value = self.value
        return self.attribute


def test_vmm_support_is_detected_and_every_missing_piece_is_a_reason_not_an_error():
    from types import SimpleNamespace

    from gpuctx.device.cuda import vmm_support

    ok, why = vmm_support(0, _FakeDriver())
    assert ok and "captured again" in why
    assert vmm_support(0, _FakeDriver(value=0)) == (False, "the device does not support virtual memory management")
    assert vmm_support(0, _FakeDriver(init=3)) == (False, "cuInit failed")
    assert vmm_support(0, _FakeDriver(attribute=1))[1].endswith("(too old)")
    old_driver = SimpleNamespace(cuInit=lambda f: 0, cuDeviceGet=lambda p, i: 0)
    assert vmm_support(0, old_driver)[1].startswith("the driver library lacks an entry point")
    ok, why = vmm_support(0)                       # this machine: whatever it has, never an exception
    assert isinstance(ok, bool) and why


def test_the_gpu_bench_lists_the_switch_rows_and_imports_without_cuda():
    import subprocess
    import sys
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(root / "bench" / "gpu.py"), "--help"], capture_output=True, text=True,
                         timeout=60, cwd=root)
    assert out.returncode == 0 and "--switch" in out.stdout
    sys.path.insert(0, str(root / "bench"))
    try:
        import gpu_switch
    finally:
        sys.path.remove(str(root / "bench"))
    assert callable(gpu_switch.switch_rows)


def test_restoring_a_resident_module_keeps_its_clean_copy():
    tr, store = FakeTransport(), HostCopies()
    net = _on_device(_net(), tr)
    _cycle(store, tr, net)
    assert restore_module(store, tr, "m", net, "fake:0") is None   # nothing on the host to bring back
    assert store.clean_copies() == _bytes(net)
    assert offload_module(store, tr, "m", net) is True


def test_a_failed_copy_leaves_the_module_on_the_device_and_gives_its_bytes_back():
    class Failing(FakeTransport):
        def to_host(self, t):
            raise RuntimeError("pinning refused")

    tr, store = Failing(), HostCopies()
    net = _on_device(_net(), tr)
    with pytest.raises(RuntimeError, match="pinning refused"):
        offload_module(store, tr, "m", net)
    assert store.used == 0 and store.get(net) is None
    assert all(tr.on_device(p) for p in net.parameters())


def test_the_engine_evicts_a_restored_unmodified_model_for_free():
    from gpuctx.engine import Config, Scheduler, TaskSpec

    dev = StreamingDevice(budget=10**6)
    sched = Scheduler(Config(safety_factor=1.0), device=dev)
    x = torch.randn(2, 16)

    def run(v):
        with torch.no_grad():
            return gpuctx.current_model()(v)

    try:
        sched.register_model("m", lambda: _on_device(_net(), dev.tr), vram=10**5)
        expected = sched.submit(TaskSpec(fn=run, name="f", model="m"), (x,), {}).result(30)
        for _ in range(2):
            assert sched.evict("m") == ["m"] and sched.slot("m").state == "offloaded"
            assert torch.equal(sched.submit(TaskSpec(fn=run, name="f", model="m"), (x,), {}).result(30), expected)
        assert sched.evict("m") == ["m"]
        assert dev.store.free_evictions == 2 and dev.store.copy_backs == 0   # only the first eviction copied
    finally:
        sched.shutdown()


def test_a_state_dict_of_a_model_still_arriving_waits_for_the_last_copy():
    tr, store = FakeTransport(), HostCopies()
    net = _on_device(_net(), tr)
    offload_module(store, tr, "m", net)
    waits = restore_module(store, tr, "m", net, "fake:0", group_bytes=1)
    net.state_dict()
    assert tr.waited == ["event3"] and waits.active     # the forward hooks stay for the forwards
    net(torch.randn(1, 16))
    assert not waits.active and not net._state_dict_pre_hooks
