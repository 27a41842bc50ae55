"""CudaDevice and the scheduler on a real GPU (marked gpu; skipped without CUDA)."""

from __future__ import annotations

import warnings

import pytest
import torch

import gpuctx
from gpuctx._cuda import CudaDevice
from gpuctx.graphs import make_graph_runner

pytestmark = pytest.mark.gpu
TIMEOUT = 60


@pytest.fixture(scope="module")
def dev():
    d = CudaDevice(0)
    yield d
    d.close()


def test_streams_differ_per_context_and_cupy_shares_torchs(dev):
    a, b = dev.get_stream("a"), dev.get_stream("b")
    assert a.cuda_stream != b.cuda_stream and dev.get_stream("a") is a
    with dev.stream_scope("a"):
        assert torch.cuda.current_stream().cuda_stream == a.cuda_stream
        cp = pytest.importorskip("cupy")
        with dev.stream_scope("a"):
            assert cp.cuda.get_current_stream().ptr == a.cuda_stream


def test_cross_context_event_orders_consumer_after_producer(dev):
    n = 64 * 1024 * 1024
    with dev.stream_scope("producer"):
        x = torch.randn(n, device="cuda")
        for _ in range(20):
            x = x * 1.0001 + 0.5
        expected_ev = dev.record_event("producer")
    dev.wait_event("consumer", expected_ev)
    with dev.stream_scope("consumer"):
        total = x.sum()
    dev.get_stream("consumer").synchronize()
    assert torch.isclose(total, x.sum(), rtol=1e-4)


def test_measured_size_matches_parameter_bytes(dev):
    def load():
        return torch.nn.Sequential(*[torch.nn.Linear(4096, 4096) for _ in range(3)]).cuda()

    model, measured = dev.load("m", load)
    params = sum(p.numel() * p.element_size() for p in model.parameters())
    assert abs(measured - params) <= 0.05 * params
    report = dev.release("m", [model], params)
    del model
    assert report.freed >= 0.9 * params and not report.still_referenced


def test_release_warns_when_still_referenced(dev):
    model, measured = dev.load("r", lambda: torch.nn.Linear(2048, 2048).cuda())
    keep = model
    report = dev.release("r", [model], measured)
    assert report.still_referenced
    del keep, model


def test_oom_is_recognised(dev):
    free = dev.free_now()
    with pytest.raises(Exception) as info:
        torch.empty(free * 2, dtype=torch.uint8, device="cuda")
    assert dev.is_oom(info.value)


def test_offload_restore_round_trip_is_bit_exact(dev):
    model = torch.nn.Sequential(torch.nn.Linear(1024, 1024), torch.nn.BatchNorm1d(1024)).cuda()
    before = [t.detach().clone() for t in list(model.parameters()) + list(model.buffers())]
    dev.offload("o", model)
    assert all(not p.is_cuda and p.is_pinned() for p in model.parameters())
    dev.restore("o", model)
    after = list(model.parameters()) + list(model.buffers())
    assert all(a.is_cuda and torch.equal(a, b) for a, b in zip(after, before))


def test_graph_runner_replays_and_recaptures(dev):
    net = torch.nn.Sequential(torch.nn.Linear(256, 256), torch.nn.ReLU(), torch.nn.Linear(256, 256)).cuda()
    run = make_graph_runner(lambda x: net(x), device=dev, context="g")
    x = torch.randn(32, 256, device="cuda")
    with torch.no_grad():
        eager = net(x)
        out1 = run((x,), {})
        out2 = run((x,), {})
        torch.cuda.synchronize()
        assert torch.allclose(out1, eager, atol=1e-5) and torch.allclose(out2, eager, atol=1e-5)
        run((torch.randn(8, 256, device="cuda"),), {})
    assert len(run.cache) == 2


def test_uncapturable_body_warns_once_and_runs_eagerly(dev):
    def body(x):
        return x * float(x.sum().item())   # a host sync cannot be captured

    run = make_graph_runner(body, device=dev, context="h")
    x = torch.randn(16, device="cuda")
    with pytest.warns(RuntimeWarning, match="capture failed"):
        a = run((x,), {})
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        b = run((x,), {})
    assert torch.allclose(a, b)


def test_scheduler_passes_a_tensor_between_contexts(cuda):
    @gpuctx.gpu_task(model="a", vram="1GB")
    def produce():
        return torch.randn(4096, 4096, device="cuda") + 3.0

    @gpuctx.gpu_task(model="b", vram="1GB")
    def consume(x):
        return x.mean()

    p = produce()
    c = consume(p)
    assert abs(float(c.result(TIMEOUT)) - 3.0) < 0.01
    assert gpuctx.get_stream("a").cuda_stream != gpuctx.get_stream("b").cuda_stream


def test_scheduler_measures_auto_size_and_offloads(cuda):
    @gpuctx.model("net", vram="auto")
    def load():
        return torch.nn.Linear(4096, 4096).cuda()

    @gpuctx.gpu_task(model="net")
    def use():
        return float(gpuctx.current_model()(torch.randn(2, 4096, device="cuda")).sum())

    use().result(TIMEOUT)
    slot = gpuctx.scheduler().slot("net")
    params = 4096 * 4096 * 4 + 4096 * 4
    assert slot.size_source == "measured" and abs(slot.size - params) <= 0.05 * params
    gpuctx.evict("net")
    assert gpuctx.scheduler().slot("net").state == "offloaded"
    use().result(TIMEOUT)
    assert gpuctx.stats()["models"]["net"]["restores"] == 1
