"""Every metric the HPA, adapter rules, KEDA, alerts and dashboard name is really exported.

saliency_* families come from the gateway's registry (service/gateway/metrics.py);
TorchServe's names from its metrics.yaml (in metrics_mode=prometheus TorchServe 0.12
exposes each entry under exactly that name on :8082, counters included); anything else
must be listed in metric_refs.EXTERNAL_METRICS with the exporter that provides it.
A separate integration test checks referenced_metrics() against live scrapes.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import yaml
from prometheus_client import CollectorRegistry

from service.gateway.metrics import GatewayMetrics
from tests.deploy import metric_refs
from tests.deploy.metric_refs import (
    EXTERNAL_METRICS,
    family_name,
    promql_metric_names,
    referenced_metrics,
    referenced_series,
)

# Sample names prometheus_client exposes for a family of each type.
_SAMPLE_SUFFIXES = {
    "histogram": ("_bucket", "_sum", "_count"),
    "summary": ("_sum", "_count", ""),
    "counter": ("_total",),
    "gauge": ("",),
}


def gateway_families() -> dict[str, str]:
    """name -> type of every family the gateway registers."""
    registry = CollectorRegistry()
    GatewayMetrics(registry)
    return {m.name: m.type for m in registry.collect()}


def torchserve_metric_names() -> set[str]:
    spec = importlib.util.find_spec("ts")
    assert spec and spec.submodule_search_locations, "TorchServe (package ts) is not installed"
    path = Path(next(iter(spec.submodule_search_locations))) / "configs" / "metrics.yaml"
    config = yaml.safe_load(path.read_text())
    names: set[str] = set()
    for section in ("ts_metrics", "model_metrics"):
        for entries in (config.get(section) or {}).values():
            names.update(e["name"] for e in entries or [])
    return names


def test_module_has_no_side_effects_and_finds_every_source() -> None:
    refs = referenced_metrics()
    sources = {f for files in refs.values() for f in files}
    for expected in (
        "base/hpa.yaml",
        "prometheus-adapter/values.yaml",
        "components/keda/scaledobject.yaml",
        "monitoring/prometheusrule.yaml",
        "monitoring/grafana-dashboard.json",
    ):
        assert any(s.endswith(expected) for s in sources), f"nothing parsed from {expected}"


def test_saliency_metrics_are_gateway_families() -> None:
    families = gateway_families()
    for name, files in referenced_metrics().items():
        if name.startswith("saliency_"):
            assert name in families, (
                f"{name} (used in {sorted(files)}) is not exported by the gateway"
            )


def test_saliency_series_fit_their_family_type() -> None:
    """A _bucket of a gauge, or a raw gauge name for a histogram, would be empty in Prometheus."""
    families = gateway_families()
    for series, files in referenced_series().items():
        if not series.startswith("saliency_"):
            continue
        family = family_name(series)
        allowed = {family + s for s in _SAMPLE_SUFFIXES[families[family]]}
        assert series in allowed, f"{series} (in {sorted(files)}) is not a sample of {family}"


def test_torchserve_metrics_are_in_its_metrics_yaml() -> None:
    ts_names = torchserve_metric_names()
    assert {"ts_inference_requests_total", "ts_queue_latency_microseconds"} <= ts_names
    for name, files in referenced_metrics().items():
        if name.startswith("ts_"):
            assert name in ts_names, f"{name} (used in {sorted(files)}) is not a TorchServe metric"


def test_nothing_else_is_referenced_but_declared_externals() -> None:
    ours = set(gateway_families()) | torchserve_metric_names()
    unknown = {
        n: sorted(f)
        for n, f in referenced_metrics().items()
        if n not in ours and n not in EXTERNAL_METRICS
    }
    assert not unknown, f"undeclared metrics (export them or add to EXTERNAL_METRICS): {unknown}"


def test_external_metrics_are_used_and_do_not_shadow_ours() -> None:
    refs = referenced_metrics()
    ours = set(gateway_families()) | torchserve_metric_names()
    assert not set(EXTERNAL_METRICS) & ours
    assert not set(EXTERNAL_METRICS) - set(refs), "stale EXTERNAL_METRICS entries"
    assert all(EXTERNAL_METRICS.values())


def test_hpa_metric_resolves_to_exported_series() -> None:
    served = metric_refs.adapter_served_metrics()
    assert served["saliency_requests_in_flight"] == {"saliency_requests_in_flight"}
    assert all(promql for promql in served.values())


@pytest.mark.parametrize(
    ("expr", "names"),
    [
        ('sum by (le, model) (rate(a_bucket{code=~"A|B", x="y,z"}[5m]))', {"a_bucket"}),
        ("histogram_quantile(0.95, sum(rate(b_bucket[$__rate_interval])) by (le))", {"b_bucket"}),
        ("rate(c[5m]) / on (pod) group_left(node) d > bool 1e6", {"c", "d"}),
        ("max_over_time(e[10m:1m] offset 1h) and f unless g or h", {"e", "f", "g", "h"}),
        ("sum by (<<.GroupBy>>) (rate(<<.Series>>{<<.LabelMatchers>>}[2m]))", set()),
        ('label_values(i{namespace="$namespace"}, model)', {"i"}),
        ("label_values(namespace)", set()),
        ('changes(WorkerLoadTime{namespace="saliency"}[15m]) > 0', {"WorkerLoadTime"}),
        (
            "DCGM_FI_DEV_FB_USED / (DCGM_FI_DEV_FB_USED + DCGM_FI_DEV_FB_FREE)",
            {"DCGM_FI_DEV_FB_USED", "DCGM_FI_DEV_FB_FREE"},
        ),
        ('vector(1) + scalar(j) * count_values("v", k)', {"j", "k"}),
    ],
)
def test_promql_parser(expr: str, names: set[str]) -> None:
    assert promql_metric_names(expr) == names


@pytest.mark.parametrize(
    ("series", "family"),
    [
        ("saliency_request_duration_seconds_bucket", "saliency_request_duration_seconds"),
        ("saliency_request_duration_seconds_count", "saliency_request_duration_seconds"),
        ("saliency_request_duration_seconds_sum", "saliency_request_duration_seconds"),
        ("saliency_requests_in_flight", "saliency_requests_in_flight"),
        ("ts_inference_requests_total", "ts_inference_requests_total"),
        ("kube_pod_container_status_restarts_total", "kube_pod_container_status_restarts_total"),
    ],
)
def test_family_name(series: str, family: str) -> None:
    assert family_name(series) == family
