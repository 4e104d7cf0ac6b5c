"""``VisualizeClass``: from a request to a class-model image, checked, costed and cached.

Every check runs before the search: the class is one of the model's, the method is
registered, its parameters are typed and bounded, the model is differentiable, and the
cost (iterations x gradient rows, :mod:`service.protocol.cost`) is within the request
budget. A result is then looked up in the worker's cache, keyed by everything that
determines it -- model version, class, method, resolved parameters, seed -- so a repeated
request costs a dictionary lookup and returns the same bytes.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from service._proto.saliency.v1 import saliency_pb2 as pb
from service.engine.ops import softmax
from service.engine.registry import ResolvedParams
from service.engine.targets import check_target_range
from service.engine.types import ExplainContext
from service.engine.visualize import VISUALIZERS, Progress, VisualizerSpec, VisualizeRun
from service.protocol.cost import Item, check_budget
from service.protocol.errors import InvalidInputError
from service.protocol.limits import Limits
from service.protocol.names import VISUALIZATIONS
from service.runtime.artifacts import ModelBundle
from service.serving import codec
from service.serving.replies import timings

CACHE_ENTRIES = 64
"""Results kept per worker. One is two PNGs of the input size (about 60 KB at 128 px, a
few hundred KB at 224 px), so 64 hold at most tens of MB; they cover every class of a
1000-class model only partly, which is fine: the cache serves repeated requests (a page
shown again, a CLI run twice), not a sweep."""
MAX_IMAGE_EVERY = 4096
ProgressSink = Callable[[pb.VisualizeClassProgress], None]
CacheKey = tuple[str, int, str, ResolvedParams, int]


@dataclass(frozen=True)
class VisualizePlan:
    """A checked request: what to run, with what, and its cache key."""

    spec: VisualizerSpec
    params: ResolvedParams
    target: int
    seed: int
    image_every: int
    key: CacheKey


class ResultCache:
    """A bounded LRU of serialized responses; safe to share between threads."""

    def __init__(self, entries: int = CACHE_ENTRIES) -> None:
        self.entries = entries
        self._items: OrderedDict[CacheKey, bytes] = OrderedDict()
        self._lock = threading.Lock()
        self.hits = 0
        self.misses = 0

    def get(self, key: CacheKey) -> bytes | None:
        with self._lock:
            found = self._items.get(key)
            if found is None:
                self.misses += 1
                return None
            self.hits += 1
            self._items.move_to_end(key)
            return found

    def put(self, key: CacheKey, value: bytes) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            while len(self._items) > self.entries:
                self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)


class Visualizer:
    """Serves ``VisualizeClass`` for one model bundle."""

    def __init__(
        self, bundle: ModelBundle, limits: Limits | None = None, cache: ResultCache | None = None
    ) -> None:
        self.bundle = bundle
        self.meta = bundle.meta
        self.limits = limits or Limits()
        self.cache = cache or ResultCache()
        self.model_ref = pb.ModelRef(name=bundle.meta.name, version=bundle.meta.version)

    def plan(self, request: pb.VisualizeClassRequest) -> VisualizePlan:
        """Every check that needs no model call; domain errors name what to change."""
        check_target_range([request.target], len(self.meta.labels))
        spec = VISUALIZERS.get(VISUALIZATIONS.name(request.method))
        params = spec.resolve_params(dict(request.params), self.meta.input_size)
        if request.image_every > MAX_IMAGE_EVERY:
            raise InvalidInputError(
                f"image_every must be at most {MAX_IMAGE_EVERY}, got {request.image_every}"
            )
        label = f"{spec.name} ({', '.join(f'{k}={v}' for k, v in params.wire().items())})"
        check_budget([Item(label, spec.cost(params, self.meta.input_size))], self.limits)
        key = (self.meta.version, int(request.target), spec.name, params, int(request.seed))
        return VisualizePlan(
            spec, params, int(request.target), int(request.seed), request.image_every, key
        )

    def visualize(
        self,
        request: pb.VisualizeClassRequest,
        *,
        deadline: float | None = None,
        cancelled: Callable[[], bool] | None = None,
        progress: ProgressSink | None = None,
    ) -> pb.VisualizeClassResponse:
        """The response of one request; raises the domain error that fails it."""
        start = time.perf_counter()
        plan = self.plan(request)
        stages: dict[str, float] = {}
        cached = self.cache.get(plan.key)
        if cached is not None:
            response = pb.VisualizeClassResponse.FromString(cached)
            response.cached = True
        else:
            response = self._search(plan, deadline, cancelled, progress, stages)
            self.cache.put(plan.key, response.SerializeToString())
        stages["total"] = time.perf_counter() - start
        response.timings.extend(timings(stages))
        return response

    def _search(
        self,
        plan: VisualizePlan,
        deadline: float | None,
        cancelled: Callable[[], bool] | None,
        progress: ProgressSink | None,
        stages: dict[str, float],
    ) -> pb.VisualizeClassResponse:
        """Run the search; ``stages`` gets its time (the cached response holds none)."""
        ctx = ExplainContext(
            model=self.bundle.engine.model,
            generator=torch.Generator().manual_seed(plan.seed),
            deadline=deadline,
            cancelled=cancelled,
        )
        run = VisualizeRun(
            ctx,
            plan.target,
            self.meta.input_size,
            self.meta.mean,
            self.meta.std,
            on_progress=None if progress is None else _progress_sink(progress),
            image_every=plan.image_every,
        )
        start = time.perf_counter()
        result = plan.spec.fn(run, **plan.params)
        stages["search"] = time.perf_counter() - start
        image = np.round(result.image.detach().cpu().float().numpy() * 255.0) / 255.0
        logits = np.asarray(self.bundle.forward(image[None].astype(np.float32)), dtype=np.float32)
        response = pb.VisualizeClassResponse(
            model=self.model_ref,
            target=plan.target,
            target_label=self.meta.labels[plan.target],
            method=VISUALIZATIONS.number(plan.spec.name),  # type: ignore[arg-type]
            params=plan.params.wire(),
            seed=plan.seed,
            png=codec.encode_rgb(image),
            target_logit=float(logits[0, plan.target]),
            target_probability=float(softmax(logits)[0, plan.target]),
        )
        if result.transparency is not None:
            response.transparency.CopyFrom(
                codec.encode_map(result.transparency.detach().cpu().float().numpy())
            )
        return response


def _progress_sink(sink: ProgressSink) -> Callable[[Progress], None]:
    def report(progress: Progress) -> None:
        png = b"" if progress.image is None else codec.encode_rgb(progress.image.cpu().numpy())
        sink(
            pb.VisualizeClassProgress(
                step=progress.step, steps=progress.steps, target_logit=progress.score, png=png
            )
        )

    return report
