"""The scheduler on a real GPU: contexts on their own streams, a tensor handed over by a Task dependency."""

from __future__ import annotations

import contextlib

import pytest

torch = pytest.importorskip("torch")

import gpuctx  # noqa: E402

pytestmark = pytest.mark.gpu
TIMEOUT = 120


def test_two_models_pass_a_tensor_through_a_dependency(cuda):
    torch.manual_seed(0)
    seen: dict[str, object] = {}

    @gpuctx.model("a", vram="1GB")
    def load_a():
        return torch.nn.Linear(1024, 1024).cuda()

    @gpuctx.model("b", vram="1GB")
    def load_b():
        return torch.nn.Linear(1024, 1024).cuda()

    @gpuctx.gpu_task(model="a")
    def produce(x):
        seen["a"] = (torch.cuda.current_stream().cuda_stream, gpuctx.current_model())
        with torch.no_grad():
            y = x
            for _ in range(30):                # many kernels: a consumer that does not wait reads early
                y = torch.tanh(gpuctx.current_model()(y))
            return y

    @gpuctx.gpu_task(model="b")
    def consume(y):
        seen["b"] = (torch.cuda.current_stream().cuda_stream, gpuctx.current_model())
        with torch.no_grad():
            return gpuctx.current_model()(y)

    x = torch.randn(8192, 1024, device="cuda")
    torch.cuda.synchronize()
    p = produce(x)
    c = consume(p)
    assert isinstance(c, gpuctx.Task)
    got = c.result(TIMEOUT)

    stream_a, model_a = seen["a"]
    stream_b, model_b = seen["b"]
    assert stream_a == gpuctx.get_stream("a").cuda_stream
    assert stream_b == gpuctx.get_stream("b").cuda_stream
    assert stream_a != stream_b != torch.cuda.default_stream().cuda_stream
    with torch.no_grad():
        y = x
        for _ in range(30):
            y = torch.tanh(model_a(y))
        expected = model_b(y)
    assert torch.allclose(got, expected, atol=1e-5)


def test_auto_size_is_measured_and_eviction_offloads_to_host(cuda):
    @gpuctx.model("net", vram="auto")
    def load():
        return torch.nn.Linear(4096, 4096).cuda()

    x = torch.randn(4, 4096, device="cuda")
    torch.cuda.synchronize()

    @gpuctx.gpu_task(model="net")
    def use(x):
        with torch.no_grad():
            return gpuctx.current_model()(x)

    first = use(x).result(TIMEOUT)
    slot = gpuctx.scheduler().slot("net")
    params = 4096 * 4096 * 4 + 4096 * 4
    assert slot.size_source == "measured" and abs(slot.size - params) <= 0.05 * params
    assert gpuctx.evict("net") == ["net"]
    assert gpuctx.scheduler().slot("net").state == "offloaded"
    again = use(x).result(TIMEOUT)
    assert torch.allclose(first, again, atol=1e-6)       # the same weights came back
    assert gpuctx.stats()["models"]["net"]["restores"] == 1


def _long_chain(x: "torch.Tensor", n: int = 40) -> "torch.Tensor":
    """Many kernels over a large tensor: milliseconds of queued work that a racing reader would miss."""
    for _ in range(n):
        x = torch.sin(x) * 1.0001 + 0.5
    return x


def test_a_task_waits_for_what_the_caller_queued_on_its_own_stream(cuda):
    @gpuctx.gpu_task(model="reader", vram="2GB")
    def read(x):
        return x.clone()

    for _ in range(3):
        x = _long_chain(torch.randn(64 * 2**20, device="cuda"))   # queued on the default stream, not finished
        got = read(x).result(TIMEOUT)
        torch.cuda.synchronize()
        assert torch.equal(got, x)


def test_result_returns_only_once_the_producing_stream_is_done(cuda):
    @gpuctx.gpu_task(model="slow", vram="2GB")
    def produce(seed):
        g = torch.Generator(device="cuda").manual_seed(seed)
        return _long_chain(torch.randn(64 * 2**20, device="cuda", generator=g))

    t = produce(7)
    value = t.result(TIMEOUT)
    assert t._event is not None and t._event.query(), "result() returned before the producer's stream reached its event"
    g = torch.Generator(device="cuda").manual_seed(7)
    assert torch.equal(value, _long_chain(torch.randn(64 * 2**20, device="cuda", generator=g)))


def test_eviction_gives_the_memory_back_as_nvml_sees_it(cuda):
    pynvml = pytest.importorskip("pynvml")
    handle = gpuctx.scheduler().device._nvml_handle          # this card, found by its UUID
    if handle is None:
        pytest.skip("NVML does not see this card (MIG slice or no NVML): cudaMemGetInfo is used instead")

    @gpuctx.model("big", vram="auto", offload=False)
    def load():
        return torch.nn.Sequential(*[torch.nn.Linear(8192, 8192, bias=False) for _ in range(8)]).cuda()   # 2.1 GB

    @gpuctx.gpu_task(model="big")
    def touch(x):
        with torch.no_grad():
            return gpuctx.current_model()(x).sum()

    touch(torch.randn(4, 8192, device="cuda")).result(TIMEOUT)
    size = gpuctx.scheduler().slot("big").size
    assert size >= 2 * 10**9
    free_before = pynvml.nvmlDeviceGetMemoryInfo(handle).free
    assert gpuctx.evict("big") == ["big"]
    free_after = pynvml.nvmlDeviceGetMemoryInfo(handle).free
    assert free_after - free_before >= 0.9 * size
    assert gpuctx.scheduler().slot("big").state == "absent"


def test_out_of_memory_in_a_task_evicts_idle_models_and_retries(cuda):
    free = torch.cuda.mem_get_info(0)[0]

    @gpuctx.model("hog", vram="auto", offload=False)
    def load_hog():
        return torch.empty(int(free * 0.6), dtype=torch.uint8, device="cuda")

    @gpuctx.gpu_task(model="hog")
    def warm():
        return gpuctx.current_model().numel()

    calls = []

    @gpuctx.gpu_task(model="worker", vram="1GB")      # declares far less than it takes: a real OOM follows
    def big(n):
        calls.append(n)
        x = torch.empty(n, dtype=torch.uint8, device="cuda")
        x.random_()
        out = int(x[:1000].sum())
        del x
        return out

    assert warm().result(TIMEOUT) == int(free * 0.6)
    assert gpuctx.scheduler().slot("hog").state == "resident"
    assert big(int(free * 0.5)).result(TIMEOUT) > 0
    assert len(calls) == 2, "the first attempt must have run out of memory and the retry succeeded"
    assert gpuctx.scheduler().slot("hog").state == "absent"
    kinds = [e.kind for e in gpuctx.scheduler().trace.events]
    assert "oom_retry" in kinds and kinds.index("oom_retry") < len(kinds) - 1


def test_out_of_memory_that_cannot_be_recovered_fails_only_that_task(cuda):
    total = torch.cuda.mem_get_info(0)[1]

    @gpuctx.gpu_task(model="greedy", vram="1GB")
    def too_big():
        return torch.empty(2 * total, dtype=torch.uint8, device="cuda")

    @gpuctx.gpu_task(model="greedy", vram="1GB")
    def small(x):
        return (x * 2).sum()

    t = too_big()
    with pytest.raises(gpuctx.GpuOutOfMemory, match=r"budget .*committed .*residents"):
        t.result(TIMEOUT)
    x = torch.randn(1000, device="cuda")
    assert torch.allclose(small(x).result(TIMEOUT), (x * 2).sum())


def _graph_task(model: str, width: int):
    """A 4-layer MLP registered as ``model`` (size measured) and a cuda_graph=True task running it."""
    def load():
        layers = []
        for _ in range(4):
            layers += [torch.nn.Linear(width, width), torch.nn.Tanh()]
        return torch.nn.Sequential(*layers).cuda().eval()

    gpuctx.model(model, vram="auto")(load)

    def infer(x):
        with torch.no_grad():
            return gpuctx.current_model()(x)

    return gpuctx.gpu_task(model=model, cuda_graph=True, name="infer")(infer)


def test_cuda_graph_tasks_replay_and_match_eager(cuda):
    infer = _graph_task("mlp", 256)
    xs = [torch.randn(32, 256, device="cuda") for _ in range(5)]
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")                    # no eager fallback warning
        outs = [t.result(TIMEOUT) for t in [infer(x) for x in xs]]
    net = gpuctx.scheduler().slot("mlp").obj
    with torch.no_grad():
        for x, out in zip(xs, outs):
            assert torch.allclose(out, net(x), atol=1e-5)
    runners = list(gpuctx.scheduler()._graph_runners.values())
    assert len(runners) == 1 and len(runners[0].cache) == 1


def test_work_after_a_session_waits_for_what_the_session_queued(cuda):
    gpuctx.model("sess", vram="2GB")(lambda: "resident")
    seed = torch.randn(64 * 2**20, device="cuda")
    for _ in range(3):
        with gpuctx.context_session("sess"):
            assert torch.cuda.current_stream().cuda_stream == gpuctx.get_stream("sess").cuda_stream
            y = _long_chain(seed)                       # queued on the session's stream, not finished
        seen = y.clone()                                # on the default stream, right after the block
        torch.cuda.synchronize()
        assert torch.equal(seen, y)


def test_captured_graph_calls_are_launched_at_submit_and_ordered_like_any_task(cuda):
    infer = _graph_task("mlp2", 512)
    x0 = torch.randn(64, 512, device="cuda")
    infer(x0).result(TIMEOUT)                             # first call: loaded and captured on the worker
    net = gpuctx.scheduler().slot("mlp2").obj
    for i in range(6):
        x = _long_chain(torch.randn(64, 512, device="cuda"), 200)   # still running on the default stream
        with torch.no_grad() if i % 2 else contextlib.nullcontext():  # the caller's grad mode does not matter
            t = infer(x)
        assert t.done(), "a replay of a captured graph is launched before the call returns"
        out = t.result(TIMEOUT)
        with torch.no_grad():
            assert torch.allclose(out, net(x), atol=1e-5)
    assert not gpuctx.scheduler().slot("mlp2").busy
