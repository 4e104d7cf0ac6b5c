"""What the rendered overlays must say: GPU placement, security, probes, wiring, autoscaling."""

from __future__ import annotations

import re
from typing import Any

import pytest

from service.gateway.metrics import GatewayMetrics
from tests.deploy import metric_refs
from tests.deploy.support import (
    CPU_OVERLAYS,
    GPU_OVERLAYS,
    OVERLAYS,
    REPO_ROOT,
    Rendered,
)

GPU = "nvidia.com/gpu"
# Overlays named *-keda scale with KEDA's ScaledObject, the others with the plain HPA.
KEDA_OVERLAYS = [o for o in OVERLAYS if o.endswith("-keda")]
HPA_OVERLAYS = [o for o in OVERLAYS if o not in KEDA_OVERLAYS]
CONTAINERS = ("gateway", "torchserve")


def _proto_service() -> str:
    text = (REPO_ROOT / "protos" / "saliency" / "v1" / "saliency.proto").read_text()
    package = re.search(r"^package\s+([\w.]+);", text, re.M)
    service = re.search(r"^service\s+(\w+)", text, re.M)
    assert package and service
    return f"{package.group(1)}.{service.group(1)}"


def _properties(text: str) -> dict[str, str]:
    out = {}
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#") and "=" in line:
            key, value = line.split("=", 1)
            out[key.strip()] = value.strip()
    return out


def _torchserve_config(r: Rendered) -> dict[str, str]:
    volumes = {v["name"]: v for v in r.pod_spec["volumes"]}
    mount = next(
        m for m in r.container("torchserve")["volumeMounts"] if m["mountPath"] == "/etc/torchserve"
    )
    cm_name = volumes[mount["name"]]["configMap"]["name"]
    return _properties(r.one("ConfigMap", cm_name)["data"]["config.properties"])


def _arg(container: dict[str, Any], flag: str) -> str:
    args = container["args"]
    return args[args.index(flag) + 1]


def _port(container: dict[str, Any], name: str) -> int:
    return next(p["containerPort"] for p in container["ports"] if p["name"] == name)


def test_overlays_exist() -> None:
    assert "gpu" in OVERLAYS and "cpu" in OVERLAYS
    assert GPU_OVERLAYS and CPU_OVERLAYS and KEDA_OVERLAYS and HPA_OVERLAYS


def test_expected_objects(rendered: Rendered) -> None:
    kinds = {o["kind"] for o in rendered.objects}
    assert {
        "Namespace",
        "ServiceAccount",
        "Deployment",
        "Service",
        "ConfigMap",
        "PodDisruptionBudget",
        "NetworkPolicy",
        "ServiceMonitor",
        "PrometheusRule",
    } <= kinds
    # Exactly one autoscaler: the HPA, or KEDA's ScaledObject (which creates its own HPA).
    assert len(rendered.of_kind("HorizontalPodAutoscaler") + rendered.of_kind("ScaledObject")) == 1
    for obj in rendered.objects:
        if obj["kind"] != "Namespace":
            assert obj["metadata"].get("namespace") == "saliency", obj["metadata"]["name"]


def test_two_containers_from_one_image(rendered: Rendered) -> None:
    names = sorted(c["name"] for c in rendered.pod_spec["containers"])
    assert names == sorted(CONTAINERS)
    images = {c["image"] for c in rendered.pod_spec["containers"]}
    assert len(images) == 1
    image = images.pop()
    assert ":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest")
    flavour = "gpu" if rendered.overlay in GPU_OVERLAYS else "cpu"
    assert image.endswith(f"-{flavour}"), image


# --- GPU placement ---------------------------------------------------------------------


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_gpu_overlay_asks_for_a_gpu(render_overlay, overlay: str) -> None:
    r = render_overlay(overlay)
    resources = r.container("torchserve")["resources"]
    assert int(resources["limits"][GPU]) == 1
    assert int(resources.get("requests", {}).get(GPU, 1)) == 1
    assert GPU not in str(r.container("gateway")["resources"])
    env = {e["name"]: e.get("value") for e in r.container("torchserve")["env"]}
    assert env["TS_NUMBER_OF_GPU"] == "1"


@pytest.mark.parametrize("overlay", GPU_OVERLAYS)
def test_gpu_overlay_lands_only_on_gpu_nodes(render_overlay, overlay: str) -> None:
    spec = render_overlay(overlay).pod_spec
    assert {"key": GPU, "operator": "Exists", "effect": "NoSchedule"} in spec["tolerations"]
    required = spec["affinity"]["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]
    terms = required["nodeSelectorTerms"]
    # Every term (they are ORed) must demand a GPU node.
    assert terms
    for term in terms:
        assert {"key": "nvidia.com/gpu.present", "operator": "In", "values": ["true"]} in (
            term["matchExpressions"]
        )


@pytest.mark.parametrize("overlay", CPU_OVERLAYS)
def test_cpu_overlay_has_no_gpu(render_overlay, overlay: str) -> None:
    r = render_overlay(overlay)
    assert GPU not in r.text.replace("nvidia.com/gpu.present", "")
    spec = r.pod_spec
    assert not spec.get("tolerations")
    assert "affinity" not in spec
    env = {e["name"]: e.get("value") for e in r.container("torchserve")["env"]}
    assert env["TS_NUMBER_OF_GPU"] == "0"


# --- security ----------------------------------------------------------------------------


def test_pod_runs_as_non_root_restricted(rendered: Rendered) -> None:
    spec = rendered.pod_spec
    sc = spec["securityContext"]
    assert sc["runAsNonRoot"] is True
    assert sc["runAsUser"] >= 10000 and sc["runAsGroup"] >= 10000
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"
    assert spec["automountServiceAccountToken"] is False
    assert spec["serviceAccountName"] == "saliency-serve"
    for key in ("hostNetwork", "hostPID", "hostIPC"):
        assert not spec.get(key)
    assert all("hostPath" not in v for v in spec["volumes"])
    ns = rendered.one("Namespace")
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert rendered.one("ServiceAccount")["automountServiceAccountToken"] is False


@pytest.mark.parametrize("name", CONTAINERS)
def test_container_security_context(rendered: Rendered, name: str) -> None:
    sc = rendered.container(name)["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsNonRoot"] is True
    assert sc.get("privileged", False) is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert not sc["capabilities"].get("add")
    assert sc["seccompProfile"]["type"] == "RuntimeDefault"


@pytest.mark.parametrize("name", CONTAINERS)
def test_writable_paths_are_empty_dirs(rendered: Rendered, name: str) -> None:
    volumes = {v["name"]: v for v in rendered.pod_spec["volumes"]}
    mounts = {m["mountPath"]: m for m in rendered.container(name)["volumeMounts"]}
    assert "emptyDir" in volumes[mounts["/tmp"]["name"]]
    if name == "torchserve":
        shm = volumes[mounts["/dev/shm"]["name"]]["emptyDir"]
        assert shm["medium"] == "Memory" and shm["sizeLimit"]
    for mount in mounts.values():
        volume = volumes[mount["name"]]
        assert "emptyDir" in volume or mount.get("readOnly") is True, mount


@pytest.mark.parametrize("name", CONTAINERS)
def test_requests_and_limits(rendered: Rendered, name: str) -> None:
    res = rendered.container(name)["resources"]
    for kind in ("requests", "limits"):
        assert {"cpu", "memory"} <= set(res[kind]), (name, kind)


# --- probes --------------------------------------------------------------------------------


def test_gateway_probes(rendered: Rendered) -> None:
    gw = rendered.container("gateway")
    # Readiness: the API service's health, which reflects the backend (a probe request per
    # pool), on the plaintext loopback health port: the API port is TLS, which the
    # kubelet's native gRPC probe cannot speak.
    command = gw["readinessProbe"]["exec"]["command"]
    assert command[1:3] == ["/opt/saliency/healthcheck.py", "gateway"]
    assert command[3] == f"127.0.0.1:{_arg(gw, '--health-port')}"
    assert command[4] == _proto_service()
    # Startup/liveness must not depend on TorchServe: the gRPC server accepting connections.
    for probe in ("startupProbe", "livenessProbe"):
        assert gw[probe]["tcpSocket"]["port"] == "grpc", probe


def test_gateway_serves_tls_and_tokens_from_secrets(rendered: Rendered) -> None:
    """Finding 14: the API with TLS and bearer tokens, both mounted from Secrets."""
    gw = rendered.container("gateway")
    volumes = {v["name"]: v for v in rendered.pod_spec["volumes"]}
    mounts = {m["name"]: m for m in gw["volumeMounts"]}

    def secret_file(flag: str) -> tuple[dict[str, Any], str]:
        path = _arg(gw, flag)
        (mount,) = [m for m in mounts.values() if path.startswith(m["mountPath"] + "/")]
        assert mount.get("readOnly") is True
        return volumes[mount["name"]], path[len(mount["mountPath"]) + 1 :]

    tls, cert = secret_file("--tls-cert")
    same, key = secret_file("--tls-key")
    assert tls is same and tls["secret"]["secretName"] == "saliency-serve-tls"
    assert (cert, key) == ("tls.crt", "tls.key")  # a kubernetes.io/tls Secret's keys
    tokens, name = secret_file("--auth-token-file")
    assert tokens["secret"]["secretName"] == "saliency-serve-tokens"
    assert {"key": "tokens", "path": name} in tokens["secret"]["items"]
    for volume in (tls, tokens):
        assert volume["secret"]["defaultMode"] & 0o007 == 0  # not world-readable
    assert "--reflection" not in gw["args"]
    api = rendered.one("Service", "saliency-serve")
    assert api["spec"]["ports"][0]["appProtocol"] == "https"  # TLS to the pod, not h2c


def test_gateway_holds_torchserve_inference_key(rendered: Rendered) -> None:
    """TorchServe's token authorization is on: the gateway reads the key file TorchServe
    writes in its run directory, through a read-only mount of that volume."""
    gw, ts = rendered.container("gateway"), rendered.container("torchserve")
    run_dir = _arg(ts, "--run-dir")
    ts_mount = next(m for m in ts["volumeMounts"] if run_dir.startswith(m["mountPath"]))
    gw_mount = next(m for m in gw["volumeMounts"] if m["name"] == ts_mount["name"])
    assert gw_mount.get("readOnly") is True
    inside = run_dir[len(ts_mount["mountPath"]) :].strip("/")
    assert _arg(gw, "--upstream-key-file") == f"{gw_mount['mountPath']}/{inside}/key_file.json"


def test_torchserve_probes_ping_inside_the_pod(rendered: Rendered) -> None:
    ts = rendered.container("torchserve")
    key_file = f"{_arg(ts, '--run-dir')}/key_file.json"
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        command = ts[probe]["exec"]["command"]
        assert command[1:3] == ["/opt/saliency/healthcheck.py", "torchserve"], probe
        assert command[4] == key_file, probe  # /ping needs the inference key
    # The checker's default URL is TorchServe's /ping on the inference address.
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "healthcheck", REPO_ROOT / "deploy" / "docker" / "healthcheck.py"
    )
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = _torchserve_config(rendered)
    assert config["inference_address"] + "/ping" == module.TORCHSERVE_DEFAULT
    assert ts["startupProbe"]["failureThreshold"] * ts["startupProbe"]["periodSeconds"] >= 300


# --- wiring ------------------------------------------------------------------------------


def test_torchserve_listens_only_inside_the_pod_except_metrics(rendered: Rendered) -> None:
    config = _torchserve_config(rendered)
    assert config["inference_address"] == "http://127.0.0.1:8080"
    assert config["management_address"] == "http://127.0.0.1:8081"
    assert config["grpc_inference_address"] == "127.0.0.1"
    assert config["grpc_management_address"] == "127.0.0.1"
    assert config["metrics_mode"] == "prometheus"
    ts = rendered.container("torchserve")
    assert config["metrics_address"].endswith(f":{_port(ts, 'ts-metrics')}")
    assert [p["name"] for p in ts["ports"]] == ["ts-metrics"]
    assert _arg(ts, "--config") == "/etc/torchserve/config.properties"
    assert _arg(ts, "--model-store") == config["model_store"]
    # Token authorization on (finding 14), with keys that live as long as the process.
    assert "disable_token_authorization" not in config
    assert float(config["token_expiration_min"]) >= 60 * 24 * 365
    assert config["install_py_dep_per_model"] == "false"


def test_torchserve_config_agrees_with_the_launcher(rendered: Rendered) -> None:
    """The ConfigMap replaces service/launcher.py's generated config: keep its contract."""
    from service.gateway.upstream import MAX_MESSAGE_BYTES
    from service.launcher import TorchServePorts

    config = _torchserve_config(rendered)
    ports = TorchServePorts()
    assert config["inference_address"].endswith(f":{ports.inference}")
    assert config["management_address"].endswith(f":{ports.management}")
    assert config["metrics_address"].endswith(f":{ports.metrics}")
    assert int(config["grpc_inference_port"]) == ports.grpc_inference
    assert int(config["grpc_management_port"]) == ports.grpc_management
    assert int(config["max_request_size"]) >= MAX_MESSAGE_BYTES
    assert int(config["max_response_size"]) >= MAX_MESSAGE_BYTES
    # The gateway refuses overload first: TorchServe's queue is above its bounds.
    from service.gateway.server import GatewayConfig
    from service.ts_config import JOB_QUEUE_SIZE

    bounds = GatewayConfig().admission().limits
    assert int(config["job_queue_size"]) == JOB_QUEUE_SIZE > max(bounds.values())
    assert "load_models" not in config  # the launcher registers each model and its twin


def test_gateway_talks_to_local_torchserve(rendered: Rendered) -> None:
    gw = rendered.container("gateway")
    config = _torchserve_config(rendered)
    assert _arg(gw, "--upstream") == f"127.0.0.1:{config['grpc_inference_port']}"
    assert int(_arg(gw, "--port")) == _port(gw, "grpc") == 50051
    assert int(_arg(gw, "--metrics-port")) == _port(gw, "metrics") == 9464
    assert int(_arg(gw, "--http-port")) == _port(gw, "https") == 8000
    # The gateway binds loopback unless told: in a pod it must be told, for both.
    assert _arg(gw, "--host") == _arg(gw, "--metrics-host") == "0.0.0.0"


def test_services(rendered: Rendered) -> None:
    pod_labels = rendered.deployment["spec"]["template"]["metadata"]["labels"]
    api = rendered.one("Service", "saliency-serve")
    grpc_port, https_port = api["spec"]["ports"]
    assert grpc_port["name"] == "grpc"
    assert grpc_port["port"] == 50051 and grpc_port["targetPort"] == "grpc"
    assert https_port["name"] == "https" and https_port["appProtocol"] == "https"
    assert https_port["port"] == 8000 and https_port["targetPort"] == "https"
    metrics = rendered.one("Service", "saliency-serve-metrics")
    assert {p["targetPort"] for p in metrics["spec"]["ports"]} == {"metrics", "ts-metrics"}
    for svc in (api, metrics):
        assert svc["spec"]["selector"].items() <= pod_labels.items()
    monitor = rendered.one("ServiceMonitor")
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert selector.items() <= metrics["metadata"]["labels"].items()
    assert {e["port"] for e in monitor["spec"]["endpoints"]} == {
        p["name"] for p in metrics["spec"]["ports"]
    }


def test_disruption_budget_and_network_policy(rendered: Rendered) -> None:
    pod_labels = rendered.deployment["spec"]["template"]["metadata"]["labels"]
    pdb = rendered.one("PodDisruptionBudget")
    assert pdb["spec"]["selector"]["matchLabels"].items() <= pod_labels.items()
    assert pdb["spec"]["maxUnavailable"] == 1
    policy = rendered.one("NetworkPolicy")
    assert policy["spec"]["podSelector"]["matchLabels"].items() <= pod_labels.items()
    assert set(policy["spec"]["policyTypes"]) == {"Ingress", "Egress"}
    assert policy["spec"]["egress"] == []
    open_ports = {p["port"] for rule in policy["spec"]["ingress"] for p in rule["ports"]}
    assert open_ports == {50051, 8000, 9464, 8082}
    # Metrics ports only from the monitoring namespace; the API from anywhere in the cluster.
    for rule in policy["spec"]["ingress"]:
        ports = {p["port"] for p in rule["ports"]}
        if ports & {9464, 8082}:
            assert rule["from"], "metrics ports must be restricted to Prometheus"
            assert not ports & {50051, 8000}


def test_deployment_leaves_replicas_to_the_autoscaler(rendered: Rendered) -> None:
    spec = rendered.deployment["spec"]
    assert "replicas" not in spec
    assert spec["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert spec["revisionHistoryLimit"] >= 3


# --- autoscaling -------------------------------------------------------------------------


def _gauge_families() -> set[str]:
    return {m.name for m in GatewayMetrics().registry.collect() if m.type == "gauge"}


def _uses_rate_or_gauge(query: str) -> bool:
    """Counters only under rate()/irate()/increase(); gauges as they are."""
    gauges = _gauge_families()
    for name in metric_refs.promql_metric_names(query):
        if name in gauges:
            continue
        if not re.search(rf"\b(rate|irate|increase)\s*\(\s*{re.escape(name)}\b", query):
            return False
    return True


@pytest.mark.parametrize("overlay", HPA_OVERLAYS)
def test_hpa_scales_on_a_per_pod_metric_the_adapter_serves(render_overlay, overlay: str) -> None:
    (hpa,) = render_overlay(overlay).of_kind("HorizontalPodAutoscaler")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "saliency-serve",
    }
    assert hpa["spec"]["minReplicas"] >= 2  # so that the PDB never blocks a drain
    served = metric_refs.adapter_served_metrics()
    (metric,) = hpa["spec"]["metrics"]
    assert metric["type"] == "Pods"
    assert metric["pods"]["metric"]["name"] in served
    assert metric["pods"]["target"]["type"] == "AverageValue"
    down = hpa["spec"]["behavior"]["scaleDown"]
    assert down["stabilizationWindowSeconds"] >= 120


def test_adapter_rules_use_rate_or_a_gauge() -> None:
    rules = metric_refs.adapter_rules()
    assert rules
    for rule in rules:
        assert "<<.LabelMatchers>>" in rule["metricsQuery"]
        assert _uses_rate_or_gauge(rule["metricsQuery"]), rule["metricsQuery"]
        overrides = rule["resources"]["overrides"]
        assert overrides["pod"] == {"resource": "pod"}
        assert overrides["namespace"] == {"resource": "namespace"}


@pytest.mark.parametrize("overlay", KEDA_OVERLAYS)
def test_keda_scaled_object(render_overlay, overlay: str) -> None:
    r = render_overlay(overlay)
    assert not r.of_kind("HorizontalPodAutoscaler"), "KEDA and the HPA would fight"
    so = r.one("ScaledObject")
    assert so["spec"]["scaleTargetRef"]["name"] == r.deployment["metadata"]["name"]
    assert so["spec"]["minReplicaCount"] >= 2
    behavior = so["spec"]["advanced"]["horizontalPodAutoscalerConfig"]["behavior"]
    assert behavior["scaleDown"]["stabilizationWindowSeconds"] >= 120
    for trigger in so["spec"]["triggers"]:
        assert trigger["type"] == "prometheus"
        assert trigger["metricType"] == "AverageValue"
        assert _uses_rate_or_gauge(trigger["metadata"]["query"])


def test_rate_check_rejects_raw_counters() -> None:
    assert not _uses_rate_or_gauge("sum(saliency_request_duration_seconds_count)")
    assert _uses_rate_or_gauge("sum(rate(saliency_request_duration_seconds_count[2m]))")
    assert _uses_rate_or_gauge("sum(saliency_requests_in_flight)")


def test_dashboard_config_map(rendered: Rendered) -> None:
    cm = rendered.one("ConfigMap", "saliency-serve-dashboard")
    assert cm["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert '"uid": "saliency-serve"' in cm["data"]["saliency-serve.json"]
