"""Make a model cheaper to explain without changing what it computes.

What costs time in an input gradient on CPU, and what is done about it here:

* **Batch norm.** An eval-mode ``BatchNorm2d`` is a per-channel affine map; after a
  convolution it can be folded into that convolution's weights and bias. The forward then
  skips one pass over every activation tensor, and the backward skips the batch-norm
  backward too (on ResNet-18 about a fifth of a gradient pass). The ``BatchNorm2d`` is
  replaced by ``nn.Identity`` *in place*, so every module name stays valid: a CAM target
  layer such as ``model.features.5`` still resolves and still outputs the same tensor.
* **Memory layout.** oneDNN convolutions on CPU run natively on channels-last (NHWC)
  tensors; NCHW pays for reorders in both passes. Whether it pays depends on the model
  and the device, so it is measured on the example shape (``channels_last="auto"``).
* **The input convolution.** Its input gradient (a transposed convolution down to 3
  channels) is slow in oneDNN, and a :class:`service.runtime.wrap.Normalized` model divides
  by ``std`` before it: :mod:`service.engine.stem` takes that gradient as a phase-split
  ordinary convolution and folds ``1 / std`` into the weights, kept where it is measured
  faster (``input_conv="auto"``).
* **Frozen parameters.** No parameter requires grad, so autograd neither keeps the
  tensors a weight gradient would need nor computes one: only ``d/d input`` is built.

The result is checked against the original on random inputs (logits, the input
gradient, and the outputs of the layers in ``keep``); a fold that does not reproduce them
is dropped, so an unusual model (a convolution whose output is also used elsewhere, a
shared batch norm) is served unoptimised rather than wrong.

Also here: :func:`choose_chunk_size`, rows per model pass for the sampling methods
(SmoothGrad, Integrated Gradients), measured per device.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Literal

import torch
from torch import nn

from service.engine import stem

logger = logging.getLogger(__name__)

ChannelsLast = bool | Literal["auto"]
DEFAULT_MEASURE_BATCH = 8
CHANNELS_LAST_MIN_GAIN = 0.05  # below a 5% gain, noise could have picked it: stay NCHW
# The input-convolution rewrite computes the same function (checked in float64) and never
# costs more work, so any measured gain keeps it: with a 5% bar, timing noise on a shared
# 2-core machine dropped it on ResNet-18 in one run of two (measured +4% there, +11% alone).
INPUT_CONV_MIN_GAIN = 0.0
CHUNK_CANDIDATES = (8, 16, 32, 64, 128)
CHUNK_MEMORY_FRACTION = 0.25  # of free GPU memory one chunk's activations may take
CPU_CHUNK_MEMORY = 1 << 30  # bytes one chunk's activations may take on a CPU


@dataclass
class OptimizeReport:
    """What :func:`optimize_for_inference` did, for logs and benchmarks."""

    folded: list[tuple[str, str]] = field(default_factory=list)  # (conv, batch norm) names
    channels_last: bool = False
    channels_last_gain: float | None = None  # measured 1 - t(NHWC) / t(NCHW)
    input_conv: str | None = None  # the convolution replaced by stem.InputConv2d
    input_conv_gain: float | None = None  # measured 1 - t(with) / t(without)
    notes: list[str] = field(default_factory=list)


def optimize_for_inference(
    model: nn.Module,
    example_shape: Sequence[int],
    *,
    keep: Collection[str] = (),
    fold_batch_norm: bool = True,
    channels_last: ChannelsLast = "auto",
    input_conv: ChannelsLast = "auto",
    report: OptimizeReport | None = None,
) -> nn.Module:
    """An equivalent frozen copy of ``model`` that is faster to differentiate.

    Args:
        model: pixel-space classifier (``(N, C, H, W) -> (N, K)``); left untouched.
        example_shape: ``(C, H, W)`` or ``(N, C, H, W)`` of the inputs it will see; used to
            find the conv -> batch-norm pairs, to check the result and to time layouts.
        keep: module names whose outputs must stay exactly what they were (the CAM
            target layer): a convolution named here is not folded.
        fold_batch_norm: fold eval-mode ``BatchNorm2d`` into the preceding ``Conv2d``.
        channels_last: ``True``/``False`` to force the layout, ``"auto"`` to time one
            input-gradient pass in each layout and keep NHWC only if it is faster.
        input_conv: replace the first convolution by :class:`service.engine.stem.InputConv2d`
            (``True``/``False``), or ``"auto"`` to keep it only if one input-gradient pass is
            faster with it.
        report: filled with what was done, when given.

    Returns:
        A new module in eval mode with every parameter frozen; same module names.
    """
    report = report if report is not None else OptimizeReport()
    shape = _batch_shape(example_shape)
    device, dtype = _device_dtype(model)
    optimized = _frozen(copy.deepcopy(model))
    keep = {name for name in keep if name}  # "" would name the whole model

    if fold_batch_norm:
        pairs = [p for p in _conv_bn_pairs(optimized, shape, device, dtype) if p[0] not in keep]
        if pairs:
            problem = _check_rewrite(
                optimized, _fold_all(pairs), shape, device, dtype, keep, fallback_rtol=1e-3
            )
            if problem is None:
                _fold_all(pairs)(optimized)
                report.folded = pairs
            else:
                report.notes.append(f"batch norm not folded: {problem}")
                logger.warning("batch norm left unfolded: %s", problem)

    if input_conv:
        optimized = _fold_input_conv(optimized, shape, device, dtype, keep, input_conv, report)

    use_nhwc = channels_last
    if channels_last == "auto":
        gain = _channels_last_gain(optimized, shape, device, dtype)
        report.channels_last_gain = gain
        use_nhwc = gain >= CHANNELS_LAST_MIN_GAIN
    if use_nhwc:
        optimized = _to_channels_last(optimized)
        report.channels_last = True
    return _frozen(optimized)


def _frozen(model: nn.Module) -> nn.Module:
    """Eval mode, parameters frozen; a ``torch.export`` module is in eval form already."""
    with contextlib.suppress(NotImplementedError):  # ExportedProgram.module() refuses eval()
        model.eval()
    return model.requires_grad_(False)


def _batch_shape(example_shape: Sequence[int]) -> tuple[int, ...]:
    dims = tuple(int(d) for d in example_shape)
    if len(dims) == 3:
        return (DEFAULT_MEASURE_BATCH, *dims)
    if len(dims) == 4:
        return dims
    raise ValueError(f"example_shape must be (C, H, W) or (N, C, H, W), got {dims}")


def _device_dtype(model: nn.Module) -> tuple[torch.device, torch.dtype]:
    first = next(iter([*model.parameters(), *model.buffers()]), None)
    if first is None:
        return torch.device("cpu"), torch.float32
    dtype = first.dtype if first.dtype.is_floating_point else torch.float32
    return first.device, dtype


def _example(
    shape: tuple[int, ...], device: torch.device, dtype: torch.dtype, seed: int
) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(shape, generator=gen).to(device=device, dtype=dtype)


# -- batch norm folding -------------------------------------------------------------------


def _conv_bn_pairs(
    model: nn.Module, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> list[tuple[str, str]]:
    """``(conv, bn)`` names where the batch norm's input is that convolution's output.

    Found by running one forward with hooks (so it follows the data flow of any model,
    traceable or not): each module must run exactly once, and the batch norm must receive
    the very tensor the convolution returned. Whether the convolution's output is *also*
    used elsewhere is not visible to hooks; the numerical check after folding catches it.
    """
    names = {id(m): n for n, m in model.named_modules()}
    calls: dict[str, int] = {}
    produced: dict[int, tuple[str, int]] = {}  # id(output tensor) -> (conv name, version)
    fed: dict[str, str] = {}  # bn name -> conv name
    keepalive: list[torch.Tensor] = []  # ids stay unique while the tensors live

    def conv_hook(module: nn.Module, _args: object, output: object) -> None:
        name = names[id(module)]
        calls[name] = calls.get(name, 0) + 1
        if isinstance(output, torch.Tensor):
            produced[id(output)] = (name, output._version)
            keepalive.append(output)

    def bn_hook(module: nn.Module, args: tuple[object, ...]) -> None:
        name = names[id(module)]
        calls[name] = calls.get(name, 0) + 1
        source = args[0] if args else None
        if isinstance(source, torch.Tensor) and id(source) in produced:
            conv_name, version = produced[id(source)]
            if source._version == version:  # not changed in place (conv -> ReLU_ -> BN)
                fed[name] = conv_name

    handles = []
    try:
        for module in model.modules():
            if isinstance(module, nn.Conv2d):
                handles.append(module.register_forward_hook(conv_hook))
            elif isinstance(module, nn.BatchNorm2d):
                handles.append(module.register_forward_pre_hook(bn_hook))
        with torch.no_grad():
            model(_example((1, *shape[1:]), device, dtype, seed=0))
    finally:
        for handle in handles:
            handle.remove()
    modules = dict(model.named_modules())
    pairs = []
    for bn_name, conv_name in fed.items():
        conv, bn = modules[conv_name], modules[bn_name]
        assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
        if calls.get(conv_name) != 1 or calls.get(bn_name) != 1:
            continue  # a shared module: folding would change its other uses
        if bn.training or bn.running_mean is None or bn.running_var is None:
            continue  # batch statistics, not an affine map
        if bn.num_features != conv.out_channels:
            continue
        pairs.append((conv_name, bn_name))
    return pairs


def _fold(model: nn.Module, conv_name: str, bn_name: str) -> None:
    """Fold ``bn`` into ``conv`` (in ``model``, in place) and put ``nn.Identity`` in its place.

    ``bn(conv(x)) = s * (W x + b - mean) + beta`` with ``s = gamma / sqrt(var + eps)``, so the
    folded convolution has ``W' = s W`` (per output channel) and ``b' = s (b - mean) + beta``.
    Computed in float64 so the fold adds no rounding beyond the final cast.
    """
    conv = model.get_submodule(conv_name)
    bn = model.get_submodule(bn_name)
    assert isinstance(conv, nn.Conv2d) and isinstance(bn, nn.BatchNorm2d)
    assert bn.running_mean is not None and bn.running_var is not None
    with torch.no_grad():
        var = bn.running_var.double()
        scale = torch.rsqrt(var + bn.eps)
        if bn.weight is not None:
            scale = scale * bn.weight.double()
        shift = -bn.running_mean.double() * scale
        if bn.bias is not None:
            shift = shift + bn.bias.double()
        weight = conv.weight.double() * scale.view(-1, 1, 1, 1)
        bias = shift if conv.bias is None else conv.bias.double() * scale + shift
        conv.weight = nn.Parameter(weight.to(conv.weight.dtype), requires_grad=False)
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype), requires_grad=False)
    parent_name, _, child = bn_name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, nn.Identity())


def _check_rewrite(
    reference: nn.Module,
    rewrite: Callable[[nn.Module], nn.Module],
    shape: tuple[int, ...],
    device: torch.device,
    dtype: torch.dtype,
    keep: Collection[str],
    fallback_rtol: float | None,
) -> str | None:
    """Why ``rewrite`` (applied to a copy) changes the model, or ``None`` when it does not.

    The rewrite is replayed on a float64 copy and compared with the float64 original: a
    correct rewrite agrees to ~1e-12 there, and a wrong one (a convolution output that is
    also used elsewhere) is off by orders of magnitude more. In float32 the two would differ
    by rounding alone, which a ReLU network amplifies in its input gradient (a unit whose
    pre-activation is within rounding of zero can switch), so a float32 comparison cannot
    tell a bug from rounding. A model that cannot run in float64 is compared in its own
    dtype with ``fallback_rtol``, or refused when that is ``None``.
    """
    try:
        wide = copy.deepcopy(reference).to(torch.float64)
        rewritten = rewrite(copy.deepcopy(wide))
        return _differs(wide, rewritten, shape, device, torch.float64, keep, rtol=1e-9)
    except RuntimeError as error:
        if fallback_rtol is None:
            return f"not checked in float64 ({error})"
        rewritten = rewrite(copy.deepcopy(reference))
        return _differs(reference, rewritten, shape, device, dtype, keep, rtol=fallback_rtol)


def _fold_all(pairs: Sequence[tuple[str, str]]) -> Callable[[nn.Module], nn.Module]:
    """A rewrite folding every ``(conv, bn)`` pair of ``pairs`` (in place, returning the model)."""

    def rewrite(model: nn.Module) -> nn.Module:
        for conv_name, bn_name in pairs:
            _fold(model, conv_name, bn_name)
        return model

    return rewrite


def _differs(
    reference: nn.Module,
    candidate: nn.Module,
    shape: tuple[int, ...],
    device: torch.device,
    dtype: torch.dtype,
    keep: Collection[str],
    rtol: float,
) -> str | None:
    """Why ``candidate`` is not ``reference`` on random inputs, or ``None`` when it is.

    Compares logits, the input gradient of the top logit, and the outputs of ``keep``
    layers, each as ``max |a - b| <= rtol * max |b|``.
    """
    inputs = _example((min(shape[0], 2), *shape[1:]), device, dtype, seed=1)

    def run(model: nn.Module) -> dict[str, torch.Tensor]:
        outputs: dict[str, torch.Tensor] = {}
        handles = []
        for name in keep:
            try:
                layer = model.get_submodule(name)
            except AttributeError:
                continue

            def hook(_m: nn.Module, _a: object, out: object, name: str = name) -> None:
                if isinstance(out, torch.Tensor):
                    outputs[f"layer {name}"] = out.detach().clone()

            handles.append(layer.register_forward_hook(hook))
        try:
            with torch.enable_grad():
                leaf = inputs.clone().requires_grad_(True)
                logits = model(leaf)
                top = logits.detach().argmax(dim=1, keepdim=True)
                (grad,) = torch.autograd.grad(logits.gather(1, top).sum(), leaf)
        finally:
            for handle in handles:
                handle.remove()
        outputs["logits"] = logits.detach()
        outputs["input gradient"] = grad
        return outputs

    want, got = run(reference), run(candidate)
    for key, expected in want.items():
        actual = got.get(key)
        if actual is None or actual.shape != expected.shape:
            return f"{key} missing or of another shape"
        scale = float(expected.abs().max())
        error = float((actual - expected).abs().max())
        if error > rtol * max(scale, 1e-12):
            return f"{key} differs by {error:.3g} (max |value| {scale:.3g})"
    return None


# -- input convolution ---------------------------------------------------------------------


def _fold_input_conv(
    model: nn.Module,
    shape: tuple[int, ...],
    device: torch.device,
    dtype: torch.dtype,
    keep: Collection[str],
    mode: ChannelsLast,
    report: OptimizeReport,
) -> nn.Module:
    """``model`` with :func:`stem.fold_input_convolution` applied where it is right and pays."""
    name = stem.input_convolution(model, _example((1, *shape[1:]), device, dtype, seed=0))
    if name is None or name in keep or not stem.supports(model.get_submodule(name)):
        report.notes.append("input convolution kept: none found that can be replaced")
        return model

    def rewrite(copy_of_model: nn.Module) -> nn.Module:
        return stem.fold_input_convolution(copy_of_model, name)

    problem = _check_rewrite(model, rewrite, shape, device, dtype, keep, fallback_rtol=None)
    if problem is not None:
        report.notes.append(f"input convolution kept: {problem}")
        return model
    candidate = rewrite(copy.deepcopy(model))
    if mode == "auto":
        report.input_conv_gain = _measured_gain(model, candidate, shape, device, dtype)
        if report.input_conv_gain <= INPUT_CONV_MIN_GAIN:
            return model
    report.input_conv = name
    return _frozen(candidate)


# -- channels last ------------------------------------------------------------------------


class _ChannelsLastGrad(torch.autograd.Function):
    """Identity forward; the backward hands the gradient on in channels-last layout."""

    @staticmethod
    def forward(ctx: object, x: torch.Tensor) -> torch.Tensor:
        return x.view_as(x)

    @staticmethod
    def backward(ctx: object, grad: torch.Tensor) -> torch.Tensor:
        return grad.contiguous(memory_format=torch.channels_last)


class ChannelsLastGradPool(nn.AdaptiveAvgPool2d):
    """``AdaptiveAvgPool2d`` whose input gradient comes back channels-last.

    The pooling backward writes an NCHW gradient, while the ReLU before it saved its
    output channels-last; ``threshold_backward`` over two layouts runs an elementwise loop
    that is tens of times slower than over one (0.13 ms vs 5 ms for 1M floats on this
    CPU). One reorder here keeps every ReLU backward on the fast path.
    """

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        return super().forward(_ChannelsLastGrad.apply(input))


def _to_channels_last(model: nn.Module) -> nn.Module:
    """``model`` (in place) with 4-D weights channels-last and its global pools swapped."""
    model = model.to(memory_format=torch.channels_last)  # type: ignore[call-overload]
    for name, module in list(model.named_modules()):
        if name and type(module) is nn.AdaptiveAvgPool2d:
            parent_name, _, child = name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            setattr(parent, child, ChannelsLastGradPool(module.output_size))
    return model


# -- timing -----------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _gradient_pass(model: nn.Module, inputs: torch.Tensor) -> Callable[[], None]:
    """One input-gradient pass, as the engine runs it."""

    def run() -> None:
        with torch.enable_grad():
            leaf = inputs.detach().clone().requires_grad_(True)
            torch.autograd.grad(model(leaf)[:, 0].sum(), leaf)

    return run


def _time_interleaved(
    fns: Sequence[Callable[[], None]], device: torch.device, repeats: int = 5
) -> list[float]:
    """Fastest of ``repeats`` runs of each function, timed in turn after a warm-up.

    The minimum, not the median: load from other processes only ever adds time, so the
    fastest run is the best estimate of what each variant costs on an idle device.
    """
    for fn in fns:
        fn()
    times: list[list[float]] = [[] for _ in fns]
    for _ in range(repeats):
        for slot, fn in enumerate(fns):
            _sync(device)
            start = time.perf_counter()
            fn()
            _sync(device)
            times[slot].append(time.perf_counter() - start)
    return [min(t) for t in times]


def _channels_last_gain(
    model: nn.Module, shape: tuple[int, ...], device: torch.device, dtype: torch.dtype
) -> float:
    """``1 - t(NHWC) / t(NCHW)`` of one input-gradient pass on ``shape``."""
    if not any(isinstance(m, nn.Conv2d) for m in model.modules()):
        return 0.0
    nhwc = _to_channels_last(copy.deepcopy(model))
    return _measured_gain(model, nhwc, shape, device, dtype)


def _measured_gain(
    before: nn.Module,
    after: nn.Module,
    shape: tuple[int, ...],
    device: torch.device,
    dtype: torch.dtype,
) -> float:
    """``1 - t(after) / t(before)`` of one input-gradient pass on ``shape``, timed in turn."""
    inputs = _example(shape, device, dtype, seed=2)
    t_before, t_after = _time_interleaved(
        [_gradient_pass(before, inputs), _gradient_pass(after, inputs)], device
    )
    return 1.0 - t_after / t_before


def choose_chunk_size(
    model: nn.Module,
    input_shape: Sequence[int],
    *,
    candidates: Sequence[int] = CHUNK_CANDIDATES,
    repeats: int = 3,
    memory_budget: int | None = None,
) -> tuple[int, dict[int, float]]:
    """Rows per input-gradient pass that give the most rows per second on this device.

    Sampling methods (SmoothGrad: ``n_samples x B`` rows, Integrated Gradients: ``n_steps x
    B``) run their rows through the model ``chunk_size`` at a time. Too small a chunk
    leaves the cores idle between small kernels; too large a chunk spills activations out
    of cache (CPU) or device memory (GPU). Candidates whose activations exceed the memory
    budget are not tried.

    Args:
        model: the (optimised) model.
        input_shape: ``(C, H, W)``.
        candidates: chunk sizes to try, ascending.
        repeats: timed passes per candidate (the fastest counts).
        memory_budget: bytes one chunk's activations may take; default a quarter of the
            free memory on a GPU, ``CPU_CHUNK_MEMORY`` on a CPU.

    Returns:
        ``(best chunk size, {chunk size: seconds per row})``; the smallest candidate when
        none fits.
    """
    device, dtype = _device_dtype(model)
    shape = tuple(int(d) for d in input_shape[-3:])
    if memory_budget is None:
        free = _free_device_bytes(device)
        memory_budget = int(CHUNK_MEMORY_FRACTION * free) if free is not None else CPU_CHUNK_MEMORY
    per_image = activation_bytes_per_image(model, shape)
    per_row: dict[int, float] = {}
    for size in candidates:
        if size * per_image > memory_budget:
            break
        inputs = _example((size, *shape), device, dtype, seed=3)
        (seconds,) = _time_interleaved([_gradient_pass(model, inputs)], device, repeats)
        per_row[size] = seconds / size
    if not per_row:
        return min(candidates), per_row
    best = min(per_row, key=lambda s: per_row[s])
    # Within 3% of the best, prefer the smallest: same speed, less memory, finer deadlines.
    good = [s for s in per_row if per_row[s] <= 1.03 * per_row[best]]
    return min(good), per_row


def _free_device_bytes(device: torch.device) -> int | None:
    if device.type != "cuda":
        return None
    free, _total = torch.cuda.mem_get_info(device)
    return int(free)


def activation_bytes_per_image(model: nn.Module, input_shape: Sequence[int]) -> int:
    """Bytes autograd keeps for the backward of one image's input gradient.

    Counts every tensor saved for backward during one forward of a batch of 2, by storage
    (a tensor saved by two ops counts once), leaving out parameters and buffers (they are
    not per image), and halves the sum.
    """
    device, dtype = _device_dtype(model)
    shape = tuple(int(d) for d in input_shape[-3:])
    weights = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    seen: dict[int, int] = {}

    def pack(tensor: torch.Tensor) -> torch.Tensor:
        storage = tensor.untyped_storage()
        if storage.data_ptr() not in weights:
            seen[storage.data_ptr()] = storage.nbytes()
        return tensor

    inputs = _example((2, *shape), device, dtype, seed=4)
    with torch.enable_grad(), torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        leaf = inputs.requires_grad_(True)
        logits = model(leaf)  # held until the sum: freed storages could reuse addresses
    del logits
    return sum(seen.values()) // 2
