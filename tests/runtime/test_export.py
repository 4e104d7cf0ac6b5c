"""Export to .pt2 and .onnx with the logits parity check."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from service.engine.modules import freeze
from service.runtime import export as export_mod
from service.runtime.export import ExportResult, ParityError, export_artifacts
from service.runtime.wrap import Normalized

# Same default as tests/models/conftest.py and the Makefile: one shared trained model.
os.environ.setdefault(
    "SALIENCY_SERVE_CACHE", str(Path(__file__).resolve().parents[2] / ".cache" / "saliency-serve")
)

SHAPE = (3, 32, 32)


class Tiny(nn.Module):
    def __init__(self, classes: int = 5) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.bn = nn.BatchNorm2d(8)
        self.fc = nn.Linear(8, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.relu(self.bn(self.conv(x))).mean(dim=(2, 3)))


class ExportOnlyOffset(Tiny):
    """Adds ``offset`` to its logits only while being exported: the artifacts disagree."""

    def __init__(self, offset: float) -> None:
        super().__init__()
        self.offset = offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = super().forward(x)
        return out + self.offset if torch.compiler.is_exporting() else out


def _tiny() -> nn.Module:
    torch.manual_seed(0)
    return freeze(Normalized(Tiny(), [0.5, 0.5, 0.5], [0.25, 0.25, 0.25]))


@pytest.fixture(scope="module")
def tiny_export(tmp_path_factory: pytest.TempPathFactory) -> tuple[nn.Module, ExportResult]:
    model = _tiny()
    return model, export_artifacts(model, SHAPE, tmp_path_factory.mktemp("tiny") / "out")


def test_tiny_model_exports_with_parity(tiny_export: tuple[nn.Module, ExportResult]) -> None:
    _, result = tiny_export
    out = result.pt2_path.parent
    assert result.pt2_path == out / "model.pt2"
    assert result.onnx_path == out / "model.onnx"
    assert result.max_abs_diff_pt2 <= 1e-4
    assert result.max_abs_diff_onnx <= 1e-4
    # Self-contained: no external-data file next to the .onnx.
    assert sorted(p.name for p in out.iterdir()) == ["model.onnx", "model.pt2"]
    proto = onnx.load(str(result.onnx_path), load_external_data=False)
    assert not any(t.data_location == onnx.TensorProto.EXTERNAL for t in proto.graph.initializer)
    assert [i.name for i in proto.graph.input] == ["pixels"]
    assert [o.name for o in proto.graph.output] == ["logits"]
    batch_dim = proto.graph.input[0].type.tensor_type.shape.dim[0]
    assert batch_dim.dim_param and not batch_dim.HasField("dim_value")


@pytest.mark.parametrize("batch", [1, 3, 9])
def test_dynamic_batch(tiny_export: tuple[nn.Module, ExportResult], batch: int) -> None:
    model, result = tiny_export
    x = torch.rand(batch, *SHAPE)
    expected = model(x).detach().numpy()
    program = torch.export.load(result.pt2_path).module()
    np.testing.assert_allclose(program(x).detach().numpy(), expected, atol=1e-5)
    session = ort.InferenceSession(str(result.onnx_path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(["logits"], {"pixels": x.numpy()})
    assert logits.shape == (batch, 5)
    np.testing.assert_allclose(logits, expected, atol=1e-5)


def test_export_only_difference_raises_parity_error(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = ExportOnlyOffset(offset=0.01)
    with pytest.raises(ParityError) as info:
        export_artifacts(model, SHAPE, tmp_path, atol=1e-4)
    err = info.value
    assert err.artifact == "model.pt2"
    assert err.max_abs_diff == pytest.approx(0.01, rel=1e-3)
    assert err.atol == 1e-4
    message = str(err)
    assert "model.pt2" in message
    assert "0.01" in message  # how big
    assert "0.0001" in message  # the tolerance
    assert "random inputs in [0, 1] of shape" in message  # on which inputs
    assert "seed 0" in message


def test_tolerance_is_respected(tmp_path: Path) -> None:
    torch.manual_seed(0)
    result = export_artifacts(ExportOnlyOffset(offset=5e-4), SHAPE, tmp_path, atol=1e-3)
    assert 4e-4 < result.max_abs_diff_pt2 < 6e-4
    assert 4e-4 < result.max_abs_diff_onnx < 6e-4


def test_onnx_that_disagrees_is_named(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Simulate an exporter that gets the ONNX graph wrong: write another model's weights.
    real = export_mod._export_onnx

    def wrong_onnx(module: nn.Module, *args: object, **kwargs: object) -> None:
        torch.manual_seed(1)
        real(freeze(Tiny()), *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(export_mod, "_export_onnx", wrong_onnx)
    with pytest.raises(ParityError, match=r"model\.onnx does not reproduce the model") as info:
        export_artifacts(_tiny(), SHAPE, tmp_path)
    assert info.value.max_abs_diff > 1e-4


def test_wrong_output_shape_is_a_parity_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = export_mod._export_onnx

    def other_classes(module: nn.Module, *args: object, **kwargs: object) -> None:
        real(freeze(Tiny(classes=7)), *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(export_mod, "_export_onnx", other_classes)
    with pytest.raises(ParityError, match=r"returns shape \(1, 7\), the module \(1, 5\)"):
        export_artifacts(_tiny(), SHAPE, tmp_path)


def test_bad_arguments(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="input_shape"):
        export_artifacts(_tiny(), (3, 32), tmp_path)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="n_checks"):
        export_artifacts(_tiny(), SHAPE, tmp_path, n_checks=0)


def test_default_model_exports_with_parity(tmp_path: Path) -> None:
    from service.models.default import load_default_model

    model, meta = load_default_model()
    result = export_artifacts(model, tuple(meta["input_size"]), tmp_path)
    assert result.max_abs_diff_pt2 <= 1e-4
    assert result.max_abs_diff_onnx <= 1e-4
    # The eager module is untouched: still frozen and in eval mode.
    assert not model.training
    assert not any(p.requires_grad for p in model.parameters())
