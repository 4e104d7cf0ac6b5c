"""Prometheus metrics of the gateway: the names here are the contract with deploy/.

Every label takes values from a closed set (RPC names, registry method names, stage names,
gRPC code names, served model names), never free-form request data.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

# Latency buckets in seconds: explanations range from ~5 ms (forward only) to tens of
# seconds (Sobol with thousands of forwards).
LATENCY_BUCKETS = (
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
)
STAGES = ("decode", "forward", "explain", "mask", "score", "encode", "upstream")


class GatewayMetrics:
    """The gateway's metric families, registered on their own registry (tests make many)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        self.request_duration = Histogram(
            "saliency_request_duration_seconds",
            "Latency of one gRPC call at the gateway, by RPC, model and status code.",
            ("method", "model", "code"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.stage_duration = Histogram(
            "saliency_stage_duration_seconds",
            "Time spent in one stage of a request (as reported by the handler), by stage,"
            " explanation method and model.",
            ("stage", "explainer", "model"),
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.in_flight = Gauge(
            "saliency_requests_in_flight",
            "gRPC calls being served by this gateway right now.",
            registry=self.registry,
        )
        self.upstream_ready = Gauge(
            "saliency_upstream_ready",
            "1 when a worker of every pool of every model answered a probe lately, else 0.",
            registry=self.registry,
        )
        self.upstream_retries = Counter(
            "saliency_upstream_retries",
            "Calls sent to TorchServe once more because their worker died or TorchServe was"
            " briefly unreachable, by model.",
            ("model",),
            registry=self.registry,
        )
