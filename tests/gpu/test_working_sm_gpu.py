"""On a real GPU: a task's working memory is measured from the allocator, and contexts with SM
shares run on disjoint SM sets (green contexts). Written without a GPU; not yet run on one."""

from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

import gpuctx  # noqa: E402
from gpuctx.units import MiB  # noqa: E402

pytestmark = pytest.mark.gpu
TIMEOUT = 120


def test_working_memory_is_measured_as_the_allocators_peak_minus_what_was_allocated(cuda):
    @gpuctx.model("m", vram="auto")
    def load():
        return torch.nn.Linear(1024, 1024).cuda()

    @gpuctx.gpu_task(model="m")
    def step(n_mib):
        scratch = torch.empty(n_mib * MiB, dtype=torch.uint8, device="cuda")   # freed when the body ends
        scratch.fill_(1)
        return int(scratch[0].item())

    assert step(256).result(TIMEOUT) == 1
    assert step(64).result(TIMEOUT) == 1
    row = next(r for r in gpuctx.status().models if r.name == "m")
    assert row.working_source == "estimated"
    assert 256 * MiB <= row.working < 256 * MiB + 64 * MiB        # the larger of the two peaks, plus a little
    assert gpuctx.stats()["models"]["m"]["working_measured"] >= 256 * MiB
    assert step(8).result(TIMEOUT) == 1                            # the next task is charged the estimate
    assert gpuctx.stats()["models"]["m"]["working_peak"] >= 256 * MiB


_SMID = r"""
extern "C" __global__ void smid(int* out, int spin) {
    unsigned int id;
    asm volatile("mov.u32 %0, %%smid;" : "=r"(id));
    long long t0 = clock64();
    while (clock64() - t0 < spin) { }
    if (threadIdx.x == 0) out[blockIdx.x] = (int)id;
}
"""


def test_two_contexts_with_sm_shares_run_on_disjoint_sm_sets(cuda):
    from gpuctx.device import green

    why = green.missing(torch)
    if why is not None:
        pytest.skip(f"green contexts unavailable: {why}")
    cp = pytest.importorskip("cupy")
    total = torch.cuda.get_device_properties(0).multi_processor_count
    half = (total // 2) // 8 * 8   # green context SM groups come in multiples of up to 8 SMs
    gpuctx.create_context("left", sm_count=half)
    gpuctx.create_context("right", sm_count=half)
    rows = {r.name: r for r in gpuctx.status().models}
    assert rows["left"].sm.startswith("enforced") and rows["right"].sm.startswith("enforced"), rows
    kernel = cp.RawKernel(_SMID, "smid")
    blocks = 4 * total

    def record(ctx: str) -> set[int]:
        stream = gpuctx.get_stream(ctx)
        out = cp.full(blocks, -1, dtype=cp.int32)
        with cp.cuda.ExternalStream(stream.cuda_stream):
            kernel((blocks,), (32,), (out, 1_000_000))
        stream.synchronize()
        return set(int(x) for x in out.get())

    left, right = record("left"), record("right")
    assert -1 not in left and -1 not in right
    assert len(left) <= half and len(right) <= half
    assert left.isdisjoint(right), f"SM sets overlap: {sorted(left & right)} (pytorch#195378?)"
