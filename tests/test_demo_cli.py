"""``python -m gpuctx demo``: argument errors are argparse errors, and the demo runs either way."""

from __future__ import annotations

import importlib.util

import pytest

from gpuctx import __main__ as cli


@pytest.mark.parametrize("args, message", [
    (["--budget", "foo"], "'foo' is not a size"),
    (["--budget", "4GB"], "cannot hold videomae"),
    (["--budget", "0"], "must be above 0"),
    (["--clips", "0"], "at least one clip"),
    (["--clips", "two"], "'two' is not an integer"),
    (["--device", "gpu"], "expected auto, cpu, cuda or cuda:N"),
])
def test_bad_arguments_are_usage_errors(args, message, capsys):
    with pytest.raises(SystemExit) as exc:
        cli.main(["demo", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "usage: python -m gpuctx demo" in err and message in err and "Traceback" not in err


def test_device_cuda_without_a_gpu_is_an_error(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_cuda_visible", lambda: False)
    with pytest.raises(SystemExit):
        cli.main(["demo", "--device", "cuda"])
    assert "no CUDA device is visible" in capsys.readouterr().err


def test_every_option_has_help(capsys):
    with pytest.raises(SystemExit):
        cli.main(["demo", "--help"])
    out = capsys.readouterr().out
    for option in ("--clips N", "--budget SIZE", "--device DEVICE", "--stand-ins"):
        line = next(li for li in out.splitlines() if li.strip().startswith(option))
        assert len(line.split(option, 1)[1].strip()) > 10, option


def test_stand_ins_say_so_in_one_line(fresh, capsys):
    assert cli.main(["demo", "--device", "cpu", "--clips", "1", "--stand-ins"]) == 0
    out = capsys.readouterr().out
    assert sum("stand-ins" in li for li in out.splitlines()) == 1


@pytest.mark.skipif(importlib.util.find_spec("transformers") is None, reason="needs the models extra")
def test_real_models_demo_on_the_cpu(fresh, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("GPUCTX_ZOO", str(tmp_path))
    assert cli.main(["demo", "--device", "cpu", "--clips", "2"]) == 0
    out = capsys.readouterr().out
    assert "tiny configs" in out and "whisper token ids" in out and "0 failed" in out
    assert "(room for" in out
