"""Which metric names the deploy files reference, so that tests can hold them to what runs.

Sources, all under deploy/k8s/:
- HorizontalPodAutoscaler metric names (Pods/Object/External); a name that a
  prometheus-adapter rule serves is resolved to the series that rule queries;
- prometheus-adapter rules (prometheus-adapter/values.yaml: seriesQuery, metricsQuery);
- KEDA ScaledObject prometheus triggers (metadata.query);
- PrometheusRule expressions (spec.groups[].rules[].expr);
- Grafana dashboards (*.json: panel target expressions and templating queries).

PromQL is parsed loosely: strings, label matchers, ranges, grouping clauses, Go-template
placeholders (<<.Series>>) and Grafana variables are removed, then every identifier that is
not a keyword and not followed by "(" (a function call) is a metric name.

Importing this module has no side effects; everything is computed on call.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]
K8S_DIR = REPO_ROOT / "deploy" / "k8s"
ADAPTER_VALUES = K8S_DIR / "prometheus-adapter" / "values.yaml"

# The one list of metrics that the deploy files may use although neither the gateway nor
# TorchServe exports them: name -> the exporter that provides it in the cluster.
EXTERNAL_METRICS: dict[str, str] = {
    "up": "Prometheus itself (synthetic per-target scrape health)",
    "kube_pod_container_status_restarts_total": "kube-state-metrics",
    "kube_horizontalpodautoscaler_status_current_replicas": "kube-state-metrics",
    "kube_horizontalpodautoscaler_status_desired_replicas": "kube-state-metrics",
    "kube_horizontalpodautoscaler_spec_max_replicas": "kube-state-metrics",
    "DCGM_FI_DEV_FB_USED": "NVIDIA dcgm-exporter (GPU framebuffer used, MiB)",
    "DCGM_FI_DEV_FB_FREE": "NVIDIA dcgm-exporter (GPU framebuffer free, MiB)",
    "DCGM_FI_DEV_GPU_UTIL": "NVIDIA dcgm-exporter (GPU utilisation, %)",
}

# Suffixes that prometheus_client (the gateway) adds to a family's samples: histogram
# series and counter totals. Only our own saliency_ names are mapped back to families;
# TorchServe's Java exporter names its families exactly as its samples (for example the
# counter family ts_inference_requests_total), and external names stay as written.
_OWN_PREFIX = "saliency_"
_SAMPLE_SUFFIXES = ("_bucket", "_count", "_sum", "_created", "_total")

_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "inf",
        "nan",
        "Inf",
        "NaN",
    }
)
_TEMPLATE = re.compile(r"<<[^<>]*>>")
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_BRACES = re.compile(r"\{[^{}]*\}")
# Grafana's label_values(metric, label) names a metric; label_values(label) does not.
_LABEL_VALUES = re.compile(r"\blabel_values\s*\(\s*([^,()]*?)\s*,\s*\w+\s*\)")
_LABEL_VALUES_1 = re.compile(r"\blabel_values\s*\(\s*\w+\s*\)")
_RANGE = re.compile(r"\[[^\[\]]*\]")
_GROUPING = re.compile(r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^()]*\)")
_VARIABLE = re.compile(r"\$\{[^}]*\}|\$\w+")
_IDENT = re.compile(r"(?<![\w:.$])([A-Za-z_:][\w:]*)(?![\w:])(?!\s*\()")


def promql_metric_names(expr: str) -> set[str]:
    """The metric (series) names that a PromQL expression selects."""
    text = _TEMPLATE.sub(" ", expr)
    text = _STRING.sub('""', text)
    text = _BRACES.sub(" ", text)
    text = _LABEL_VALUES.sub(r" \1 ", text)
    text = _LABEL_VALUES_1.sub(" ", text)
    text = _RANGE.sub(" ", text)
    text = _GROUPING.sub(" ", text)
    text = _VARIABLE.sub(" ", text)
    return {m for m in _IDENT.findall(text) if m not in _KEYWORDS}


def family_name(series: str) -> str:
    """The exported family a referenced series belongs to (as the TYPE line names it)."""
    if series.startswith(_OWN_PREFIX):
        for suffix in _SAMPLE_SUFFIXES:
            if series.endswith(suffix):
                return series[: -len(suffix)]
    return series


def _rel(path: Path) -> str:
    return path.relative_to(REPO_ROOT).as_posix()


def _yaml_docs(path: Path) -> Iterator[dict[str, Any]]:
    for doc in yaml.safe_load_all(path.read_text()):
        if isinstance(doc, dict):
            yield doc


def _k8s_yaml_files() -> list[Path]:
    return sorted(p for p in K8S_DIR.rglob("*.yaml") if p.name != "kustomization.yaml")


def adapter_rules() -> list[dict[str, Any]]:
    """prometheus-adapter custom rules (the Helm chart's rules.custom)."""
    values = yaml.safe_load(ADAPTER_VALUES.read_text())
    return list(((values or {}).get("rules") or {}).get("custom") or [])


def adapter_served_metrics() -> dict[str, set[str]]:
    """Custom-metric name served by the adapter -> the series names its rule queries."""
    served: dict[str, set[str]] = {}
    for rule in adapter_rules():
        series = promql_metric_names(rule.get("seriesQuery", ""))
        queried = series | promql_metric_names(rule.get("metricsQuery", ""))
        naming = rule.get("name") or {}
        matches, as_ = naming.get("matches"), naming.get("as")
        for name in series:
            if matches and as_:
                out = re.sub(matches, re.sub(r"\$\{?(\d+)\}?", r"\\\1", as_), name)
            else:
                out = name
            served.setdefault(out, set()).update(queried)
    return served


def hpa_metric_names(doc: dict[str, Any]) -> set[str]:
    names = set()
    for metric in (doc.get("spec") or {}).get("metrics") or []:
        for key in ("pods", "object", "external"):
            name = ((metric.get(key) or {}).get("metric") or {}).get("name")
            if name:
                names.add(name)
    return names


def recorded_names() -> set[str]:
    """Names defined by recording rules of our PrometheusRules (derived, not exported)."""
    out: set[str] = set()
    for path in _k8s_yaml_files():
        for doc in _yaml_docs(path):
            if doc.get("kind") == "PrometheusRule":
                for group in doc["spec"].get("groups", []):
                    out.update(r["record"] for r in group.get("rules", []) if "record" in r)
    return out


def _dashboard_exprs(node: Any) -> Iterator[str]:
    if isinstance(node, dict):
        for key, value in node.items():
            is_text = isinstance(value, str)
            if (key == "expr" and is_text) or (
                key == "query" and is_text and node.get("type") != "datasource"
            ):
                yield value
            elif key == "query" and isinstance(value, dict) and "query" in value:
                yield str(value["query"])
            else:
                yield from _dashboard_exprs(value)
    elif isinstance(node, list):
        for item in node:
            yield from _dashboard_exprs(item)


def _add(refs: dict[str, set[str]], names: Iterable[str], source: str) -> None:
    for name in names:
        refs.setdefault(name, set()).add(source)


def referenced_series() -> dict[str, set[str]]:
    """Every series name as written in the deploy files -> the files that use it."""
    refs: dict[str, set[str]] = {}
    served = adapter_served_metrics()

    adapter_src = _rel(ADAPTER_VALUES)
    for rule in adapter_rules():
        _add(refs, promql_metric_names(rule.get("seriesQuery", "")), adapter_src)
        _add(refs, promql_metric_names(rule.get("metricsQuery", "")), adapter_src)

    for path in _k8s_yaml_files():
        if path == ADAPTER_VALUES:
            continue
        src = _rel(path)
        for doc in _yaml_docs(path):
            kind = doc.get("kind")
            if kind == "HorizontalPodAutoscaler":
                for name in hpa_metric_names(doc):
                    _add(refs, served.get(name, {name}), src)
            elif kind == "ScaledObject":
                for trigger in (doc.get("spec") or {}).get("triggers") or []:
                    query = (trigger.get("metadata") or {}).get("query")
                    if trigger.get("type") == "prometheus" and query:
                        _add(refs, promql_metric_names(query), src)
            elif kind == "PrometheusRule":
                for group in (doc.get("spec") or {}).get("groups") or []:
                    for rule in group.get("rules") or []:
                        _add(refs, promql_metric_names(str(rule.get("expr", ""))), src)

    for path in sorted(K8S_DIR.rglob("*.json")):
        dashboard = json.loads(path.read_text())
        if isinstance(dashboard, dict) and "panels" in dashboard:
            for expr in _dashboard_exprs(dashboard):
                _add(refs, promql_metric_names(expr), _rel(path))

    for name in recorded_names():
        refs.pop(name, None)
    return refs


def referenced_metrics() -> dict[str, set[str]]:
    """Every metric family the deploy files reference -> the files that reference it.

    Families are named as the exporter's `# TYPE` line names them: a reference to
    saliency_request_duration_seconds_bucket counts for saliency_request_duration_seconds;
    ts_inference_requests_total stays as it is (TorchServe's own family name).
    """
    out: dict[str, set[str]] = {}
    for series, files in referenced_series().items():
        out.setdefault(family_name(series), set()).update(files)
    return out
