"""The engine: validates a request, resolves its method and targets, runs it.

One ``Engine`` serves concurrent batches from several threads: it holds only read-only
state (the frozen model, the layer, the forward), and everything a call mutates -- its
generator, its captured activations -- is created inside that call.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Mapping

import numpy as np
import torch
from torch import nn

from service.engine.layers import find_last_spatial_layer, resolve_layer
from service.engine.modules import device_and_dtype, freeze
from service.engine.registry import MethodSpec, ResolvedParams, get_method
from service.engine.targets import TargetSpec, resolve_targets
from service.engine.types import Attribution, ExplainContext, NumpyForward, ProgressFn
from service.protocol.errors import DeadlineExceededError, InvalidInputError, UnsupportedMethodError

DEFAULT_CHUNK_SIZE = 32
AUTO_LAYER = "auto"
PRECISIONS: dict[str, torch.dtype | None] = {
    "float32": None,
    "bfloat16": torch.bfloat16,
    "float16": torch.float16,
}


class Engine:
    """Explanations for one model.

    Args:
        model: classifier in pixel space (``(N, C, H, W)`` in ``[0, 1]`` -> ``(N, K)``
            logits). The engine puts it in eval mode and freezes its parameters.
        target_layer: dotted name of the layer CAM methods use, ``"auto"`` for the last
            layer with a spatial output, or ``None`` (CAM methods are then unsupported).
        input_shape: ``(C, H, W)`` every input must have.
        forward_numpy: fast forward (e.g. ONNX Runtime) for predictions and forward-only
            methods. Without it :meth:`predict_logits` uses the torch model and methods
            with the ``onnx`` backend are unsupported.
        chunk_size: rows per model pass for methods that evaluate many perturbed copies.
        precision: ``float32`` (default), or ``bfloat16`` / ``float16`` to run the torch
            methods under ``torch.autocast``: convolutions and matrix products in that
            precision, reductions and the returned maps in float32. Faster where the
            device has the units (CUDA tensor cores, AVX512-BF16/AMX on CPUs); the maps
            then differ from float32 ones within the bounds ``tests/engine/test_precision.py``
            states.
    """

    def __init__(
        self,
        model: nn.Module,
        *,
        target_layer: str | None = None,
        input_shape: tuple[int, int, int],
        forward_numpy: NumpyForward | None = None,
        chunk_size: int | None = None,
        precision: str = "float32",
    ) -> None:
        if precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")
        self.precision = precision
        if len(input_shape) != 3:
            raise ValueError(f"input_shape must be (C, H, W), got {input_shape}")
        self.model = freeze(model)
        self.input_shape: tuple[int, int, int] = (
            int(input_shape[0]),
            int(input_shape[1]),
            int(input_shape[2]),
        )
        self.forward_numpy = forward_numpy
        self.device, _ = device_and_dtype(model)
        self.chunk_size = chunk_size or DEFAULT_CHUNK_SIZE
        if target_layer == AUTO_LAYER:
            target_layer = find_last_spatial_layer(self.model, input_shape)
        self.target_layer_name = target_layer
        self.target_layer = resolve_layer(self.model, target_layer) if target_layer else None
        self.num_classes = int(self.predict_logits(torch.zeros((1, *self.input_shape))).shape[1])

    def predict_logits(self, inputs: torch.Tensor) -> torch.Tensor:
        """Logits ``(B, K)`` float32 on the CPU, from ``forward_numpy`` when given, else torch."""
        inputs = self.validate_inputs(inputs)
        if self.forward_numpy is not None:
            array = inputs.detach().cpu().numpy()
            return torch.from_numpy(np.asarray(self.forward_numpy(array), dtype=np.float32))
        with torch.inference_mode():
            return self.model(inputs.to(self.device)).float().cpu()

    def validate_inputs(self, inputs: torch.Tensor) -> torch.Tensor:
        """``inputs`` if float32 ``(B, C, H, W)`` finite pixels in ``[0, 1]``, else an error."""
        expected = f"float32 (batch, {', '.join(map(str, self.input_shape))}) in [0, 1]"
        if not isinstance(inputs, torch.Tensor):
            raise InvalidInputError(f"inputs must be a tensor {expected}, got {type(inputs)}")
        if inputs.dtype != torch.float32:
            raise InvalidInputError(f"inputs must be {expected}, got dtype {inputs.dtype}")
        if inputs.dim() != 4 or tuple(inputs.shape[1:]) != self.input_shape:
            raise InvalidInputError(f"inputs must be {expected}, got shape {tuple(inputs.shape)}")
        if inputs.shape[0] == 0:
            raise InvalidInputError("inputs hold no image")
        # One pass over the pixels: NaN fails both comparisons and +-inf one of them, so
        # the slower isfinite scan only runs to word the error.
        low, high = torch.aminmax(inputs)
        if not (bool(low >= 0) and bool(high <= 1)):
            if not bool(torch.isfinite(inputs).all()):
                raise InvalidInputError("inputs contain NaN or infinite values")
            raise InvalidInputError(f"inputs must be {expected}, got values out of [0, 1]")
        return inputs

    def check_method(self, method: str) -> MethodSpec:
        """The method's spec if this engine can run it, else ``Unknown/UnsupportedMethodError``."""
        spec = get_method(method)
        if spec.needs_layer and self.target_layer is None:
            raise UnsupportedMethodError(f"{method!r} needs a target layer; this model has none")
        if spec.backend == "onnx" and self.forward_numpy is None:
            raise UnsupportedMethodError(f"{method!r} needs a forward-only (ONNX) model")
        return spec

    def resolve_params(
        self, method: str, overrides: Mapping[str, object] | None = None
    ) -> tuple[MethodSpec, ResolvedParams]:
        """The method's spec and typed parameters, checked against this model's input size.

        Everything that can be refused without running the model is refused here: unknown
        or unsupported method, unknown parameter, bad value, and the method's own
        cross-parameter and input-size checks.
        """
        spec = self.check_method(method)
        return spec, spec.resolve_params(overrides, self.input_shape)

    def explain(
        self,
        inputs: torch.Tensor,
        targets: TargetSpec,
        method: str,
        params: Mapping[str, object] | None = None,
        *,
        seed: int = 0,
        deadline: float | None = None,
        cancelled: Callable[[], bool] | None = None,
        progress: ProgressFn | None = None,
    ) -> Attribution:
        """Saliency maps for a batch.

        Args:
            inputs: float32 ``(B, C, H, W)`` pixels in ``[0, 1]``.
            targets: class per item (``None`` entries, or ``None`` for all: the predicted
                class).
            method: a registered method name.
            params: method parameters; missing ones take the registry defaults. Values
                already resolved (a :class:`ResolvedParams` from :meth:`resolve_params`)
                are only checked, not parsed again.
            seed: seeds the call's own generator; same seed, same result.
            deadline: ``time.monotonic()`` after which the work stops with
                ``DeadlineExceededError``.
            cancelled: polled between chunks; once it returns True the work stops with
                ``CancelledError``.
            progress: receives anytime maps of the methods that make them (occlusion's
                coarse pass, RISE's and Sobol's looks), at most one per 200 ms.

        Returns:
            The method's :class:`Attribution`, maps float32 ``(B, H, W)`` on the model's
            device.
        """
        spec, resolved = self.resolve_params(method, params)
        inputs = self.validate_inputs(inputs)
        if deadline is not None and time.monotonic() > deadline:
            raise DeadlineExceededError("deadline passed before the explanation started")
        if targets is None or not _all_given(targets):
            logits = self.predict_logits(inputs)
        else:  # every target given: only the class count is needed for the range check
            logits = torch.zeros((inputs.shape[0], self.num_classes))
        inputs = inputs.to(self.device)  # maps come back on the model's device
        target_index = resolve_targets(logits, targets).to(self.device)
        ctx = ExplainContext(
            model=self.model,
            forward_numpy=self.forward_numpy,
            target_layer=self.target_layer,
            generator=torch.Generator().manual_seed(seed),
            deadline=deadline,
            cancelled=cancelled,
            chunk_size=self.chunk_size,
            progress=progress,
        )
        ctx.check_deadline()
        with self._autocast(spec):
            result = spec.fn(ctx, inputs, target_index, **resolved)
        batch, _, height, width = inputs.shape
        if tuple(result.maps.shape) != (batch, height, width):
            raise RuntimeError(
                f"{method} returned maps of shape {tuple(result.maps.shape)}, "
                f"expected {(batch, height, width)}"
            )
        result.maps = result.maps.to(torch.float32)
        return result

    def _autocast(self, spec: MethodSpec) -> contextlib.AbstractContextManager[object]:
        """Reduced precision for the torch methods when asked for; ONNX ones run as exported."""
        dtype = PRECISIONS[self.precision]
        if dtype is None or spec.backend != "torch":
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=dtype)


def _all_given(targets: TargetSpec) -> bool:
    if isinstance(targets, torch.Tensor):
        return True
    return targets is not None and all(t is not None for t in targets)
