"""grpc.health.v1 statuses that say whether a request can be answered now.

TorchServe's own word is not enough: its management API lists a worker as READY after its
process died or froze, and its ``Ping`` answers from the Java frontend alone. So health
asks the way a client would: a ``model_info`` request (cheap; a worker answers it) through
``Predictions`` to each of TorchServe's models -- a served model's explain pool and its
forward-only pool -- and counts any real answer from a worker as an answer too. A pool is
up while it answered within ``stale_after_s``; the frontend is up while ``Ping`` answers,
checked every ``interval_s`` (a dead Java process refuses the connection at once, so
health turns NOT_SERVING within about one interval; a ping that is merely slow under load
changes nothing).

Services reported (``grpc-health-probe -service=...``, the kubelet's ``grpc`` probe):

* ``""`` and ``saliency.v1.ExplainService``: every pool of every model is up;
* ``<model>``: both pools of that model are up;
* ``<model>/explain``, ``<model>/predict``: that pool is up.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Sequence

from grpc_health.v1 import health, health_pb2

from service.gateway.metrics import GatewayMetrics
from service.gateway.upstream import TorchServeClient, predict_pool

logger = logging.getLogger(__name__)
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class BackendHealth:
    """Probes TorchServe's pools and publishes what it finds on a health servicer.

    Args:
        upstream: the gateway's TorchServe client.
        models: the served model names.
        servicer: the gRPC health servicer the statuses go to.
        api_service: the API's full service name (reported like ``""``).
        split_pools: whether each model has a forward-only pool (:func:`predict_pool`).
        interval_s: seconds between checks.
        stale_after_s: a pool that has not answered for this long is down.
    """

    def __init__(
        self,
        upstream: TorchServeClient,
        models: Sequence[str],
        servicer: health.aio.HealthServicer,
        metrics: GatewayMetrics,
        *,
        api_service: str,
        split_pools: bool = True,
        interval_s: float = 1.0,
        stale_after_s: float = 10.0,
    ) -> None:
        self.upstream = upstream
        self.servicer = servicer
        self.metrics = metrics
        self.api_service = api_service
        self.interval_s = interval_s
        self.stale_after_s = stale_after_s
        self.pools: dict[str, dict[str, str]] = {
            model: {"explain": model, "predict": predict_pool(model) if split_pools else model}
            for model in models
        }
        self.answered: dict[str, float] = {}
        self.frontend_up = False
        self.published: dict[str, int] = {}
        self._probes: dict[str, asyncio.Task[None]] = {}

    def answered_now(self, ts_model: str) -> None:
        """A worker of ``ts_model`` just answered (a probe or a real call)."""
        self.answered[ts_model] = time.monotonic()

    def pool_up(self, ts_model: str) -> bool:
        seen = self.answered.get(ts_model)
        return (
            self.frontend_up and seen is not None and time.monotonic() - seen < self.stale_after_s
        )

    def statuses(self) -> dict[str, int]:
        """Service name -> SERVING or NOT_SERVING, from what is known now."""
        out: dict[str, int] = {}
        for model, pools in self.pools.items():
            for kind, ts_model in pools.items():
                out[f"{model}/{kind}"] = SERVING if self.pool_up(ts_model) else NOT_SERVING
            both = all(self.pool_up(ts_model) for ts_model in pools.values())
            out[model] = SERVING if both else NOT_SERVING
        every = all(out[model] == SERVING for model in self.pools)
        out[""] = out[self.api_service] = SERVING if every else NOT_SERVING
        return out

    async def check(self) -> None:
        """One round: ping the frontend, start the probes not in flight, publish."""
        # A ping that times out says "busy", not "gone": keep what we knew.
        reached = await self.upstream.ping(timeout=max(2 * self.interval_s, 1.0))
        if reached is not None:
            self.frontend_up = reached
        if self.frontend_up:
            for ts_model in {p for pools in self.pools.values() for p in pools.values()}:
                if ts_model not in self._probes:
                    self._probes[ts_model] = asyncio.create_task(self._probe(ts_model))
        await self.publish()

    async def first_round(self, timeout: float) -> None:
        """A check that waits (up to ``timeout``) for its probes, so a gateway that just
        started reports what is true rather than NOT_SERVING for one interval."""
        await self.check()
        if self._probes:
            await asyncio.wait(list(self._probes.values()), timeout=timeout)
        await self.publish()

    async def _probe(self, ts_model: str) -> None:
        try:
            await self.upstream.call(
                ts_model, "model_info", b"", self.stale_after_s, model=ts_model, retry=False
            )
        except Exception as exc:  # any failure is "no answer"; the next round tries again
            logger.debug("health probe of %s failed: %s", ts_model, exc)
        finally:
            self._probes.pop(ts_model, None)

    async def publish(self) -> None:
        for service, status in self.statuses().items():
            if self.published.get(service) != status:
                await self.servicer.set(service, status)
                self.published[service] = status
        self.metrics.upstream_ready.set(1 if self.published.get("") == SERVING else 0)

    async def run(self) -> None:
        """Check every ``interval_s`` until cancelled (after :meth:`first_round`)."""
        while True:
            await asyncio.sleep(self.interval_s)
            try:
                await self.check()
            except Exception:  # health must outlive any one failed round
                logger.exception("health check round failed")

    async def close(self) -> None:
        for task in list(self._probes.values()):
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
