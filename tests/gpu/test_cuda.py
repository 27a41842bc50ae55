"""CudaDevice and the CUDA-graph runner on a real GPU (marked gpu; skipped without CUDA).

Random data everywhere (never zeros), so a read that races a write shows up as a wrong value.
"""

from __future__ import annotations

import threading
import warnings

import pytest

torch = pytest.importorskip("torch")

import gpuctx  # noqa: E402
from gpuctx.device.cuda import CudaDevice  # noqa: E402
from gpuctx.device.graphs import make_graph_runner  # noqa: E402

pytestmark = pytest.mark.gpu
MiB = 2**20


@pytest.fixture(scope="module")
def dev():
    d = CudaDevice(0)
    yield d
    d.close()


def _mlp(width: int = 256, depth: int = 4) -> torch.nn.Module:
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers).cuda().eval()


def _tensors(module: torch.nn.Module) -> list[torch.Tensor]:
    return [*module.parameters(), *module.buffers()]


def _nbytes(module: torch.nn.Module) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(module))


# --------------------------------------------------------------------------- streams and events
def test_streams_differ_per_context_and_are_current_inside_their_scope(dev):
    a, b = dev.get_stream("a"), dev.get_stream("b")
    default = torch.cuda.default_stream(0).cuda_stream
    assert dev.get_stream("a") is a
    assert len({a.cuda_stream, b.cuda_stream, default}) == 3
    with dev.stream_scope("a") as s:
        assert s is a and torch.cuda.current_stream().cuda_stream == a.cuda_stream
        with dev.stream_scope("b"):
            assert torch.cuda.current_stream().cuda_stream == b.cuda_stream
        assert torch.cuda.current_stream().cuda_stream == a.cuda_stream
    assert torch.cuda.current_stream().cuda_stream == default


def test_cupy_runs_on_the_same_stream_as_torch_inside_a_scope(dev):
    cp = pytest.importorskip("cupy")
    a = dev.get_stream("cupy-ctx")
    with dev.stream_scope("cupy-ctx"):
        assert cp.cuda.get_current_stream().ptr == a.cuda_stream
        x = torch.randn(1 << 20, device="cuda")
        y = cp.asarray(x) * 2 + 1            # CuPy kernel queued after torch's, same stream
        z = torch.as_tensor(y, device="cuda")
        total = (z - (x * 2 + 1)).abs().max()
    a.synchronize()
    assert float(total) < 1e-5


def test_cross_context_event_orders_consumer_after_producer(dev):
    n = 64 * 1024 * 1024                      # 256 MB of fp32: the producer runs for milliseconds
    buf = torch.randn(n, device="cuda")
    torch.cuda.synchronize()
    with dev.stream_scope("producer"):
        x = torch.randn(n, device="cuda")
        for _ in range(40):
            x = torch.sin(x) * 1.0001 + 0.5
        buf.copy_(x)
        event = dev.record_event("producer")
    dev.wait_event("consumer", event)
    assert not event.query(), "wait_event must not block the host until the producer is done"
    with dev.stream_scope("consumer"):
        seen = buf.clone()                     # without the wait this reads the old random values
    torch.cuda.synchronize()
    assert torch.equal(seen, buf)


# --------------------------------------------------------------------------- sizes, release, capacity
def test_measured_size_matches_parameter_bytes(dev):
    def load():
        return torch.nn.Sequential(*[torch.nn.Linear(4096, 4096) for _ in range(3)]).cuda()   # ~201 MB

    model, measured = dev.load("m", load)
    params = _nbytes(model)
    assert abs(measured - params) <= 0.05 * params
    holder = [model]
    del model
    dev.release("m", holder, measured)


def test_measured_size_ignores_another_contexts_allocations_meanwhile(dev):
    other: list[torch.Tensor] = []

    def load():
        model = torch.nn.Linear(4096, 4096).cuda()          # 64 MB on this context's stream
        with dev.stream_scope("someone-else"):                # 256 MB on another context's stream
            other.append(torch.randn(64 * MiB, device="cuda"))
        return model

    model, measured = dev.load("m2", load)
    params = _nbytes(model)
    assert abs(measured - params) <= 0.05 * params
    other.clear()
    holder = [model]
    del model
    dev.release("m2", holder, measured)


def test_release_gives_the_memory_back_to_the_driver(dev):
    model, measured = dev.load("r", lambda: torch.nn.Sequential(*[torch.nn.Linear(4096, 4096) for _ in range(3)]).cuda())
    torch.cuda.synchronize()
    free_before = torch.cuda.mem_get_info(0)[0]
    holder = [model]
    del model
    report = dev.release("r", holder, measured)
    free_after = torch.cuda.mem_get_info(0)[0]
    assert not report.still_referenced and holder == []
    assert report.freed >= 0.9 * measured
    assert free_after - free_before >= 0.9 * measured


def test_release_reports_an_outside_reference_at_once(dev):
    model, measured = dev.load("kept", lambda: torch.nn.Linear(2048, 2048).cuda())
    keep = model
    report = dev.release("kept", [model], measured)
    assert report.still_referenced and report.seconds < 1.0   # no waiting for memory that cannot come back
    del keep, model


def test_capacity_counts_our_own_memory_as_ours(dev):
    free, total = torch.cuda.mem_get_info(0)
    cap = dev.capacity()
    assert 0 < cap <= total
    block = torch.empty(1024 * MiB, dtype=torch.uint8, device="cuda")   # ours: must not shrink capacity
    cap_with_block = dev.capacity()
    del block
    dev.empty_caches()
    assert abs(cap_with_block - cap) < 64 * MiB
    assert CudaDevice(0, budget=10**9).capacity() <= 10**9


def test_out_of_memory_is_recognised(dev):
    free = dev.free_now()
    with pytest.raises(Exception) as info:
        torch.empty(free * 2, dtype=torch.uint8, device="cuda")
    assert dev.is_oom(info.value)
    cp = pytest.importorskip("cupy")
    with pytest.raises(Exception) as info:
        cp.empty(free * 2, dtype=cp.uint8)
    assert dev.is_oom(info.value)


def test_cupy_context_limit_is_a_hard_cap(dev):
    cp = pytest.importorskip("cupy")
    dev.set_context_limit("capped", 64 * MiB)
    try:
        with dev.stream_scope("capped"):
            small = cp.random.random(1 << 20)        # 8 MB: fits
            with pytest.raises(Exception) as info:
                cp.empty(128 * MiB, dtype=cp.uint8)
        assert dev.is_oom(info.value)
        del small
    finally:
        dev.set_context_limit("capped", None)


# --------------------------------------------------------------------------- offload and restore
def test_offload_restore_round_trip_is_bit_exact(dev):
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.BatchNorm1d(1024)).cuda()
    model(torch.randn(64, 1024, device="cuda"))              # random running stats in the buffers
    model[0].weight.grad = torch.randn_like(model[0].weight)  # a gradient travels too
    before = [t.detach().clone() for t in _tensors(model)]
    grad = model[0].weight.grad.clone()
    nbytes = _nbytes(model) + grad.numel() * grad.element_size()
    torch.cuda.synchronize()
    allocated = torch.cuda.memory_allocated(0)
    used = dev.host_used

    assert dev.can_offload(model)
    assert dev.offload("o", model) is model
    assert all(not t.is_cuda and t.is_pinned() for t in _tensors(model))
    assert not model[0].weight.grad.is_cuda
    assert torch.cuda.memory_allocated(0) <= allocated - 0.95 * nbytes
    assert dev.host_used - used == nbytes

    assert dev.restore("o", model) is model
    torch.cuda.synchronize()                                  # read directly, not through forward: wait for the copies
    after = _tensors(model)
    assert all(a.is_cuda and torch.equal(a, b) for a, b in zip(after, before))
    assert torch.equal(model[0].weight.grad, grad)
    assert dev.host_used - used == nbytes                     # the clean host copy is kept (free eviction)
    model(torch.randn(8, 1024, device="cuda"))               # still a working module


def test_offload_over_the_host_budget_leaves_the_model_on_the_card(dev):
    model = _mlp(1024, 2)
    dev.host_budget = 1024
    try:
        with pytest.raises(gpuctx.BudgetError, match="host_budget"):
            dev.offload("h", model)
    finally:
        dev.host_budget = None
    assert all(t.is_cuda for t in _tensors(model))


def test_offload_of_a_tensor_returns_what_restore_takes(dev):
    x = torch.randn(1 << 20, device="cuda")
    host = dev.offload("t", x)
    assert not host.is_cuda and host.is_pinned() and torch.equal(host, x.cpu())
    back = dev.restore("t", host)
    assert back.is_cuda and torch.equal(back, x)


# --------------------------------------------------------------------------- CUDA graphs
def test_graph_replays_match_eager_and_a_new_shape_captures_again(dev):
    net = _mlp()
    run = make_graph_runner(lambda x: net(x), device=dev, context="g")
    x = torch.randn(32, 256, device="cuda")
    with torch.no_grad():
        eager = net(x)
        torch.cuda.synchronize()                              # x and eager come from the default stream
        with dev.stream_scope("g"):
            first = run((x,), {})
            second = run((torch.randn(32, 256, device="cuda"),), {})
            third = run((x,), {})
        torch.cuda.synchronize()
        assert torch.allclose(first, eager, atol=1e-5) and torch.allclose(third, eager, atol=1e-5)
        assert not torch.allclose(second, eager)              # outputs are clones, not the shared buffer
        assert len(run.cache) == 1
        y = torch.randn(8, 256, device="cuda")
        out = run((y,), {})                                   # called from the default stream: ordered both ways
        assert torch.allclose(out, net(y), atol=1e-5)
    assert len(run.cache) == 2 and not run.eager_keys


def test_graphs_capture_under_inference_mode(dev):
    net = _mlp()
    run = make_graph_runner(lambda x: net(x), device=dev, context="inf")
    with torch.inference_mode():
        x = torch.randn(16, 256, device="cuda")
        for _ in range(3):
            out = run((x,), {})
        assert torch.allclose(out, net(x), atol=1e-5)
    assert len(run.cache) == 1 and not run.eager_keys


def test_graph_cache_is_lru_bounded_and_dropped_when_weights_move(dev):
    net = _mlp()
    run = make_graph_runner(lambda x: net(x), device=dev, context="lru", cache_size=2)
    with torch.no_grad():
        for batch in (1, 2, 3):
            run((torch.randn(batch, 256, device="cuda"),), {})
        assert len(run.cache) == 2
        dev.load("lru", lambda: None)                         # a new generation: weights may have moved
        x = torch.randn(4, 256, device="cuda")
        assert torch.allclose(run((x,), {}), net(x), atol=1e-5)
    assert len(run.cache) == 1


def test_graph_outputs_without_clones_are_the_static_buffer(dev):
    net = _mlp()
    run = make_graph_runner(lambda x: net(x), device=dev, context="nc", clone_outputs=False)
    with torch.no_grad():
        a = run((torch.randn(16, 256, device="cuda"),), {})
        b = run((torch.randn(16, 256, device="cuda"),), {})
    assert a.data_ptr() == b.data_ptr()


def test_uncapturable_body_warns_once_and_runs_eagerly(dev):
    def body(x):
        return x * float(x.sum().item())                     # a host sync cannot be captured

    run = make_graph_runner(body, device=dev, context="h")
    x = torch.randn(4096, device="cuda")
    with pytest.warns(RuntimeWarning, match=r"cannot run .*body.* as a CUDA graph.*capture failed"):
        a = run((x,), {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = run((x,), {})
    torch.cuda.synchronize()
    assert torch.allclose(a, body(x)) and torch.allclose(b, body(x))
    assert len(run.eager_keys) == 1 and not run.cache
    # The failed capture left the allocator usable: caches empty, and a later capture works.
    dev.empty_caches()
    net = _mlp()
    ok = make_graph_runner(lambda t: net(t), device=dev, context="h")
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("error")
        y = torch.randn(8, 256, device="cuda")
        assert torch.allclose(ok((y,), {}), net(y), atol=1e-5)
    assert len(ok.cache) == 1


def test_non_tensor_output_and_grad_outputs_fall_back_with_a_reason(dev):
    run = make_graph_runner(lambda x: "done", device=dev, context="nt")
    with pytest.warns(RuntimeWarning, match="not CUDA tensors"):
        assert run((torch.randn(4, device="cuda"),), {}) == "done"
    net = _mlp()
    run = make_graph_runner(lambda x: net(x), device=dev, context="grad")
    with pytest.warns(RuntimeWarning, match="require grad"):
        out = run((torch.randn(4, 256, device="cuda"),), {})
    assert out.requires_grad


def test_graph_runners_on_several_contexts_from_threads(dev):
    nets = [_mlp() for _ in range(4)]
    runs = [make_graph_runner(lambda x, n=n: n(x), device=dev, context=f"t{i}") for i, n in enumerate(nets)]
    xs = [torch.randn(32, 256, device="cuda") for _ in nets]
    torch.cuda.synchronize()
    outs: list = [None] * 4

    def work(i: int) -> None:
        with torch.no_grad(), dev.stream_scope(f"t{i}"):
            for _ in range(20):
                outs[i] = runs[i]((xs[i],), {})
        dev.get_stream(f"t{i}").synchronize()

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    with torch.no_grad():
        for net, x, out in zip(nets, xs, outs):
            assert torch.allclose(out, net(x), atol=1e-5)
