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

from service.engine.attention_info import AttentionInfo, find_attention
from service.engine.cam_layer import CamLayer
from service.engine.layer_finder import describe_layer, find_cam_layer
from service.engine.layers import resolve_layer
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
        target_layer: the layer CAM methods use: a :class:`CamLayer` (as ``model.json``
            records it), a dotted name (checked by :func:`describe_layer`), ``"auto"`` to
            find it (:func:`find_cam_layer`), or ``None``. CAM methods are unavailable
            without one, or when the name or the model does not give one: the reason is
            :meth:`unavailable_reason`'s answer.
        attention: the model's self-attention for the transformer-native methods: an
            :class:`AttentionInfo` (as ``model.json`` records it), ``"auto"`` to find it
            (:func:`find_attention`), or ``None`` (those methods are unavailable).
        unavailable: why there is no CAM layer (``"layer"``) or attention
            (``"attention"``) when they are ``None``, as ``archive`` recorded it.
        input_shape: ``(C, H, W)`` every input must have.
        forward_numpy: fast forward (e.g. ONNX Runtime) for predictions and forward-only
            methods. Without it :meth:`predict_logits` uses the torch model and methods
            with the ``onnx`` backend are unsupported.
        chunk_size: rows per model pass for methods that evaluate many perturbed copies.
        forward_chunk_size: rows per ``forward_numpy`` call of the forward-only methods
            (chosen per model by :mod:`service.runtime.ort_choice`); default ``chunk_size``.
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
        target_layer: str | CamLayer | None = None,
        attention: str | AttentionInfo | None = None,
        unavailable: Mapping[str, str] | None = None,
        input_shape: tuple[int, int, int],
        forward_numpy: NumpyForward | None = None,
        chunk_size: int | None = None,
        forward_chunk_size: int | None = None,
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
        self.forward_chunk_size = forward_chunk_size or self.chunk_size
        self.unavailable = dict(unavailable or {})  # "layer" / "attention" -> why not
        self.cam_layer = self._cam_layer(target_layer)
        self.target_layer_name = self.cam_layer.name if self.cam_layer else None
        self.target_layer = (
            resolve_layer(self.model, self.cam_layer.name) if self.cam_layer else None
        )
        self.attention = self._attention(attention)
        self.num_classes = int(self.predict_logits(torch.zeros((1, *self.input_shape))).shape[1])

    def _cam_layer(self, given: str | CamLayer | None) -> CamLayer | None:
        if isinstance(given, CamLayer):
            return given
        if not given:
            self.unavailable.setdefault("layer", "this model has no CAM layer")
            return None
        try:
            if given == AUTO_LAYER:
                return find_cam_layer(self.model, self.input_shape)
            return describe_layer(self.model, given, self.input_shape)
        except UnsupportedMethodError as error:
            self.unavailable["layer"] = str(error)
            return None

    def _attention(self, given: str | AttentionInfo | None) -> AttentionInfo | None:
        if isinstance(given, AttentionInfo):
            return given
        if given != AUTO_LAYER:
            self.unavailable.setdefault("attention", "this model has no attention layers recorded")
            return None
        try:
            return find_attention(self.model, self.input_shape, self.cam_layer)
        except UnsupportedMethodError as error:
            self.unavailable["attention"] = str(error)
            return None

    def unavailable_reason(self, spec: MethodSpec) -> str | None:
        """Why this engine cannot run ``spec``, or ``None`` when it can."""
        if spec.needs_layer and self.cam_layer is None:
            return self.unavailable["layer"]
        if spec.needs_attention and self.attention is None:
            return self.unavailable["attention"]
        if spec.backend == "onnx" and self.forward_numpy is None:
            return "it needs a forward-only (ONNX) model, which this host has not loaded"
        return None

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
        reason = self.unavailable_reason(spec)
        if reason is not None:
            raise UnsupportedMethodError(f"{method!r} is unavailable for this model: {reason}")
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
            cam_layer=self.cam_layer,
            attention=self.attention,
            generator=torch.Generator().manual_seed(seed),
            deadline=deadline,
            cancelled=cancelled,
            # Forward-only methods run ONNX Runtime, whose best rows per run differ.
            chunk_size=self.forward_chunk_size if spec.forward_only else self.chunk_size,
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
