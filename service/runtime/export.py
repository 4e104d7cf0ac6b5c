"""Export any image classifier to ``model.pt2`` and ``model.onnx`` and prove they agree.

Gradient methods run on the torch artifact and forward-only methods and scores on the ONNX
one, so an archive whose two forwards disagree would explain a different model than it
predicts with. ``export_artifacts`` therefore reloads both files and refuses (raises
``ParityError``) unless their logits match the original module's within ``atol``.
"""

from __future__ import annotations

import contextlib
import io
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnxruntime as ort
import torch
from torch import nn

PT2_NAME = "model.pt2"
ONNX_NAME = "model.onnx"
INPUT_NAME = "pixels"
OUTPUT_NAME = "logits"
CHECK_BATCH_SIZES = (1, 4)
MAX_BATCH = 4096


class ParityError(Exception):
    """An exported artifact's logits differ from the original module's by more than ``atol``.

    Attributes:
        artifact: file name of the artifact that disagrees.
        max_abs_diff: largest absolute logit difference seen (``inf`` for a shape mismatch).
        atol: the tolerance it exceeded.
        where: which inputs produced it.
    """

    def __init__(self, artifact: str, max_abs_diff: float, atol: float, where: str) -> None:
        self.artifact = artifact
        self.max_abs_diff = max_abs_diff
        self.atol = atol
        self.where = where
        super().__init__(
            f"{artifact} does not reproduce the model: max |logit difference| "
            f"{max_abs_diff:.3g} exceeds the tolerance {atol:.3g} on {where}. "
            "Common causes: the model is not in eval mode, its forward depends on Python "
            "state or branches on tensor values, or an operator exports with different "
            "numerics; fix the model or raise the tolerance knowingly."
        )


@dataclass(frozen=True)
class ExportResult:
    """Where the artifacts went and how closely they reproduce the module.

    Attributes:
        pt2_path: the ``torch.export`` program (``torch.export.load`` reads it).
        onnx_path: the self-contained ONNX model (input ``pixels``, output ``logits``).
        max_abs_diff_pt2: largest absolute logit difference of the reloaded ``.pt2``.
        max_abs_diff_onnx: largest absolute logit difference of the ONNX Runtime session.
    """

    pt2_path: Path
    onnx_path: Path
    max_abs_diff_pt2: float
    max_abs_diff_onnx: float


def export_artifacts(
    module: nn.Module,
    input_shape: tuple[int, int, int],
    out_dir: Path,
    *,
    atol: float = 1e-4,
    seed: int = 0,
    n_checks: int = 3,
) -> ExportResult:
    """Write ``model.pt2`` and ``model.onnx`` with a dynamic batch axis and check their parity.

    The module is put in eval mode. Both files are reloaded from disk and compared with the
    module on ``n_checks`` random batches in ``[0, 1]`` at each of the batch sizes 1 and 4.

    Args:
        module: classifier taking float32 ``(N, C, H, W)`` and returning ``(N, classes)``.
        input_shape: ``(C, H, W)`` of one input.
        out_dir: directory for the two files; created if missing.
        atol: largest allowed absolute difference of any logit.
        seed: seed of the random check inputs.
        n_checks: random batches per batch size.

    Returns:
        An ``ExportResult``.

    Raises:
        ParityError: an artifact's logits differ by more than ``atol`` (or have another shape).
        ValueError: ``input_shape`` is not three positive sizes or ``n_checks < 1``.
    """
    if len(input_shape) != 3 or any(int(d) < 1 for d in input_shape):
        raise ValueError(f"input_shape must be (C, H, W) of positive sizes, got {input_shape}")
    if n_checks < 1:
        raise ValueError(f"n_checks must be at least 1, got {n_checks}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    module.eval()
    example, dynamic_shapes = _example_batch(input_shape, seed)

    pt2_path = out_dir / PT2_NAME
    with torch.no_grad():
        program = torch.export.export(module, (example,), dynamic_shapes=dynamic_shapes)
    torch.export.save(program, pt2_path)

    onnx_path = out_dir / ONNX_NAME
    _export_onnx(module, example, dynamic_shapes, onnx_path)

    diff_pt2, diff_onnx = check_parity(
        module, pt2_path, onnx_path, input_shape, atol, seed, n_checks
    )
    return ExportResult(pt2_path, onnx_path, diff_pt2, diff_onnx)


def export_onnx(
    module: nn.Module, input_shape: tuple[int, int, int], path: Path, *, seed: int = 0
) -> Path:
    """Write ``module`` to ``path`` as the archive's ``model.onnx`` is written; no parity check.

    One self-contained file, input ``pixels`` with a dynamic batch axis, output ``logits``,
    by the same exporter as :func:`export_artifacts`: benchmarks and tests that need only
    the ONNX forward run the graph a served model runs.

    Args:
        module: classifier taking float32 ``(N, C, H, W)``; put in eval mode.
        input_shape: ``(C, H, W)`` of one input.
        path: the file to write.
        seed: seed of the example batch the exporter traces.

    Returns:
        ``path``.
    """
    module.eval()
    example, dynamic_shapes = _example_batch(input_shape, seed)
    _export_onnx(module, example, dynamic_shapes, Path(path))
    return Path(path)


def _example_batch(
    input_shape: tuple[int, int, int], seed: int
) -> tuple[torch.Tensor, tuple[dict[int, Any]]]:
    """The batch both exporters trace, and its dynamic batch axis."""
    # Batch 2, not 1: torch.export specialises sizes 0 and 1, which would pin the batch axis.
    example = torch.rand((2, *input_shape), generator=torch.Generator().manual_seed(seed))
    return example, ({0: torch.export.Dim("batch", min=1, max=MAX_BATCH)},)


def _export_onnx(
    module: nn.Module, example: torch.Tensor, dynamic_shapes: tuple[dict[int, Any]], path: Path
) -> None:
    # The dynamo exporter (torch.export + onnxscript) is the maintained path in torch 2.13;
    # external_data=False keeps weights inside the one file the archive ships.
    quiet = io.StringIO()
    with warnings.catch_warnings(), contextlib.redirect_stdout(quiet):
        warnings.simplefilter("ignore")
        torch.onnx.export(
            module,
            (example,),
            str(path),
            input_names=[INPUT_NAME],
            output_names=[OUTPUT_NAME],
            dynamic_shapes=dynamic_shapes,
            dynamo=True,
            external_data=False,
            verbose=False,
        )


def check_parity(
    module: nn.Module,
    pt2_path: Path,
    onnx_path: Path,
    input_shape: tuple[int, int, int],
    atol: float = 1e-4,
    seed: int = 0,
    n_checks: int = 3,
) -> tuple[float, float]:
    """Compare the logits of ``module`` with those of the two artifacts reloaded from disk.

    Args:
        module: the original module, in eval mode.
        pt2_path: file written by ``torch.export.save``.
        onnx_path: ONNX model with input ``pixels`` and output ``logits``.
        input_shape: ``(C, H, W)`` of one input.
        atol: largest allowed absolute logit difference.
        seed: seed of the random inputs.
        n_checks: random batches per batch size in ``CHECK_BATCH_SIZES``.

    Returns:
        ``(max_abs_diff_pt2, max_abs_diff_onnx)``.

    Raises:
        ParityError: a difference exceeds ``atol`` or an output has the wrong shape.
    """
    program = torch.export.load(pt2_path).module()
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    gen = torch.Generator().manual_seed(seed + 1)
    worst = {PT2_NAME: (0.0, ""), ONNX_NAME: (0.0, "")}
    for check in range(n_checks):
        for n in CHECK_BATCH_SIZES:
            x = torch.rand((n, *input_shape), generator=gen)
            where = (
                f"random inputs in [0, 1] of shape {tuple(x.shape)} (check {check + 1} of "
                f"{n_checks}, seed {seed})"
            )
            with torch.no_grad():
                ref = module(x).numpy()
                outputs = {
                    PT2_NAME: program(x).numpy(),
                    ONNX_NAME: session.run([OUTPUT_NAME], {INPUT_NAME: x.numpy()})[0],
                }
            for name, out in outputs.items():
                diff = _max_abs_diff(ref, out)
                if diff > worst[name][0] or not worst[name][1]:
                    note = (
                        ""
                        if ref.shape == out.shape
                        else f"; it returns shape {out.shape}, the module {ref.shape}"
                    )
                    worst[name] = (diff, where + note)
    for name, (diff, where) in worst.items():
        if diff > atol:
            raise ParityError(name, diff, atol, where)
    return worst[PT2_NAME][0], worst[ONNX_NAME][0]


def _max_abs_diff(ref: np.ndarray, out: np.ndarray) -> float:
    """Largest absolute difference; ``inf`` for different shapes or any NaN."""
    if ref.shape != out.shape:
        return float("inf")
    diff = float(np.max(np.abs(ref.astype(np.float64) - out.astype(np.float64)), initial=0.0))
    return diff if np.isfinite(diff) else float("inf")
