"""HTTP on a gateway with bearer tokens and TLS: the gateway's own token file and
certificate, so an HTTP call is let in exactly when a gRPC call would be (over the fake
TorchServe; real certificates made here)."""

from __future__ import annotations

import ssl
from pathlib import Path
from typing import Any

import httpx
import pytest

from service._proto.saliency.v1 import saliency_pb2 as pb
from service.gateway.http.app import HttpSettings
from service.gateway.server import Gateway, TLSConfig
from service.protocol.limits import GATEWAY_RECEIVE_BYTES
from tests.gateway.fake_torchserve import Script
from tests.gateway.support import MODEL, calls
from tests.gateway.test_auth import GOOD, OTHER, token_file
from tests.http.conftest import body, http_front
from tests.integration.certificates import Pair, make_pki

__all__ = ["token_file"]  # the fixture, from the gRPC token tests
REFUSED_HEADERS = [None, "Bearer wrong-token", f"Basic {GOOD}", f"Bearer {GOOD}x"]


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, Pair]:
    return make_pki(tmp_path)


@pytest.fixture
def options(request: pytest.FixtureRequest, token_file: Path) -> dict[str, Any]:
    """Tokens; with ``"tls"`` or ``"mtls"`` as the indirect parameter, TLS or mutual TLS."""
    extra: dict[str, Any] = {}
    tls = getattr(request, "param", None)
    if tls is not None:
        pki = request.getfixturevalue("pki")
        server = pki["server"]
        extra["tls"] = TLSConfig(server.cert, server.key, pki["ca"].cert if tls == "mtls" else None)
    return {"health_interval_s": 60.0, "auth_token_file": token_file, **extra}


def client(gateway: Gateway, header: str | None, **tls: Any) -> httpx.Client:
    assert gateway.http is not None
    headers = {"authorization": header} if header is not None else {}
    return httpx.Client(base_url=gateway.http.url, headers=headers, timeout=30, **tls)


def predict_answer(_: bytes) -> bytes:
    return pb.PredictResponse(
        predictions=[pb.Prediction(index=2, label="c", probability=0.75)]
    ).SerializeToString()


@pytest.mark.parametrize("header", REFUSED_HEADERS)
def test_api_calls_without_a_good_token_are_401_before_any_work(
    gateway: Gateway, script: Script, header: str | None
) -> None:
    with client(gateway, header) as http:
        for reply in (
            http.get("/v1/models"),
            http.get(f"/v1/models/{MODEL}"),
            http.post(f"/v1/models/{MODEL}:predict", json=body()),
            http.post(f"/v1/models/{MODEL}:explain?stream=true", json=body()),
            http.post("/v1/models/unknown:predict", json=body()),  # no model names leak
        ):
            assert reply.status_code == 401, reply.text
            error = reply.json()["error"]
            assert error["code"] == "UNAUTHENTICATED"
            assert error["message"].startswith("missing" if header is None else "invalid")
            assert reply.headers["www-authenticate"] == "Bearer"
        page = http.get("/")  # the page holds no secret; it asks for the token
        assert page.status_code == 200 and "<html" in page.text.lower()
    assert script.received == []


def test_each_token_of_the_gateways_file_is_let_in_and_counted_as_grpc(
    gateway: Gateway, script: Script
) -> None:
    script.unary["predict"] = predict_answer
    for token in (GOOD, OTHER):
        with client(gateway, f"Bearer {token}") as http:
            assert http.get("/v1/models").json() == {"models": [MODEL]}
            reply = http.post(f"/v1/models/{MODEL}:predict", json=body())
            assert reply.status_code == 200, reply.text
            assert reply.json()["predictions"][0]["classes"][0] == {
                "index": 2,
                "label": "c",
                "probability": 0.75,
            }
    assert calls(gateway, "Predict", "OK", expect=2) == 2


def test_the_grpc_token_check_holds_behind_a_front_that_checks_nothing(
    gateway: Gateway, script: Script
) -> None:
    """The header goes on to the gRPC call: the gateway's interceptor refuses it there too,
    so no HTTP front (or a bug in its own check) lets a call past the tokens."""
    script.unary["predict"] = predict_answer
    settings = HttpSettings(models=(MODEL,), max_message_bytes=GATEWAY_RECEIVE_BYTES)
    with http_front(settings, f"127.0.0.1:{gateway.port}") as front:
        base = f"http://127.0.0.1:{front.port}"
        for header in REFUSED_HEADERS:
            headers = {"authorization": header} if header is not None else {}
            with httpx.Client(base_url=base, headers=headers, timeout=30) as http:
                reply = http.post(f"/v1/models/{MODEL}:predict", json=body())
            assert reply.status_code == 401, reply.text
            assert reply.json()["error"]["code"] == "UNAUTHENTICATED"
        with httpx.Client(base_url=base, headers={"authorization": f"Bearer {GOOD}"}) as http:
            assert http.post(f"/v1/models/{MODEL}:predict", json=body()).status_code == 200
    assert len(script.received) == 1


def trusting(ca: Path, pair: Pair | None = None) -> ssl.SSLContext:
    """A client's TLS: servers certified by ``ca``; ``pair``: its own certificate."""
    made = ssl.create_default_context(cafile=ca)
    if pair is not None:
        made.load_cert_chain(pair.cert, pair.key)
    return made


def predict_status(gateway: Gateway, header: str | None, tls: ssl.SSLContext) -> int:
    with client(gateway, header, verify=tls) as http:
        return http.post(f"/v1/models/{MODEL}:predict", json=body()).status_code


@pytest.mark.parametrize("options", ["tls"], indirect=True)
def test_https_with_the_gateways_certificate_and_its_tokens(
    gateway: Gateway, script: Script, pki: dict[str, Pair]
) -> None:
    script.unary["predict"] = predict_answer
    assert gateway.http is not None and gateway.http.url.startswith("https://")
    trusted = trusting(pki["ca"].cert)
    assert predict_status(gateway, f"Bearer {GOOD}", trusted) == 200
    assert predict_status(gateway, None, trusted) == 401
    plain = gateway.http.url.replace("https://", "http://")
    with pytest.raises(httpx.TransportError):  # plain HTTP to the TLS port: no answer
        httpx.post(f"{plain}v1/models/{MODEL}:predict", json=body(), timeout=10)
    with pytest.raises(httpx.ConnectError):  # a server this client does not trust
        predict_status(gateway, f"Bearer {GOOD}", trusting(pki["stranger"].cert))
    assert len(script.received) == 1


@pytest.mark.parametrize("options", ["mtls"], indirect=True)
def test_mutual_tls_needs_a_client_certificate_from_the_ca(
    gateway: Gateway, script: Script, pki: dict[str, Pair]
) -> None:
    script.unary["predict"] = predict_answer
    ca = pki["ca"].cert
    assert predict_status(gateway, f"Bearer {GOOD}", trusting(ca, pki["client"])) == 200
    for pair in (None, pki["stranger"]):  # no certificate, or one from another CA
        with pytest.raises(httpx.TransportError):
            predict_status(gateway, f"Bearer {GOOD}", trusting(ca, pair))
    assert len(script.received) == 1
