"""The gateway's flags, shared by ``serve`` and ``gateway``, and the config they make.

Defaults are the safe ones: gRPC and metrics on loopback, reflection off. Listening on
other interfaces is one flag away (``--host 0.0.0.0``), and doing so without TLS or
tokens prints a warning.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any

LOOPBACKS = ("127.0.0.1", "::1", "localhost")


def add_gateway_flags(parser: argparse.ArgumentParser) -> None:
    listen = parser.add_argument_group("gateway listeners")
    listen.add_argument("--host", default="127.0.0.1", help="gRPC interface (0.0.0.0: all)")
    listen.add_argument("--port", type=int, default=50051)
    listen.add_argument("--metrics-host", default="127.0.0.1", help="/metrics interface")
    listen.add_argument("--metrics-port", type=int, default=9464)
    listen.add_argument(
        "--health-port",
        type=int,
        default=None,
        help="also serve grpc.health.v1 in plaintext on 127.0.0.1:PORT (probes of a TLS gateway)",
    )
    listen.add_argument(
        "--http-port",
        type=int,
        default=8000,
        help="HTTP/JSON API and web page on --host, with the same TLS and tokens (0: a free port)",
    )
    listen.add_argument("--no-http", action="store_true", help="serve gRPC only")
    security = parser.add_argument_group("gateway security")
    security.add_argument("--tls-cert", type=Path, help="server certificate chain (PEM)")
    security.add_argument("--tls-key", type=Path, help="its private key (PEM)")
    security.add_argument(
        "--tls-client-ca", type=Path, help="require client certificates from this CA (mTLS)"
    )
    security.add_argument(
        "--auth-token-file",
        type=Path,
        help="accepted bearer tokens, one a line; calls but health need one",
    )
    security.add_argument("--reflection", action="store_true", help="serve gRPC reflection")
    load = parser.add_argument_group("gateway load")
    load.add_argument(
        "--max-in-flight-explain",
        type=int,
        help="explanations in flight per model (default: workers x batch size x 4)",
    )
    load.add_argument(
        "--max-in-flight-predict", type=int, help="predictions in flight per model (same)"
    )
    load.add_argument(
        "--no-heap-trim",
        action="store_true",
        help="keep the heap's high-water mark after bursts (no malloc_trim when idle)",
    )
    load.add_argument(
        "--drain-seconds",
        type=float,
        default=30.0,
        help="on SIGTERM, how long calls in flight may take to finish",
    )


def gateway_config(args: argparse.Namespace, **fields: Any) -> Any:
    """The :class:`~service.gateway.server.GatewayConfig` the flags ask for (``fields``
    adds what the command knows: upstream, models, pool sizes...)."""
    from service.gateway.server import GatewayConfig, TLSConfig

    if (args.tls_cert is None) != (args.tls_key is None):
        raise SystemExit("--tls-cert and --tls-key go together")
    if args.tls_client_ca is not None and args.tls_cert is None:
        raise SystemExit("--tls-client-ca needs --tls-cert and --tls-key")
    tls = TLSConfig(args.tls_cert, args.tls_key, args.tls_client_ca) if args.tls_cert else None
    limits = {
        kind: value
        for kind, value in (
            ("explain", args.max_in_flight_explain),
            ("predict", args.max_in_flight_predict),
        )
        if value is not None
    }
    missing = [name for name, on in (("TLS", tls), ("token auth", args.auth_token_file)) if not on]
    if args.host not in LOOPBACKS and missing:
        print(
            f"warning: the gateway listens on {args.host} without {' or '.join(missing)}: "
            "anyone who can reach it can call it (see --tls-cert, --auth-token-file)",
            file=sys.stderr,
        )
    return GatewayConfig(
        host=args.host,
        port=args.port,
        metrics_host=args.metrics_host,
        metrics_port=args.metrics_port,
        health_port=args.health_port,
        http_port=None if args.no_http else args.http_port,
        tls=tls,
        auth_token_file=args.auth_token_file,
        reflection=args.reflection,
        max_in_flight=limits,
        trim_heap=not args.no_heap_trim,
        **fields,
    )
