"""The prepared GPU run's parts that run where no GPU is (bench/gpu_check.py).

The GPU figures themselves need a CUDA machine; what is checked here is that the script
refuses clearly without one, and that the code it would run there -- settings, provider
choice, the IO-binding forward, the table -- does what it says on the CPU.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
import torch
from torch import nn

from bench import gpu_check
from service.runtime.export import export_onnx

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def no_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """The no-CUDA path on every machine: a GPU host hides its devices rather than skip."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def test_the_script_says_no_cuda_and_measures_nothing(tmp_path: Path) -> None:
    done = subprocess.run(
        ["bash", str(ROOT / "bench" / "gpu_check.sh")],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
        env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )  # fmt: skip
    assert done.returncode == 2
    assert "no CUDA device visible to torch: nothing measured" in done.stderr
    assert gpu_check.main(["--out", str(tmp_path / "gpu.md")]) == 2
    assert not (tmp_path / "gpu.md").exists()


def test_without_cuda_the_setting_is_the_cpu_rehearsal() -> None:
    setting = gpu_check.Setting.choose(dry_run=False, budget_s=1.0)
    assert (setting.device.type, setting.size, setting.side) == ("cpu", "tiny", 64)
    assert gpu_check.providers_for(torch.device("cpu")) == ["CPUExecutionProvider"]
    # Asking for CUDA where onnxruntime has no CUDA EP still gives a working list.
    assert gpu_check.providers_for(torch.device("cuda"))[-1] == "CPUExecutionProvider"
    assert gpu_check.graphed_forward(nn.Linear(2, 2), torch.zeros(1, 2)) is None


def test_the_io_bound_forward_equals_a_plain_session_run(tmp_path: Path) -> None:
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.LazyLinear(5)).eval()
    model(torch.zeros(1, 3, 8, 8))
    path = export_onnx(model, (3, 8, 8), tmp_path / "m.onnx")
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    forward = gpu_check.io_bound_forward(session, torch.device("cpu"))
    pixels = np.random.default_rng(0).random((3, 3, 8, 8), dtype=np.float32)
    plain = session.run(None, {session.get_inputs()[0].name: pixels})[0]
    np.testing.assert_array_equal(forward(pixels), plain)
    with torch.no_grad():
        reference = model(torch.from_numpy(pixels).double().float()).numpy()
    np.testing.assert_allclose(forward(pixels), reference, rtol=1e-4, atol=1e-5)


def test_a_spent_budget_writes_the_table_with_the_models_it_skipped(tmp_path: Path) -> None:
    setting = gpu_check.Setting(torch.device("cpu"), "tiny", 64, 2, 1, budget_s=-1.0)
    lines = gpu_check.run(setting, ["resnet18", "vit_s16"], tmp_path / "gpu.md")
    text = (tmp_path / "gpu.md").read_text()
    assert "| model | what | images/s | time / eager forward |" in text
    assert text.count("not measured: the -1 s budget ran out") == 2
    assert lines[-2].startswith("The run took")
