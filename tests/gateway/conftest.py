"""The real gateway over the fake TorchServe; a module overrides ``options`` to configure
it (TLS, tokens, in-flight bounds, health timing)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest

from service._proto.saliency.v1 import saliency_pb2_grpc as pb_grpc
from service.gateway.server import Gateway
from service.stack import running_gateway
from tests.gateway.fake_torchserve import Script, fake_torchserve
from tests.gateway.support import MODEL


@pytest.fixture
def script() -> Script:
    return Script()


@pytest.fixture
def options() -> dict[str, Any]:
    """More GatewayConfig fields (none: the defaults, with health checked once)."""
    return {"health_interval_s": 60.0}


@pytest.fixture
def gateway(
    script: Script, options: dict[str, Any], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Gateway]:
    monkeypatch.setenv("SALIENCY_CANCEL_DIR", str(tmp_path / "cancel"))
    with (
        fake_torchserve(script) as upstream,
        running_gateway(upstream, [MODEL], **options) as started,
    ):
        yield started.gateway


@pytest.fixture
def channel(gateway: Gateway) -> Iterator[grpc.Channel]:
    with grpc.insecure_channel(f"127.0.0.1:{gateway.port}") as opened:
        yield opened


@pytest.fixture
def stub(channel: grpc.Channel) -> pb_grpc.ExplainServiceStub:
    return pb_grpc.ExplainServiceStub(channel)
