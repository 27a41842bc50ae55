"""The scheduler on a real GPU: contexts on their own streams, a tensor handed over by a Task dependency."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import gpuctx  # noqa: E402

pytestmark = pytest.mark.gpu
TIMEOUT = 120


@pytest.fixture
def cuda():
    """gpuctx on cuda:0 with the whole card as budget; forgotten afterwards."""
    gpuctx.reset()
    gpuctx.configure(device="cuda:0", budget=None)
    yield gpuctx
    gpuctx.reset()


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
