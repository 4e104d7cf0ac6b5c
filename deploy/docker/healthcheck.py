"""Health check for the saliency-serve image (Docker HEALTHCHECK and Kubernetes exec probes).

    python /opt/saliency/healthcheck.py gateway [HOST:PORT] [SERVICE]
        grpc.health.v1 Check on the gateway (default 127.0.0.1:50051, service "" = the
        server as a whole); healthy when the status is SERVING.
    python /opt/saliency/healthcheck.py torchserve [URL]
        GET TorchServe's /ping (default http://127.0.0.1:8080/ping); healthy on HTTP 200.

Exit status 0 = healthy, 1 = unhealthy, 2 = usage error. Uses the standard library only
for the TorchServe check (it runs every few seconds as a Kubernetes probe: no grpc import,
no curl in the image), grpcio from the image's venv for the gateway check.
"""

from __future__ import annotations

import sys
import urllib.error
import urllib.request

TIMEOUT_S = 3.0
GATEWAY_DEFAULT = "127.0.0.1:50051"
TORCHSERVE_DEFAULT = "http://127.0.0.1:8080/ping"


def check_torchserve(url: str = TORCHSERVE_DEFAULT, timeout: float = TIMEOUT_S) -> tuple[bool, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            body = resp.read(512).decode("utf-8", "replace").strip()
            return resp.status == 200, f"HTTP {resp.status} {body}"
    except urllib.error.HTTPError as e:
        return False, f"HTTP {e.code}"
    except (urllib.error.URLError, OSError) as e:
        return False, f"unreachable: {e}"


def check_gateway(
    target: str = GATEWAY_DEFAULT, service: str = "", timeout: float = TIMEOUT_S
) -> tuple[bool, str]:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    try:
        with grpc.insecure_channel(target) as channel:
            resp = health_pb2_grpc.HealthStub(channel).Check(
                health_pb2.HealthCheckRequest(service=service), timeout=timeout
            )
    except grpc.RpcError as e:
        return False, f"{e.code().name}: {e.details()}"
    status = health_pb2.HealthCheckResponse.ServingStatus.Name(resp.status)
    return resp.status == health_pb2.HealthCheckResponse.SERVING, status


def main(argv: list[str]) -> int:
    if not argv or argv[0] not in ("gateway", "torchserve"):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] == "torchserve":
        ok, detail = check_torchserve(argv[1] if len(argv) > 1 else TORCHSERVE_DEFAULT)
    else:
        ok, detail = check_gateway(
            argv[1] if len(argv) > 1 else GATEWAY_DEFAULT, argv[2] if len(argv) > 2 else ""
        )
    print(f"{argv[0]}: {'healthy' if ok else 'unhealthy'} ({detail})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
