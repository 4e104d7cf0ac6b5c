"""The gateway's TLS settings (also used by its HTTP front, through the same files)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import grpc


@dataclass(frozen=True)
class TLSConfig:
    """The gateway's certificate, and the CA its clients' certificates must chain to.

    Attributes:
        cert, key: PEM files of the server certificate (chain) and its private key.
        client_ca: PEM file of the CA for mutual TLS; ``None``: clients need no certificate.
    """

    cert: Path
    key: Path
    client_ca: Path | None = None

    def credentials(self) -> grpc.ServerCredentials:
        ca = self.client_ca.read_bytes() if self.client_ca is not None else None
        return grpc.ssl_server_credentials(
            [(self.key.read_bytes(), self.cert.read_bytes())],
            root_certificates=ca,
            require_client_auth=ca is not None,
        )
