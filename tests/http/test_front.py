"""The HTTP front's own guards, each with settings of its own: calls in flight and a body
that trickles in (tokens: ``test_auth.py``, on the gateway's own front)."""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Iterator
from http.client import HTTPConnection

import httpx
import pytest

from service._proto.saliency.v1 import saliency_pb2 as pb
from service.gateway.http.app import HttpSettings
from service.gateway.http.front import HttpFront
from service.gateway.server import Gateway
from service.protocol.limits import GATEWAY_RECEIVE_BYTES
from tests.gateway.fake_torchserve import Script
from tests.gateway.support import MODEL
from tests.http.conftest import body, http_front


@pytest.fixture
def front(gateway: Gateway) -> Iterator[HttpFront]:
    settings = HttpSettings(
        models=(MODEL,),
        max_message_bytes=GATEWAY_RECEIVE_BYTES,
        max_in_flight=1,
        body_timeout_s=0.5,
    )
    with http_front(settings, f"127.0.0.1:{gateway.port}") as started:
        yield started


def client(front: HttpFront) -> httpx.Client:
    return httpx.Client(base_url=f"http://127.0.0.1:{front.port}", timeout=30)


def test_calls_over_the_in_flight_bound_are_429_and_the_others_finish(
    front: HttpFront, script: Script
) -> None:
    release = threading.Event()

    def slow(_: object) -> bytes:
        release.wait(10)
        return pb.ExplainResponse().SerializeToString()

    script.unary["request"] = slow
    first: list[httpx.Response] = []
    with client(front) as http:
        worker = threading.Thread(
            target=lambda: first.append(http.post(f"/v1/models/{MODEL}:explain", json=body()))
        )
        worker.start()
        deadline = time.monotonic() + 10
        while not script.received and time.monotonic() < deadline:
            time.sleep(0.01)
        second = client(front).post(f"/v1/models/{MODEL}:explain", json=body())
        release.set()
        worker.join(10)
    assert second.status_code == 429
    assert second.json()["error"]["code"] == "RESOURCE_EXHAUSTED"
    assert first[0].status_code == 200
    assert len(script.received) == 1  # the refused call cost the worker nothing


def test_a_body_that_does_not_arrive_in_time_is_408(front: HttpFront, script: Script) -> None:
    connection = HTTPConnection("127.0.0.1", front.port, timeout=10)
    connection.putrequest("POST", f"/v1/models/{MODEL}:explain")
    connection.putheader("content-length", "1000")
    connection.endheaders()
    connection.send(b'{"instances": ')  # and then nothing more
    answer = connection.getresponse()
    assert answer.status == 408
    assert json.loads(answer.read())["error"]["code"] == "DEADLINE_EXCEEDED"
    connection.close()
    assert script.received == []


def test_responses_go_out_at_once_on_kept_alive_connections(gateway: Gateway) -> None:
    # With Nagle's algorithm on, each response after the first on a connection waited for
    # the client's delayed ACK (~40 ms): every accepted socket must have it off.
    import socket

    assert gateway.http is not None and gateway.http._server is not None
    connection = HTTPConnection("127.0.0.1", gateway.http.port, timeout=10)
    connection.request("GET", "/v1/models")
    assert connection.getresponse().read()
    sockets = [
        c.transport.get_extra_info("socket")  # type: ignore[attr-defined]
        for c in gateway.http._server.server_state.connections
    ]
    assert sockets and all(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) for s in sockets)
    connection.close()
