"""Issue 18 on a real GPU: free eviction, pipelined restore, partial loading (marked gpu; skipped without CUDA).

Random data everywhere, so a forward that runs before its weights arrived shows up as a wrong value.
"""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from gpuctx.device.cuda import CudaDevice, vmm_support  # noqa: E402

pytestmark = pytest.mark.gpu
MiB = 2**20


@pytest.fixture()
def dev():
    d = CudaDevice(0)
    yield d
    d.close()


def _mlp(width: int = 2048, depth: int = 8) -> torch.nn.Module:
    layers: list[torch.nn.Module] = []
    for _ in range(depth):
        layers += [torch.nn.Linear(width, width), torch.nn.ReLU()]
    return torch.nn.Sequential(*layers).cuda().eval()


def _copy(module):
    return [t.detach().clone() for t in [*module.parameters(), *module.buffers()]]


def test_an_unmodified_model_is_evicted_without_a_copy_and_comes_back_bit_exact(dev):
    net = _mlp()
    x = torch.randn(64, 2048, device="cuda")
    with torch.no_grad():
        expected = net(x)
    dev.offload("m", net)
    dev.restore("m", net)
    with dev.stream_scope("m"), torch.no_grad():
        out = net(x)                                     # waits per group on the GPU
    torch.cuda.synchronize()
    assert torch.equal(out, expected)
    copies = dev.host_copies
    before = copies.free_evictions
    dev.offload("m", net)
    assert copies.free_evictions == before + 1
    assert all(p.is_pinned() for p in net.parameters())
    host = [p.data_ptr() for p in net.parameters()]
    dev.restore("m", net)
    dev.offload("m", net)                                # no forward ran: the hooks go, the last copy is waited for
    assert [p.data_ptr() for p in net.parameters()] == host   # the same pinned buffers, not new ones
    dev.restore("m", net)
    with dev.stream_scope("m"), torch.no_grad():
        assert torch.equal(net(x), expected)


def test_a_modified_model_is_copied_back_bit_exact(dev):
    net = _mlp(depth=2)
    dev.offload("m", net)
    dev.restore("m", net)
    torch.cuda.synchronize()
    with torch.no_grad():
        net[0].weight.add_(torch.randn_like(net[0].weight))
    now = _copy(net)
    copies = dev.host_copies
    before = copies.copy_backs
    dev.offload("m", net)
    assert copies.copy_backs == before + 1
    assert all(torch.equal(a.cpu(), b.cpu()) for a, b in zip(_copy(net), now))


def test_pipelined_restore_of_a_large_model_matches_a_blocking_one(dev):
    net = _mlp(width=4096, depth=8)                       # 537 MB: 8 groups of 64 MB
    x = torch.randn(256, 4096, device="cuda")
    with torch.no_grad():
        expected = net(x)
    for group_bytes in (None, 32 * MiB):
        dev.restore_group_bytes = group_bytes
        dev.host_copies.keep_clean = False               # a real copy each round
        dev.offload("p", net)
        dev.restore("p", net)
        with dev.stream_scope("p"), torch.no_grad():
            out = net(x)
        torch.cuda.synchronize()
        assert torch.equal(out, expected)
        assert all(not m._forward_pre_hooks for m in net.modules())


def test_a_partial_model_streams_within_its_share(dev):
    net = torch.nn.Sequential(*[torch.nn.Linear(2048, 2048) for _ in range(8)]).eval()   # on the host, 134 MB
    x = torch.randn(32, 2048)
    with torch.no_grad():
        expected = net(x)
    layer = 2048 * 2048 * 4 + 2048 * 4
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated(0)
    fraction = dev.place_partial("part", net, 5 * layer)
    assert fraction == pytest.approx(3 / 8)
    xs = x.cuda()
    torch.cuda.reset_peak_memory_stats(0)
    with dev.stream_scope("part"), torch.no_grad():
        out = net(xs)
    torch.cuda.synchronize()
    assert torch.cuda.max_memory_allocated(0) - base <= 5 * layer + 4 * MiB   # its share, plus a few activations
    assert torch.allclose(out.cpu(), expected, atol=1e-4)
    dev.offload("part", net)
    assert dev.partial_of(net) is None and not any(p.is_cuda for p in net.parameters())


def test_vmm_detection_runs_on_a_real_driver():
    ok, why = vmm_support(0)
    assert isinstance(ok, bool) and why
