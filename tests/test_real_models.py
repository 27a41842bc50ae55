"""The seed's five real architectures (tiny configs, random weights) end to end on the CPU device.

Each is built from its transformers config class, saved once to safetensors and read back by
an ``@gpuctx.model`` loader; the pipeline runs under a budget smaller than the models' sum and
must give exactly what the same models give when run directly, outside gpuctx.
"""

from __future__ import annotations

import sys

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
pytest.importorskip("safetensors")

import gpuctx  # noqa: E402
from gpuctx import zoo  # noqa: E402
from gpuctx.device import host_bytes, span_bytes  # noqa: E402


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("zoo")


@pytest.fixture(scope="module")
def folders(cache):
    return {name: zoo.checkpoint(name, "tiny", cache) for name in zoo.NAMES}


@pytest.fixture(scope="module")
def sizes(folders):
    """Parameter plus buffer bytes of each model loaded directly, tensors counted by address once."""
    out = {}
    for name, folder in folders.items():
        m = zoo.load(name, folder)
        seen = {}
        for t in [*m.parameters(), *m.buffers()]:
            seen[t.data_ptr()] = t.numel() * t.element_size()
        out[name] = sum(seen.values())
    return out


def test_checkpoints_are_safetensors_saved_once(cache, folders):
    for name, folder in folders.items():
        assert (folder / "model.safetensors").is_file(), name
        assert (folder / "config.json").is_file(), name
    stamp = {n: (f / "model.safetensors").stat().st_mtime_ns for n, f in folders.items()}
    again = {n: zoo.checkpoint(n, "tiny", cache) for n in zoo.NAMES}
    assert again == folders
    assert {n: (f / "model.safetensors").stat().st_mtime_ns for n, f in again.items()} == stamp


def test_loader_reads_the_weights_from_disk(folders, tmp_path):
    import shutil

    from safetensors.torch import load_file, save_file

    copy = shutil.copytree(folders["dinov3"], tmp_path / "dinov3")
    on_disk = load_file(copy / "model.safetensors")
    save_file({k: torch.full_like(v, 0.5) for k, v in on_disk.items()}, copy / "model.safetensors",
              metadata={"format": "pt"})
    m = zoo.load("dinov3", copy)
    assert all(torch.all(p == 0.5) for p in m.parameters())
    assert not any(torch.all(p == 0.5) for p in zoo.load("dinov3", folders["dinov3"]).parameters())


def test_qwen3_ties_lm_head_to_embeddings_and_counts_it_once(folders, sizes):
    m = zoo.load("qwen3", folders["qwen3"])
    assert m.lm_head.weight is m.model.embed_tokens.weight
    every = sum(t.numel() * t.element_size() for _, t in [*m.named_parameters(remove_duplicate=False),
                                                          *m.named_buffers(remove_duplicate=False)])
    assert host_bytes(m) == sizes["qwen3"] == every - m.lm_head.weight.numel() * m.lm_head.weight.element_size()


def test_span_bytes_counts_views_and_aliases_once():
    base = torch.zeros(100)
    assert span_bytes([base, base[10:20], base.view(10, 10), torch.nn.Parameter(base)]) == 400
    assert span_bytes([base, torch.zeros(3)]) == 412
    assert span_bytes([torch.zeros(0), torch.empty(5, device="meta")]) == 0
    assert span_bytes([torch.zeros(4, 4).t()]) == 64


def test_auto_size_on_cpu_is_parameter_and_buffer_bytes(fresh, folders, sizes):
    for name in ("qwen3", "clap"):
        gpuctx.model(name, vram="auto")(zoo.loader(name, "tiny", folders[name].parent))
        task = gpuctx.gpu_task(model=name)(lambda: type(gpuctx.current_model()).__name__)
        assert task().result(60)
    models = gpuctx.stats()["models"]
    sched = gpuctx.scheduler()
    for name in ("qwen3", "clap"):
        slot = sched._slots[name]
        assert (slot.size, slot.size_source) == (sizes[name], "measured"), name
        assert models[name]["loads"] == 1


def test_pipeline_under_a_small_budget_matches_running_directly(fresh, cache, folders, sizes):
    vram = {"whisper": "auto", "clap": "auto", "qwen3": "auto",
            "videomae": sizes["videomae"], "dinov3": sizes["dinov3"]}
    total = sum(sizes.values())
    budget = sizes["whisper"] + sizes["clap"] + sizes["qwen3"]   # the largest group Qwen3 needs resident
    assert budget < total
    gpuctx.configure(device="cpu", budget=budget, safety_factor=1.0)
    loads = []
    zoo.register("tiny", cache, vram=vram, on_load=loads.append)
    # An "auto" model's first load is planned with all the free budget, then charged what it measured;
    # one load each first, so that the pipeline is planned with every size known.
    for name in ("whisper", "clap", "qwen3"):
        gpuctx.gpu_task(model=name)(lambda: None)().result(60)
    for name in zoo.NAMES:
        assert gpuctx.scheduler()._slots[name].size == sizes[name], name
    clips = 2
    tasks = zoo.submit_clips(clips)
    gpuctx.wait(tasks, timeout=120)
    assert [t.exception(0) for t in tasks] == [None] * len(tasks)
    got = [t.result() for t in tasks]

    direct = zoo.run_directly(clips, folders)
    for i, (g, d) in enumerate(zip(got, direct)):
        name = zoo.NAMES[i % 5]
        assert g.shape == d.shape and g.dtype == d.dtype, name
        assert torch.equal(g, d), name
    whisper, video, clap, qwen, dino = got[:5]
    assert whisper.dtype == torch.int64 and whisper.shape == (1, 8)
    assert qwen.dtype == torch.int64 and qwen.shape == (1, 8)
    assert video.dtype == torch.float32 and video.shape == (1, 32)
    assert clap.shape == (2, 16) and dino.shape == (1, 32)

    st = gpuctx.stats()
    sched = gpuctx.scheduler()
    assert st["peak_vram"] <= budget
    assert sum(m["unloads"] + m["offloads"] for m in st["models"].values()) > 0
    assert len(loads) > len(zoo.NAMES)
    reasons = [e.reason for e in sched.trace.events if e.kind in ("unload", "offload")]
    assert reasons and all(reasons)


def test_declared_sizes_stay_when_the_module_is_smaller(fresh, cache):
    zoo.register("tiny", cache)   # the seed's declared sizes: GBs, far above the tiny modules
    tasks = zoo.submit_clips(1)
    gpuctx.wait(tasks, timeout=120)
    assert all(t.exception(0) is None for t in tasks)
    sched = gpuctx.scheduler()
    for name, size in zoo.DECLARED.items():
        assert (sched._slots[name].size, sched._slots[name].size_source) == (gpuctx.parse_size(size), "declared")


def test_declared_too_small_warns_and_uses_the_measured_size(fresh, folders, sizes):
    gpuctx.model("videomae", vram=1000)(zoo.loader("videomae", "tiny", folders["videomae"].parent))
    task = gpuctx.gpu_task(model="videomae")(lambda b: zoo.run("videomae", gpuctx.current_model(), b))
    with pytest.warns(RuntimeWarning, match="more than 10% above the declared"):
        out = task(zoo.inputs("videomae")).result(60)
    assert out.shape == (1, 32)
    assert gpuctx.scheduler()._slots["videomae"].size == sizes["videomae"]


def test_cpu_device_measures_only_torch_objects(fresh):
    from gpuctx.device import CpuDevice

    dev = CpuDevice()
    lin = torch.nn.Linear(4, 4)
    assert dev.load("m", lambda: lin) == (lin, 80)
    assert dev.load("m", lambda: {"a": lin.weight, "b": lin.weight})[1] == 64
    assert dev.load("m", lambda: "not a model")[1] is None


def test_gpu_models_bench_runs_in_cpu_smoke_mode(fresh, cache, capsys):
    import importlib.util
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "bench" / "gpu_models.py"
    spec = importlib.util.spec_from_file_location("gpu_models_bench", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    assert bench.main(["--cpu-smoke", "--cache", str(cache)]) == 0
    out = capsys.readouterr().out
    assert "all checks passed" in out and "bit-exact True" in out


def test_offload_rebinding_keeps_tied_and_aliased_tensors_shared():
    """The CUDA offload/restore code path's rebinding, run with host copies (no GPU needed)."""
    from gpuctx.device import hostcopy as _cuda   # the module-moving helpers the CUDA backend uses
    from gpuctx.device.base import span_bytes

    m = torch.nn.Module()
    m.a = torch.nn.Linear(4, 4, bias=False)
    m.b = torch.nn.Linear(4, 4, bias=False)
    m.b.weight = m.a.weight                                   # tied: one Parameter, two modules
    m.c = torch.nn.Parameter(m.a.weight.data)                 # aliased: another Parameter on the same memory
    before = m.a.weight.detach().clone()
    items = _cuda._module_items(torch, m, lambda t: not t.is_cuda)
    copies = _cuda._copies(items, lambda o, t: t.detach().clone())
    assert len(items) == 2 and copies[0] is copies[1]
    _cuda._rebind(items, copies)
    assert m.b.weight is m.a.weight and m.c.data_ptr() == m.a.weight.data_ptr()
    assert torch.equal(m.a.weight, before)
    assert span_bytes([p for p in m.parameters()]) == 64


def test_a_measured_size_warning_points_at_the_users_registration_line(fresh):
    import warnings as _w

    torch = pytest.importorskip("torch")
    line = None
    with _w.catch_warnings(record=True) as caught:
        _w.simplefilter("always")
        line = sys._getframe().f_lineno + 1
        gpuctx.model("lin", vram="1KB")(lambda: torch.nn.Linear(64, 64))
        gpuctx.gpu_task(model="lin")(lambda: 1)().result(10)
    hits = [w for w in caught if "measured" in str(w.message)]
    assert hits and hits[0].filename == __file__ and hits[0].lineno == line
