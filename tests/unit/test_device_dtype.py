"""Issue 21 item 4, bad input: a `device` or `dtype` the machine cannot run is one line, exit 2,
naming the key and what to set, before a stage writes anything.

- `device: cuda` where torch sees no CUDA device (this CPU machine);
- `dtype: bfloat16` on a GPU without native bf16 (compute capability < 8.0, which torch only
  emulates): no such GPU here, so the capability probes are monkeypatched.

And prepare, the one stage that does not load its model with `load_model(path, dtype)`: it
saves the source in fp32 and lets the teacher write its responses in the run's dtype.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from safetensors import safe_open

from retroloop.models.loading import resolve_device
from tests.conftest import TINY_PROFILE
from tests.unit.test_cli_errors import cli, error_line


def _params(path: Path, **top) -> Path:
    raw = yaml.safe_load(TINY_PROFILE.read_text())
    path.write_text(yaml.safe_dump({**raw, **top}))
    return path


def _no_bf16_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    """A visible CUDA device that has fp16 but only emulated bf16 (a T4)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Tesla T4")
    monkeypatch.setattr(
        torch.cuda, "is_bf16_supported", lambda including_emulation=True: including_emulation
    )


def test_device_cuda_without_cuda_is_one_line_exit_2(tmp_path, monkeypatch, capsys) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    params = _params(tmp_path / "p.yaml", device="cuda")
    monkeypatch.chdir(tmp_path)
    code, err = cli(capsys, "stage", "prepare", "--params", str(params))
    assert code == 2
    error_line(err, "device: 'cuda'", "no CUDA device", "'cpu'")
    assert not (tmp_path / "data" / "prepare").exists()


@pytest.mark.parametrize("device", ["cuda", "auto"])
def test_bf16_on_a_gpu_without_bf16_is_one_line_exit_2(
    device, tmp_path, monkeypatch, capsys
) -> None:
    _no_bf16_gpu(monkeypatch)
    params = _params(tmp_path / "p.yaml", device=device, dtype="bfloat16")
    monkeypatch.chdir(tmp_path)
    code, err = cli(capsys, "stage", "prepare", "--params", str(params))
    assert code == 2
    error_line(err, "dtype: 'bfloat16'", "Tesla T4", "no native bf16", "float16")
    assert not (tmp_path / "data" / "prepare").exists()


def test_what_the_machine_has_is_accepted(monkeypatch) -> None:
    """bf16 on the CPU (torch's kernels cover it), fp16/fp32 on the bf16-less GPU."""
    assert resolve_device("cpu", "bfloat16") == torch.device("cpu")
    _no_bf16_gpu(monkeypatch)
    assert resolve_device("cuda", "float16") == torch.device("cuda")
    assert resolve_device("auto", "float32") == torch.device("cuda")
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda including_emulation=True: True)
    assert resolve_device("cuda", "bfloat16") == torch.device("cuda")


def test_prepare_saves_the_source_in_fp32_and_its_teacher_answers_in_the_runs_dtype(
    tmp_path, monkeypatch
) -> None:
    from retroloop.config import load_params
    from retroloop.stages import prepare

    seen = []

    def spy(model, *args, **kwargs):
        seen.append(next(model.parameters()).dtype)
        return real(model, *args, **kwargs)

    real = prepare.generate_responses
    monkeypatch.setattr(prepare, "generate_responses", spy)
    monkeypatch.chdir(tmp_path)
    cfg = load_params(TINY_PROFILE, {"dtype": "bfloat16", "prepare.model.tiny.train_steps": 1})
    prepare.run(cfg)
    assert seen == [torch.bfloat16]
    with safe_open("data/prepare/model/model.safetensors", "pt") as f:
        assert {f.get_slice(key).get_dtype() for key in f.keys()} == {"F32"}  # noqa: SIM118
