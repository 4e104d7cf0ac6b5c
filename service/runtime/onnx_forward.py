"""ONNX Runtime forward: the fast, forward-only path of the engine.

Forward-only explanation methods (occlusion, RISE, Sobol) and faithfulness scores call the
model thousands of times per request, so they run here rather than in eager torch. The
provider is picked at run time (CUDA when the installed onnxruntime has it, else CPU) so one
code path serves the GPU image and development machines.
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:
        return None


def cgroup_cpu_limit(root: str | os.PathLike[str] = "/") -> float | None:
    """CPUs granted by the container's cgroup CPU quota, or ``None`` when unlimited.

    Reads cgroup v2 ``sys/fs/cgroup/cpu.max`` (``"<quota> <period>"`` or ``"max <period>"``),
    then cgroup v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us`` (quota ``-1`` = unlimited).

    Args:
        root: filesystem root to read from; tests point it at fake cgroup files.

    Returns:
        quota / period as a float, or ``None`` when no quota applies or none is readable.
    """
    base = Path(root) / "sys" / "fs" / "cgroup"
    v2 = _read(base / "cpu.max")
    if v2 is not None:
        parts = v2.split()
        if len(parts) == 2 and parts[0] != "max":
            try:
                quota, period = int(parts[0]), int(parts[1])
            except ValueError:
                return None
            return quota / period if quota > 0 and period > 0 else None
        return None
    for sub in ("cpu", "cpu,cpuacct", "cpuacct,cpu"):
        quota_text = _read(base / sub / "cpu.cfs_quota_us")
        period_text = _read(base / sub / "cpu.cfs_period_us")
        if quota_text is None or period_text is None:
            continue
        try:
            quota, period = int(quota_text), int(period_text)
        except ValueError:
            return None
        return quota / period if quota > 0 and period > 0 else None
    return None


def cpu_quota(root: str | os.PathLike[str] = "/") -> int:
    """Threads worth running in this container: the cgroup quota, capped by CPU affinity.

    ``os.cpu_count()`` reports the node's cores (e.g. 64 on a Kubernetes node) even when the
    pod may use 2; sizing thread pools from it makes the kernel throttle the pod and the
    latency collapse. A fractional quota rounds down (1.5 CPUs -> 1 thread), never below 1.

    Args:
        root: filesystem root holding ``sys/fs/cgroup``; tests pass a fake tree.

    Returns:
        At least 1.
    """
    try:
        affinity = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        affinity = os.cpu_count() or 1
    limit = cgroup_cpu_limit(root)
    if limit is None:
        return max(1, affinity)
    return max(1, min(affinity, math.floor(limit)))


OPTIMIZATION_LEVELS = {
    "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
    "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
    "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
}
"""``graph_optimization_level`` by the name a setting or ``SALIENCY_ORT_SETTINGS`` uses."""


def default_providers() -> list[str]:
    """CUDA first when this onnxruntime build offers it, CPU always as the fallback."""
    available = ort.get_available_providers()
    if "CUDAExecutionProvider" in available:
        return ["CUDAExecutionProvider", "CPUExecutionProvider"]
    return ["CPUExecutionProvider"]


class OnnxForward:
    """A pixel-space ONNX model as ``(N, C, H, W) float32 -> (N, K) float32 logits``.

    Satisfies :data:`service.engine.types.NumpyForward`. One instance may be called from
    several threads: ``InferenceSession.run`` is thread-safe.

    Args:
        path_or_bytes: ``model.onnx`` path, or the serialized model.
        providers: execution providers in order of preference; default
            :func:`default_providers`.
        intra_op_threads: threads of one forward on CPU; default :func:`cpu_quota`.
        max_batch: largest batch sent to the session at once; bigger inputs are split so
            device memory stays bounded whatever the caller passes.
        optimization: ONNX Runtime's graph optimisation level, one of
            :data:`OPTIMIZATION_LEVELS` (``"all"``: every fusion, the usual best).
        parallel: run independent graph branches in parallel (``ORT_PARALLEL``, with
            ``intra_op_threads`` inter-op threads) instead of one operator at a time.
            :mod:`service.runtime.ort_choice` picks these two per model by measurement.
    """

    def __init__(
        self,
        path_or_bytes: str | os.PathLike[str] | bytes,
        *,
        providers: Sequence[str] | None = None,
        intra_op_threads: int | None = None,
        max_batch: int = 64,
        optimization: str = "all",
        parallel: bool = False,
    ) -> None:
        if max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {max_batch}")
        if optimization not in OPTIMIZATION_LEVELS:
            raise ValueError(
                f"optimization must be one of {sorted(OPTIMIZATION_LEVELS)}, got {optimization!r}"
            )
        threads = intra_op_threads or cpu_quota()
        options = ort.SessionOptions()
        options.graph_optimization_level = OPTIMIZATION_LEVELS[optimization]
        # By default one request's forwards are a chain of batches: parallelism belongs
        # inside each operator (intra-op), not across graph branches.
        options.execution_mode = (
            ort.ExecutionMode.ORT_PARALLEL if parallel else ort.ExecutionMode.ORT_SEQUENTIAL
        )
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = threads if parallel else 1
        # ORT's intra-op threads spin for a while after each run, waiting for the next one.
        # In this process torch runs next (the gradient after the prediction), and on two
        # cores the spinning threads took its CPU: a default-model forward right after an
        # ORT run cost 10.1 ms against 5.9 ms with spinning stopped at the end of each run,
        # which costs ORT itself 4-7% on back-to-back runs.
        options.add_session_config_entry("session.force_spinning_stop", "1")
        model = path_or_bytes if isinstance(path_or_bytes, bytes) else os.fspath(path_or_bytes)
        self._session = ort.InferenceSession(
            model, sess_options=options, providers=list(providers or default_providers())
        )
        inputs = self._session.get_inputs()
        outputs = self._session.get_outputs()
        if len(inputs) != 1:
            raise ValueError(f"expected a model with one input, got {len(inputs)}")
        self._input_name: str = inputs[0].name
        self._output_name: str = outputs[0].name
        self._input_shape = tuple(d if isinstance(d, int) else None for d in inputs[0].shape[1:])
        last = outputs[0].shape[-1] if outputs[0].shape else None
        self._num_classes = last if isinstance(last, int) else None
        self.max_batch = max_batch

    @property
    def input_shape(self) -> tuple[int | None, ...]:
        """``(C, H, W)`` without the batch axis; ``None`` where the model's axis is dynamic."""
        return self._input_shape

    @property
    def num_classes(self) -> int | None:
        """Size of the logits' last axis, ``None`` if the model leaves it dynamic."""
        return self._num_classes

    @property
    def session(self) -> ort.InferenceSession:
        """The underlying session (benchmarks time IO binding on it)."""
        return self._session

    @property
    def providers(self) -> list[str]:
        """Providers the session actually runs on (after any fallback)."""
        return list(self._session.get_providers())

    def _run(self, batch: np.ndarray) -> np.ndarray:
        out = self._session.run([self._output_name], {self._input_name: batch})[0]
        return np.asarray(out, dtype=np.float32)

    def __call__(self, pixels: np.ndarray) -> np.ndarray:
        """Logits of a batch.

        Args:
            pixels: float32 ``(N, C, H, W)`` in ``[0, 1]`` (other dtypes are converted).

        Returns:
            float32 ``(N, K)`` logits, in input order.
        """
        pixels = np.ascontiguousarray(pixels, dtype=np.float32)
        n = pixels.shape[0]
        if n == 0:
            return np.zeros((0, self._num_classes or 0), dtype=np.float32)
        if n <= self.max_batch:
            return self._run(pixels)
        first = self._run(pixels[: self.max_batch])
        out = np.empty((n, *first.shape[1:]), dtype=np.float32)
        out[: self.max_batch] = first
        for start in range(self.max_batch, n, self.max_batch):
            stop = min(start + self.max_batch, n)
            out[start:stop] = self._run(pixels[start:stop])
        return out
