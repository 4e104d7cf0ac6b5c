"""Bearer tokens, open health, reflection only when asked, and request bytes the gateway
cannot parse -- over the fake TorchServe (TLS with real certificates:
``tests/integration/test_security.py``)."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from service._proto.saliency.v1 import saliency_pb2 as pb
from service._proto.saliency.v1 import saliency_pb2_grpc as pb_grpc
from service.gateway.auth import TokenFile
from service.gateway.server import Gateway
from tests.gateway.fake_torchserve import Script
from tests.gateway.support import calls

GOOD, OTHER = "s3cret-token-one", "second-token-two"
REFLECTION = "/grpc.reflection.v1alpha.ServerReflection/ServerReflectionInfo"


@pytest.fixture
def token_file(tmp_path: Path) -> Path:
    path = tmp_path / "tokens"
    path.write_text(f"# clients of team A\n{GOOD}\n\n{OTHER}\n")
    return path


@pytest.fixture
def options(token_file: Path) -> dict[str, Any]:
    return {"health_interval_s": 60.0, "auth_token_file": token_file}


def model_info(stub: pb_grpc.ExplainServiceStub, header: str | None) -> pb.ModelInfo:
    metadata = (("authorization", header),) if header is not None else ()
    return stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10, metadata=metadata)


@pytest.mark.parametrize(
    ("header", "message"),
    [
        (None, "missing credentials"),
        ("Bearer wrong-token", "invalid credentials"),
        (f"Basic {GOOD}", "invalid credentials"),
        (f"Bearer {GOOD}x", "invalid credentials"),
        (f"Bearer {GOOD[:-1]}", "invalid credentials"),
        ("Bearer ", "invalid credentials"),
    ],
)
def test_a_call_without_a_good_token_is_unauthenticated_before_any_work(
    stub: pb_grpc.ExplainServiceStub, script: Script, header: str | None, message: str
) -> None:
    script.unary["model_info"] = lambda _: pb.ModelInfo().SerializeToString()
    with pytest.raises(grpc.RpcError) as err:
        model_info(stub, header)
    assert err.value.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]
    assert message in err.value.details()  # type: ignore[attr-defined]
    assert script.received == []


def test_each_listed_token_is_served_and_health_stays_open(
    channel: grpc.Channel, stub: pb_grpc.ExplainServiceStub, script: Script
) -> None:
    script.unary["model_info"] = lambda _: pb.ModelInfo(labels=["a"]).SerializeToString()
    assert model_info(stub, f"Bearer {GOOD}").labels == ["a"]
    assert model_info(stub, f"bearer {OTHER}").labels == ["a"]
    health = health_pb2_grpc.HealthStub(channel)
    assert health.Check(health_pb2.HealthCheckRequest(), timeout=10) is not None


def test_a_rotated_token_file_is_read_again(token_file: Path) -> None:
    tokens = TokenFile(token_file)
    assert tokens.accepts(f"Bearer {GOOD}")
    token_file.write_text("rotated-token\n")
    stat = token_file.stat()  # a different mtime even on a coarse clock
    os.utime(token_file, ns=(stat.st_atime_ns, stat.st_mtime_ns + 5_000_000_000))
    tokens._checked = time.monotonic() - 10  # the once-a-second check is due
    assert tokens.accepts("Bearer rotated-token")
    assert not tokens.accepts(f"Bearer {GOOD}")


def test_an_empty_token_file_is_refused_at_start(tmp_path: Path) -> None:
    empty = tmp_path / "none"
    empty.write_text("# nothing yet\n\n")
    with pytest.raises(ValueError, match="holds no token"):
        TokenFile(empty)


def test_reflection_is_off_unless_asked(channel: grpc.Channel) -> None:
    reflect = channel.stream_stream(REFLECTION)
    with pytest.raises(grpc.RpcError) as err:
        list(reflect(iter([b""]), timeout=10))
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED  # type: ignore[attr-defined]


@pytest.mark.parametrize(
    ("rpc", "expected"),
    [
        ("Explain", "saliency.v1.ExplainRequest"),
        ("ExplainStream", "saliency.v1.ExplainRequest"),
        ("Predict", "saliency.v1.PredictRequest"),
        ("GetModelInfo", "saliency.v1.GetModelInfoRequest"),
        ("VisualizeClass", "saliency.v1.VisualizeClassRequest"),
        ("VisualizeClassStream", "saliency.v1.VisualizeClassRequest"),
        ("GetConcepts", "saliency.v1.GetConceptsRequest"),
    ],
)
def test_bytes_that_are_not_the_request_are_invalid_argument(
    gateway: Gateway, channel: grpc.Channel, script: Script, rpc: str, expected: str
) -> None:
    path = f"/saliency.v1.ExplainService/{rpc}"
    streams = rpc.endswith("Stream")
    call = (channel.unary_stream if streams else channel.unary_unary)(path)
    metadata = (("authorization", f"Bearer {GOOD}"),)
    garbage = (
        b"\xff" * 7,  # no valid tag
        b"\x0a\x80\x80\x04" + b"x" * 10,  # a field 65536 bytes long in 14 bytes
        b"\x0a\x02\xff\xfe",  # field 1 (a string in all four) that is not UTF-8
    )
    for data in garbage:
        with pytest.raises(grpc.RpcError) as err:
            reply = call(data, timeout=10, metadata=metadata)
            if streams:
                list(reply)
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT  # type: ignore[attr-defined]
        details = err.value.details()  # type: ignore[attr-defined]
        assert details.startswith(f"the request is not a serialized {expected}")
        assert "DecodeError" not in details and "google.protobuf" not in details
        assert len(details) < 200
    assert script.received == []
    assert calls(gateway, rpc, "INVALID_ARGUMENT", model="unknown", expect=3) == 3
