"""Health check for the saliency-serve image (Docker HEALTHCHECK and Kubernetes exec probes).

    python /opt/saliency/healthcheck.py gateway [HOST:PORT] [SERVICE]
        grpc.health.v1 Check on the gateway (default 127.0.0.1:50052, the gateway's
        plaintext loopback health port, which a TLS or mTLS gateway also serves; service
        "" = the server as a whole); healthy when the status is SERVING.
    python /opt/saliency/healthcheck.py torchserve [URL] [KEY_FILE]
        GET TorchServe's /ping (default http://127.0.0.1:8080/ping); healthy on HTTP 200.
        With token authorization on, /ping needs TorchServe's inference key: KEY_FILE is
        the key_file.json TorchServe writes in its working directory.

Exit status 0 = healthy, 1 = unhealthy, 2 = usage error. Uses the standard library only
for the TorchServe check (it runs every few seconds as a Kubernetes probe: no grpc import,
no curl in the image), grpcio from the image's venv for the gateway check.
"""

from __future__ import annotations

import json
import sys
import urllib.error
import urllib.request

TIMEOUT_S = 3.0
GATEWAY_DEFAULT = "127.0.0.1:50052"
TORCHSERVE_DEFAULT = "http://127.0.0.1:8080/ping"


def inference_key(key_file: str) -> str:
    """TorchServe's inference key from its key_file.json ("" when not written yet)."""
    try:
        with open(key_file, encoding="utf-8") as f:
            return str(json.load(f)["inference"]["key"])
    except (OSError, ValueError, KeyError, TypeError):
        return ""


def check_torchserve(
    url: str = TORCHSERVE_DEFAULT, timeout: float = TIMEOUT_S, key_file: str | None = None
) -> tuple[bool, str]:
    request = urllib.request.Request(url)
    if key_file is not None:
        key = inference_key(key_file)
        if not key:
            return False, f"no inference key in {key_file} yet"
        request.add_header("Authorization", f"Bearer {key}")
    try:
        with urllib.request.urlopen(request, timeout=timeout) as resp:
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
        ok, detail = check_torchserve(
            argv[1] if len(argv) > 1 else TORCHSERVE_DEFAULT,
            key_file=argv[2] if len(argv) > 2 else None,
        )
    else:
        ok, detail = check_gateway(
            argv[1] if len(argv) > 1 else GATEWAY_DEFAULT, argv[2] if len(argv) > 2 else ""
        )
    print(f"{argv[0]}: {'healthy' if ok else 'unhealthy'} ({detail})")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
