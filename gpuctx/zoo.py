"""Real model architectures for examples, tests and benchmarks, with no downloads.

The reference video pipeline's five models (Whisper, VideoMAE, CLAP, Qwen3, DINOv3) are
built from their ``transformers`` configuration classes with random weights, saved once
to a safetensors checkpoint in a cache folder, and loaded back from disk with
``from_pretrained(local_dir)``, as a user's loader would. ``size="tiny"`` gives configs of
a few hundred kB to a few MB for the CPU and CI; ``size="real"`` the published models'
configs (Whisper large-v3, VideoMAE-large, CLAP HTSAT, Qwen3-0.6B, DINOv3 ViT-L/16), for a GPU.

Needs the ``models`` extra (``pip install gpuctx[models]``: transformers, safetensors);
``import gpuctx`` never imports this module, torch or transformers.

Typical use::

    from gpuctx import zoo
    zoo.register(cache="~/.cache/gpuctx/zoo", vram={"whisper": "auto", "qwen3": "1.5GB"})
    tasks = zoo.submit_clips(3)          # 5 tasks per clip, Qwen3 after Whisper and CLAP
    gpuctx.wait(tasks)
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import threading
from pathlib import Path
from typing import Any, Callable

__all__ = ["NAMES", "DECLARED", "WEIGHTS", "LOAD_LOCK", "available", "config", "checkpoint", "load", "loader", "inputs", "run",
           "register", "submit_clips", "run_directly", "param_bytes", "default_cache"]

NAMES = ("whisper", "videomae", "clap", "qwen3", "dinov3")
#: The seed's declared sizes of the real models (weights plus working memory), in bytes.
DECLARED = {"whisper": "4.5GB", "videomae": "5GB", "clap": "2GB", "qwen3": "1.5GB", "dinov3": "1GB"}

_CLASSES = {
    "whisper": ("WhisperConfig", "WhisperForConditionalGeneration"),
    "videomae": ("VideoMAEConfig", "VideoMAEModel"),
    "clap": ("ClapConfig", "ClapModel"),
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM"),
    "dinov3": ("DINOv3ViTConfig", "DINOv3ViTModel"),
}

_WHISPER_TOKENS = dict(pad_token_id=0, bos_token_id=1, eos_token_id=2, decoder_start_token_id=1,
                       suppress_tokens=[], begin_suppress_tokens=[])
_CONFIGS: dict[str, dict[str, dict[str, Any]]] = {
    "tiny": {
        "whisper": dict(vocab_size=512, num_mel_bins=80, d_model=32, encoder_layers=2, decoder_layers=2,
                        encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=64,
                        decoder_ffn_dim=64, max_source_positions=100, max_target_positions=64, **_WHISPER_TOKENS),
        "videomae": dict(image_size=32, patch_size=8, num_channels=3, num_frames=4, tubelet_size=2, hidden_size=32,
                         num_hidden_layers=2, num_attention_heads=2, intermediate_size=64),
        "clap": dict(text_config=dict(vocab_size=512, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=64, max_position_embeddings=64),
                     audio_config=dict(num_mel_bins=32, spec_size=128, patch_embeds_hidden_size=8, hidden_size=64,
                                       depths=[1, 1, 1, 1], num_attention_heads=[2, 2, 2, 2], window_size=4,
                                       patch_size=4, patch_stride=[4, 4]),
                     projection_dim=16),
        "qwen3": dict(vocab_size=512, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, head_dim=8, max_position_embeddings=128,
                      tie_word_embeddings=True, pad_token_id=0, bos_token_id=1, eos_token_id=2),
        "dinov3": dict(image_size=32, patch_size=8, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                       num_attention_heads=2, num_register_tokens=2),
    },
    "real": {
        # openai/whisper-large-v3
        "whisper": dict(vocab_size=51866, num_mel_bins=128, d_model=1280, encoder_layers=32, decoder_layers=32,
                        encoder_attention_heads=20, decoder_attention_heads=20, encoder_ffn_dim=5120,
                        decoder_ffn_dim=5120, max_source_positions=1500, max_target_positions=448,
                        **{**_WHISPER_TOKENS, "pad_token_id": 50256, "bos_token_id": 50257,
                           "eos_token_id": 50257, "decoder_start_token_id": 50258}),
        # MCG-NJU/videomae-large
        "videomae": dict(image_size=224, patch_size=16, num_frames=16, tubelet_size=2, hidden_size=1024,
                         num_hidden_layers=24, num_attention_heads=16, intermediate_size=4096),
        # laion/clap-htsat-unfused (the config classes' defaults)
        "clap": dict(),
        # Qwen/Qwen3-0.6B
        "qwen3": dict(vocab_size=151936, hidden_size=1024, intermediate_size=3072, num_hidden_layers=28,
                      num_attention_heads=16, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
                      rope_theta=1000000, tie_word_embeddings=True, bos_token_id=151643, eos_token_id=151645),
        # facebook/dinov3-vitl16-pretrain-lvd1689m
        "dinov3": dict(image_size=224, patch_size=16, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                       num_attention_heads=16, num_register_tokens=4, layerscale_value=1e-5),
    },
}
_SIZES = tuple(_CONFIGS)
#: Hold this around ``from_pretrained`` in a loader of your own. It builds the module under a
#: process-wide meta-device / skip-init patch, so two loads in two threads at once (gpuctx loads
#: models of different contexts in parallel) get each other's meta tensors. One at a time.
LOAD_LOCK = threading.Lock()


class _QuietGenerate:
    """A filter on transformers' logger for the notes ``generate`` prints about arguments the
    zoo passes on purpose (a full generation config, min/max new tokens): they would fill notebooks."""

    NOTES = ("Passing `generation_config` together", "Both `max_new_tokens`", "Both `min_new_tokens`")

    def filter(self, record: Any) -> bool:
        return not str(record.getMessage()).startswith(self.NOTES)


def available() -> bool:
    """True when transformers and safetensors can be imported (the ``models`` extra)."""
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("torch", "transformers", "safetensors"))


def _transformers() -> Any:
    import warnings

    try:
        with warnings.catch_warnings():   # tqdm's "IProgress not found" in a notebook without ipywidgets
            warnings.filterwarnings("ignore", message="IProgress not found")
            import transformers
    except ImportError as exc:  # pragma: no cover - exercised without the extra
        raise ImportError("gpuctx.zoo needs the models extra: pip install 'gpuctx[models]'") from exc
    transformers.utils.logging.disable_progress_bar()   # no progress bars in notebooks' outputs
    for handler in transformers.utils.logging.get_logger("transformers").handlers:   # records of child loggers too
        if not any(isinstance(f, _QuietGenerate) for f in handler.filters):
            handler.addFilter(_QuietGenerate())
    return transformers


def _check(name: str, size: str) -> None:
    if name not in _CLASSES:
        raise ValueError(f"unknown zoo model {name!r}; expected one of {', '.join(NAMES)}")
    if size not in _SIZES:
        raise ValueError(f"size={size!r}: expected one of {', '.join(_SIZES)}")


def config(name: str, size: str = "tiny") -> Any:
    """The transformers config of zoo model ``name`` at ``size`` ("tiny" or "real")."""
    _check(name, size)
    return getattr(_transformers(), _CLASSES[name][0])(**_CONFIGS[size][name])


def default_cache() -> Path:
    """``$GPUCTX_ZOO`` or ``~/.cache/gpuctx/zoo``: where checkpoints are saved once."""
    return Path(os.environ.get("GPUCTX_ZOO") or Path.home() / ".cache" / "gpuctx" / "zoo")


def _dtype_name(dtype: Any) -> str:
    return str(dtype).replace("torch.", "")


def checkpoint(name: str, size: str = "tiny", cache: str | os.PathLike | None = None, *,
               dtype: Any = None, device: Any = "cpu", seed: int = 0) -> Path:
    """The folder of ``name``'s safetensors checkpoint, built with random weights and saved the first time.

    The folder is ``<cache>/<name>-<size>-<hash of config, dtype and seed>``; an existing one is
    reused, so the weights are written once. ``device`` is where the random weights are made
    (a GPU makes real sizes fast); they are saved in ``dtype`` (float32 by default).
    """
    import torch

    cfg = config(name, size)
    dtype = dtype or torch.float32
    key = json.dumps({"config": cfg.to_dict(), "dtype": _dtype_name(dtype), "seed": seed}, sort_keys=True, default=str)
    folder = Path(cache or default_cache()).expanduser() / f"{name}-{size}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if (folder / "model.safetensors").exists() or (folder / "model.safetensors.index.json").exists():
        return folder
    torch.manual_seed(seed)
    with torch.device(device):
        model = getattr(_transformers(), _CLASSES[name][1])(cfg)
    model = model.to(dtype).eval()
    tmp = folder.with_name(folder.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp, safe_serialization=True)
    try:
        tmp.rename(folder)   # atomic: a concurrent builder's finished folder wins
    except OSError:
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return folder


def load(name: str, folder: str | os.PathLike, device: Any = "cpu", dtype: Any = None) -> Any:
    """Read ``name``'s weights from the safetensors checkpoint in ``folder`` onto ``device`` (eval mode)."""
    _check(name, "tiny")
    cls = getattr(_transformers(), _CLASSES[name][1])
    kwargs = {"dtype": dtype} if dtype is not None else {}
    with LOAD_LOCK:
        model = cls.from_pretrained(folder, local_files_only=True, **kwargs)   # read on the host, then moved:
    if str(device) != "cpu":                                                # device_map= would need accelerate
        model = model.to(device)
    return model.eval().requires_grad_(False)


def loader(name: str, size: str = "tiny", cache: str | os.PathLike | None = None, *,
           dtype: Any = None, on_load: Callable[[str], Any] | None = None,
           build_device: Any = "cpu") -> Callable[[], Any]:
    """A ``@gpuctx.model`` loader: reads ``name``'s checkpoint onto ``gpuctx.current_device()``.

    The checkpoint is built (once, on ``build_device``) now, so the loader only reads from disk.
    ``on_load(name)`` is called at each load, for counting.
    """
    folder = checkpoint(name, size, cache, dtype=dtype, device=build_device)

    def load_from_disk() -> Any:
        import gpuctx

        if on_load is not None:
            on_load(name)
        return load(name, folder, gpuctx.current_device(), dtype)

    load_from_disk.__name__ = f"load_{name}"
    return load_from_disk


def param_bytes(model: Any) -> int:
    """Bytes of ``model``'s parameters and buffers, tied weights once (what ``vram='auto'`` measures on the CPU)."""
    from .device import host_bytes

    return int(host_bytes(model) or 0)


# --------------------------------------------------------------------------- inputs of real shape
def _waveform(seconds: float, rate: int, seed: int) -> Any:
    """A chirp with a little noise: speech-like energy that moves across frequencies."""
    import numpy as np

    t = np.arange(int(seconds * rate)) / rate
    rng = np.random.default_rng(seed)
    return (0.5 * np.sin(2 * math.pi * (200 + 400 * t) * t) + 0.05 * rng.standard_normal(t.size)).astype(np.float32)


def inputs(name: str, size: str = "tiny", *, seed: int = 0, device: Any = "cpu", dtype: Any = None) -> dict[str, Any]:
    """Real-shaped inputs of ``name``: 16 kHz log-mel features for Whisper, 48 kHz mel features and
    text tokens for CLAP, video frames for VideoMAE, an image for DINOv3, text tokens for Qwen3."""
    import torch

    cfg = config(name, size)
    tf = _transformers()
    g = torch.Generator().manual_seed(seed)
    dtype = dtype or torch.float32
    if name == "whisper":
        fe = tf.WhisperFeatureExtractor(feature_size=cfg.num_mel_bins, sampling_rate=16000,
                                        chunk_length=cfg.max_source_positions * 2 * 160 // 16000)
        feats = fe(_waveform(fe.chunk_length * 0.8, 16000, seed), sampling_rate=16000, return_tensors="pt")
        out = {"input_features": feats["input_features"].to(dtype)}
    elif name == "clap":
        a = cfg.audio_config
        fe = tf.ClapFeatureExtractor(feature_size=a.num_mel_bins, sampling_rate=48000, max_length_s=2 if size == "tiny" else 10)
        feats = fe(_waveform(1.5, 48000, seed), sampling_rate=48000, return_tensors="pt",
                   truncation="rand_trunc", padding="repeatpad")   # shorter than max_length: no random crop
        ids = torch.randint(3, cfg.text_config.vocab_size, (1, 12), generator=g)
        out = {"input_features": feats["input_features"].to(dtype), "input_ids": ids,
               "attention_mask": torch.ones_like(ids)}
    elif name in ("videomae", "dinov3"):
        side = cfg.image_size
        frames = cfg.num_frames if name == "videomae" else 1
        # a bright square moving across a gradient, ImageNet-normalised like an image processor's output
        y, x = torch.meshgrid(torch.linspace(0, 1, side), torch.linspace(0, 1, side), indexing="ij")
        video = torch.stack([torch.stack([x, y, 1 - x]) for _ in range(frames)])
        for f in range(frames):
            c = int(f * side / max(frames, 1)) % side
            video[f, :, side // 4: side // 2, c: c + side // 4] = 1.0
        video += 0.02 * torch.randn(video.shape, generator=g)
        mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
        std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
        video = ((video - mean) / std).to(dtype)
        out = {"pixel_values": video.unsqueeze(0) if name == "videomae" else video}
    else:  # qwen3
        ids = torch.randint(3, cfg.vocab_size, (1, 16), generator=g)
        out = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    return {k: v.to(device) for k, v in out.items()}


def _to(model: Any, batch: dict[str, Any]) -> dict[str, Any]:
    p = next(model.parameters())
    return {k: v.to(p.device, dtype=p.dtype if v.is_floating_point() else v.dtype) for k, v in batch.items()}


def run(name: str, model: Any, batch: dict[str, Any], *, new_tokens: int = 8) -> Any:
    """The pipeline step of ``name`` on ``batch`` (CPU tensors out).

    Whisper and Qwen3 generate ``new_tokens`` token ids greedily; VideoMAE and DINOv3 return
    the pooled embedding (mean of the last hidden state, DINOv3's pooler output); CLAP its
    audio and text embeddings.
    """
    import torch

    tf = _transformers()
    batch = _to(model, batch)
    with torch.inference_mode():
        if name in ("whisper", "qwen3"):
            gen = tf.GenerationConfig(**{**model.generation_config.to_diff_dict(), "max_length": None,
                                         "max_new_tokens": new_tokens, "min_new_tokens": new_tokens,
                                         "min_length": None, "do_sample": False})
            ids = model.generate(**batch, generation_config=gen)
            return ids[:, batch["input_ids"].shape[1]:].cpu() if "input_ids" in batch else ids.cpu()
        if name == "clap":
            out = model(**batch)
            return torch.cat([out.audio_embeds, out.text_embeds], dim=0).float().cpu()
        out = model(**batch)
        if name == "dinov3":
            return out.pooler_output.float().cpu()
        return out.last_hidden_state.mean(dim=1).float().cpu()


# --------------------------------------------------------------------------- the pipeline under gpuctx
def register(size: str = "tiny", cache: str | os.PathLike | None = None, *, vram: dict[str, Any] | None = None,
             dtype: Any = None, on_load: Callable[[str], Any] | None = None,
             build_device: Any = "cpu") -> dict[str, Path]:
    """Register the five models with ``@gpuctx.model`` (loaders read their checkpoints); return the folders.

    ``vram`` maps a name to its declared size or ``"auto"`` (measured at load); the default
    declares the seed's sizes (:data:`DECLARED`). Missing checkpoints are built on
    ``build_device`` first (a GPU makes the real sizes' random weights much faster).
    """
    import gpuctx

    sizes = {**DECLARED, **(vram or {})}
    folders = {}
    for name in NAMES:
        load_fn = loader(name, size, cache, dtype=dtype, on_load=on_load, build_device=build_device)
        folders[name] = checkpoint(name, size, cache, dtype=dtype)
        gpuctx.model(name, vram=sizes[name])(load_fn)
    return folders


#: Parameter plus buffer bytes of each model as its pipeline tasks last saw it loaded (tied weights once).
WEIGHTS: dict[str, int] = {}


def _current(name: str) -> Any:
    import gpuctx

    model = gpuctx.current_model()
    WEIGHTS[name] = param_bytes(model)
    return model


def _step(name: str) -> Callable[..., Any]:
    def step(batch: dict[str, Any]) -> Any:
        return run(name, _current(name), batch)

    step.__name__ = name
    return step


def _summary_prompt(transcript: Any, audio: Any, vocab: int) -> dict[str, Any]:
    """Qwen3's prompt: Whisper's token ids and CLAP's audio embedding quantised, mapped into its vocabulary."""
    import torch

    audio_ids = ((audio[0].sigmoid() * (vocab - 3)).long() + 3)[:8]
    ids = torch.cat([transcript[0] % (vocab - 3) + 3, audio_ids]).unsqueeze(0)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids)}


def submit_clips(clips: int, size: str = "tiny") -> list:
    """Submit ``clips`` clips of the pipeline; returns the tasks, five per clip in the order
    whisper, videomae, clap, qwen3 (after whisper and clap), dinov3."""
    import gpuctx

    asr, video, audio, vision = (gpuctx.gpu_task(model=m, name=m)(_step(m)) for m in
                                 ("whisper", "videomae", "clap", "dinov3"))
    vocab = config("qwen3", size).vocab_size

    @gpuctx.gpu_task(model="qwen3", name="qwen3")
    def summarize(transcript: Any, sound: Any) -> Any:
        return run("qwen3", _current("qwen3"), _summary_prompt(transcript, sound, vocab))

    batches = {m: [inputs(m, size, seed=i) for i in range(clips)] for m in ("whisper", "videomae", "clap", "dinov3")}
    tasks = []
    for i in range(clips):
        text, sound = asr(batches["whisper"][i]), audio(batches["clap"][i])
        tasks += [text, video(batches["videomae"][i]), sound, summarize(text, sound), vision(batches["dinov3"][i])]
    return tasks


def run_directly(clips: int, folders: dict[str, Path], size: str = "tiny", device: Any = "cpu",
                 dtype: Any = None) -> list:
    """The same pipeline without gpuctx (each model loaded once from ``folders``): the reference outputs."""
    vocab = config("qwen3", size).vocab_size
    models = {m: load(m, folders[m], device, dtype) for m in NAMES}
    out = []
    for i in range(clips):
        text = run("whisper", models["whisper"], inputs("whisper", size, seed=i))
        sound = run("clap", models["clap"], inputs("clap", size, seed=i))
        out += [text, run("videomae", models["videomae"], inputs("videomae", size, seed=i)), sound,
                run("qwen3", models["qwen3"], _summary_prompt(text, sound, vocab)),
                run("dinov3", models["dinov3"], inputs("dinov3", size, seed=i))]
    return out
