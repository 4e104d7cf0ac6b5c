"""OnnxForward: chunked batches, providers, and thread count from the container quota."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch

from service.runtime.onnx_forward import (
    OPTIMIZATION_LEVELS,
    OnnxForward,
    cgroup_cpu_limit,
    cpu_quota,
)


def affinity() -> int:
    return len(os.sched_getaffinity(0))


def test_chunked_forward_equals_one_batch(model_path: tuple[torch.nn.Module, Path]) -> None:
    model, path = model_path
    x = np.random.default_rng(0).random((10, 3, 16, 16), dtype=np.float32)
    whole = OnnxForward(path, max_batch=64)(x)
    chunked = OnnxForward(path.read_bytes(), max_batch=3)(x)
    assert whole.shape == (10, 5) and whole.dtype == np.float32
    # Same rows in the same order; not bit for bit, as a provider may pick other kernels
    # for another batch size (cuDNN does), so to float32 rounding of the logits.
    np.testing.assert_allclose(chunked, whole, rtol=1e-5, atol=1e-6 * float(np.abs(whole).max()))
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(whole, expected, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("optimization", sorted(OPTIMIZATION_LEVELS))
@pytest.mark.parametrize("parallel", [False, True])
def test_every_session_option_computes_the_model(
    model_path: tuple[torch.nn.Module, Path], optimization: str, parallel: bool
) -> None:
    """The options ort_choice picks among change speed only: the logits stay the model's."""
    model, path = model_path
    x = np.random.default_rng(1).random((6, 3, 16, 16), dtype=np.float32)
    forward = OnnxForward(path, intra_op_threads=2, optimization=optimization, parallel=parallel)
    with torch.no_grad():
        expected = model(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(forward(x), expected, rtol=1e-4, atol=1e-5)


def test_rejects_an_unknown_optimization_level(model_path: tuple[torch.nn.Module, Path]) -> None:
    with pytest.raises(ValueError, match="optimization must be one of"):
        OnnxForward(model_path[1], optimization="max")


def test_describes_the_model(model_path: tuple[torch.nn.Module, Path]) -> None:
    forward = OnnxForward(model_path[1], intra_op_threads=1)
    assert forward.input_shape == (3, 16, 16)
    assert forward.num_classes == 5
    assert forward.providers[-1] == "CPUExecutionProvider"
    assert forward(np.zeros((0, 3, 16, 16), dtype=np.float32)).shape == (0, 5)
    # float64 input is converted, not rejected.
    assert forward(np.zeros((2, 3, 16, 16))).dtype == np.float32


def test_rejects_a_non_positive_max_batch(model_path: tuple[torch.nn.Module, Path]) -> None:
    with pytest.raises(ValueError, match="max_batch"):
        OnnxForward(model_path[1], max_batch=0)


def write(root: Path, relative: str, text: str) -> None:
    path = root / "sys" / "fs" / "cgroup" / relative
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.mark.parametrize(
    ("files", "limit"),
    [
        ({"cpu.max": "200000 100000\n"}, 2.0),
        ({"cpu.max": "150000 100000\n"}, 1.5),
        ({"cpu.max": "max 100000\n"}, None),
        ({"cpu/cpu.cfs_quota_us": "300000\n", "cpu/cpu.cfs_period_us": "100000\n"}, 3.0),
        ({"cpu,cpuacct/cpu.cfs_quota_us": "50000", "cpu,cpuacct/cpu.cfs_period_us": "100000"}, 0.5),
        ({"cpu/cpu.cfs_quota_us": "-1\n", "cpu/cpu.cfs_period_us": "100000\n"}, None),
        ({"cpu.max": "garbage"}, None),
        ({}, None),
    ],
)
def test_cgroup_cpu_limit(tmp_path: Path, files: dict[str, str], limit: float | None) -> None:
    for relative, text in files.items():
        write(tmp_path, relative, text)
    assert cgroup_cpu_limit(tmp_path) == limit


def test_cpu_quota_rounds_down_and_never_exceeds_affinity(tmp_path: Path) -> None:
    write(tmp_path, "cpu.max", "50000 100000")
    assert cpu_quota(tmp_path) == 1  # half a CPU still gets one thread
    write(tmp_path, "cpu.max", "150000 100000")
    assert cpu_quota(tmp_path) == 1
    write(tmp_path, "cpu.max", f"{100000 * (affinity() + 8)} 100000")
    assert cpu_quota(tmp_path) == affinity()  # a quota above the usable cores is capped
    write(tmp_path, "cpu.max", "max 100000")
    assert cpu_quota(tmp_path) == affinity()
    assert cpu_quota(tmp_path / "missing") == affinity()
