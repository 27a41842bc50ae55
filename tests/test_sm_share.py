"""SM shares per context (issue 19, the CPU part): admission keeps the shares running at once within
1.0, the fallback warns once and says "not enforced", and status, explain and the timeline show it."""

from __future__ import annotations

import warnings

import pytest

import gpuctx
from gpuctx import policy
from gpuctx.device import CpuDevice
from gpuctx.engine import Config, Scheduler, TaskSpec, VirtualDriver
from gpuctx.errors import ConfigError
from gpuctx.policy import SlotView, Snapshot
from gpuctx.trace import row_labels
from gpuctx.units import GB


def _snap(*views: SlotView) -> Snapshot:
    return Snapshot(now=0.0, budget=10 * GB, slots=views)


def _ready(name: str, share: float | None) -> SlotView:
    return SlotView(name, size=1 * GB, state=policy.RESIDENT, used=1 * GB, queued=1, sm_share=share)


# --------------------------------------------------------------------------- the arithmetic
def test_sm_fits_adds_the_shares_of_the_groups_running_at_once():
    busy = SlotView("batch", size=0, busy=True, sm_share=0.75)
    assert policy.sm_fits(_snap(busy), _ready("asr", 0.25))
    assert not policy.sm_fits(_snap(busy), _ready("asr", 0.5))
    assert policy.sm_fits(_snap(busy), _ready("free", None))             # no share: uses the rest
    two = _snap(SlotView("y", size=0, sm_share=0.6), _ready("x", 0.5))
    assert policy.sm_fits(two, _ready("x", 0.5))                          # y is idle: not running
    assert not policy.sm_fits(two, _ready("x", 0.5), started=["y"])       # ...unless this plan starts it
    assert policy.sm_in_use(_snap(busy, SlotView("z", size=0, busy=True))) == 0.75


@pytest.mark.parametrize("shares, together", [((0.6, 0.6), False), ((0.5, 0.5), True), ((0.7, None), True)])
def test_plan_starts_groups_only_while_their_shares_stay_within_one(shares, together):
    a, b = _ready("a", shares[0]), _ready("b", shares[1])
    started = [s.slot for s in policy.plan(_snap(a, b))]
    assert len(started) == (2 if together else 1)


def test_sm_explain_gives_the_numbers():
    snap = _snap(SlotView("batch", size=0, busy=True, sm_share=0.75), _ready("asr", 0.5))
    text = policy.sm_explain(snap, "asr", 0.5)
    assert "batch 0.75" in text and "asks 0.50" in text and "1.25" in text and "exceeds 1.0" in text
    assert "fits" in policy.sm_explain(snap, "asr", 0.25)


# --------------------------------------------------------------------------- the engine
def _timed(driver, seconds, log, tag):
    log.append((tag, driver.clock(), "start"))
    driver.sleep(seconds)
    log.append((tag, driver.clock(), "end"))


def _run_two(shares: tuple[float | None, float | None]) -> list:
    driver = VirtualDriver()
    s = Scheduler(Config(budget=10 * GB, safety_factor=1.0, device="cpu"), device=CpuDevice(10 * GB), driver=driver)
    log: list = []
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", RuntimeWarning)   # "not enforced" on the CPU: tested below
            for name, share in zip("ab", shares):
                s.create_context(name, sm_share=share)
        for i in range(3):
            for name in "ab":
                s.submit(TaskSpec(fn=_timed, name=f"t{name}", model=name), (driver, 1.0, log, name), {})
        driver.run_until_idle()
    finally:
        s.shutdown(wait=False, cancel_pending=True)
    return log


def _overlap(log: list) -> bool:
    spans = {}
    for tag, t, kind in log:
        spans.setdefault(tag, []).append(t)
    a, b = spans["a"], spans["b"]
    return any(a[i] < b[j + 1] and b[j] < a[i + 1] for i in range(0, len(a), 2) for j in range(0, len(b), 2))


def test_contexts_whose_shares_exceed_one_together_never_run_at_once():
    assert not _overlap(_run_two((0.6, 0.6)))
    assert _overlap(_run_two((0.5, 0.5)))
    assert _overlap(_run_two((0.9, None)))   # a context without a share uses the rest


def test_the_share_is_accepted_with_one_warning_and_shown_as_not_enforced(fresh):
    with pytest.warns(RuntimeWarning, match="not enforced") as caught:
        gpuctx.create_context("asr", sm_share=0.25)
        gpuctx.create_context("batch", sm_share=0.75)

        @gpuctx.model("enc", vram="1GB", sm_count=8)
        def load():
            return "enc"
    assert len([w for w in caught if "sm_share" in str(w.message)]) == 1
    rows = {r.name: r for r in gpuctx.status().models}
    assert rows["asr"].sm_share == 0.25 and rows["batch"].sm_share == 0.75
    assert rows["asr"].sm.startswith("not enforced: the CPU device has no SMs")
    assert rows["enc"].sm_share is None and "not enforced" in rows["enc"].sm   # a count without an SM total
    text = str(gpuctx.status())
    assert "SM 0.25 (not enforced" in text and "SM 0.75 (not enforced" in text
    assert "SM share" in gpuctx.status()._repr_html_()


def test_explain_says_when_a_share_does_not_fit_beside_what_runs(fresh, gate):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        gpuctx.create_context("batch", sm_share=0.75)
        gpuctx.create_context("asr", sm_share=0.5)
    release = gate()
    started = gate()

    @gpuctx.gpu_task(model="batch", vram="1GB")
    def batch():
        started.set()
        release.wait(10)

    t = batch()
    assert started.wait(10)
    text = gpuctx.explain("asr", "1GB")
    assert text.startswith("waits: SM shares running: batch 0.75") and "1.25 exceeds 1.0" in text
    release.set()
    t.result(10)
    assert gpuctx.explain("asr", "1GB").startswith("admitted now") and "fits" in gpuctx.explain("asr", "1GB")


def test_the_timeline_rows_show_each_contexts_share(fresh):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        gpuctx.create_context("asr", sm_share=0.25)
    events = gpuctx.scheduler().trace.events
    assert row_labels(events, ["asr", "llm"]) == ["asr · SM 0.25 (not enforced)", "llm"]


@pytest.mark.parametrize("kw, match", [
    (dict(sm_share=0), "sm_share=0"), (dict(sm_share=1.5), "sm_share=1.5"), (dict(sm_share="half"), "sm_share='half'"),
    (dict(sm_share=True), "sm_share=True"), (dict(sm_count=0), "sm_count=0"), (dict(sm_count=2.5), "sm_count=2.5"),
    (dict(sm_share=0.5, sm_count=4), "give one of them"),
])
def test_bad_sm_settings_are_refused_and_nothing_is_created(fresh, kw, match):
    with pytest.raises(ConfigError, match=match):
        gpuctx.create_context("ctx", **kw)
    with pytest.raises(ConfigError, match=match):
        gpuctx.model("m", vram="1GB", **kw)
    assert not {"ctx", "m"} & {s.name for s in gpuctx.scheduler().slots()}


def test_without_torch_the_missing_green_contexts_are_named():
    from gpuctx.device import green

    assert "no CUDA-enabled torch" in green.missing(None)


# --------------------------------------------------------------------------- the CUDA side, on fakes
class _Stream:
    def __init__(self, name: str) -> None:
        self.name, self.waited = name, []

    def wait_stream(self, other) -> None:
        self.waited.append(other)


def _fake_cuda_device(green_contexts):
    from types import SimpleNamespace

    from gpuctx.device import cuda as _cuda

    props = SimpleNamespace(multi_processor_count=132)
    torch = SimpleNamespace(__version__="9.9", __name__="faketorch", _C=SimpleNamespace(_cuda_getDriverVersion=lambda: 12080),
                            cuda=SimpleNamespace(green_contexts=green_contexts, get_device_properties=lambda i: props))
    dev = object.__new__(_cuda.CudaDevice)
    dev._setup(0, torch, None, None, None)
    return dev


def test_a_cuda_context_stream_comes_from_a_green_context_with_that_many_sms():
    from types import SimpleNamespace

    made = []

    class GreenContext:
        def __init__(self, num_sms):
            self.num_sms = num_sms

        @staticmethod
        def create(num_sms, device_id):
            made.append((num_sms, device_id))
            return GreenContext(num_sms)

        def Stream(self):  # noqa: N802 - torch's name
            return _Stream(f"green{self.num_sms}")

    dev = _fake_cuda_device(SimpleNamespace(SUPPORTED=True, GreenContext=GreenContext))
    old = dev._streams["asr"] = _Stream("old")
    enforced, why = dev.partition("asr", 0.25, None)
    assert enforced == "enforced (green context, 33 of 132 SMs)" and why == ""
    assert made == [(33, 0)] and dev.get_stream("asr").name == "green33"
    assert dev.get_stream("asr").waited == [old]   # what was queued on the old stream comes first
    assert dev.partition("llm", None, 64)[0].startswith("enforced (green context, 64 of 132")


def test_a_cuda_device_without_green_contexts_says_what_is_missing():
    from types import SimpleNamespace

    def refuse(**_):
        raise RuntimeError("CUDA_ERROR_NOT_SUPPORTED")

    cases = [
        (SimpleNamespace(SUPPORTED=False), "built without green context support"),
        (SimpleNamespace(SUPPORTED=True, GreenContext=object), "makes no streams"),
        (SimpleNamespace(SUPPORTED=True, GreenContext=SimpleNamespace(Stream=None, create=refuse)),
         "green context of 66 SMs failed: RuntimeError: CUDA_ERROR_NOT_SUPPORTED"),
    ]
    for module, why in cases:
        dev = _fake_cuda_device(module)
        enforced, said = dev.partition("asr", 0.5, None)
        assert enforced is False and why in said
        assert "asr" not in dev._streams
