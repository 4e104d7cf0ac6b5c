"""Finding 14: TLS, mutual TLS and tokens on the gateway (real certificates made here, the
real TorchServe behind); TorchServe's own token authorization; private worker sockets."""

from __future__ import annotations

import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import grpc
import psutil
import pytest

from service._proto.torchserve import inference_pb2 as ts_pb
from service._proto.torchserve import inference_pb2_grpc as ts_grpc
from service.client import SaliencyClient, tls_credentials
from service.gateway.server import GatewayConfig, TLSConfig
from service.launcher import TorchServe
from service.stack import RunningGateway, gateway_options, running_gateway
from tests.integration.certificates import Pair, make_pki

pytestmark = pytest.mark.integration
TOKEN = "integration-token-4f1c"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Pair]:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("auth") / "tokens"
    path.write_text(f"{TOKEN}\n")
    return path


def secure_gateway(
    torchserve: TorchServe, tls: TLSConfig, tokens: Path
) -> Iterator[RunningGateway]:
    with running_gateway(
        torchserve.grpc_address,
        list(torchserve.models),
        tls=tls,
        auth_token_file=tokens,
        **gateway_options(torchserve),
    ) as started:
        yield started


@pytest.fixture(scope="module")
def tls_gateway(
    torchserve: TorchServe, pki: dict[str, Pair], tokens: Path
) -> Iterator[RunningGateway]:
    yield from secure_gateway(torchserve, TLSConfig(pki["server"].cert, pki["server"].key), tokens)


@pytest.fixture(scope="module")
def mtls_gateway(
    torchserve: TorchServe, pki: dict[str, Pair], tokens: Path
) -> Iterator[RunningGateway]:
    server = pki["server"]
    yield from secure_gateway(
        torchserve, TLSConfig(server.cert, server.key, pki["ca"].cert), tokens
    )


def predicted(address: str, sample: bytes, **client: object) -> int:
    with SaliencyClient(address, **client) as c:  # type: ignore[arg-type]
        return c.predict(sample, timeout=30).predictions[0].index


def refused(address: str, sample: bytes, **client: object) -> grpc.RpcError:
    with pytest.raises(grpc.RpcError) as err:
        predicted(address, sample, **client)
    return err.value


def test_tls_gateway_serves_a_good_token_and_nothing_else(
    tls_gateway: RunningGateway, pki: dict[str, Pair], samples: list[tuple[bytes, int, object]]
) -> None:
    sample, label, _ = samples[0]
    address = tls_gateway.address
    tls = tls_credentials(pki["ca"].cert)
    assert predicted(address, sample, credentials=tls, token=TOKEN) == label
    # Plaintext to a TLS port: the handshake never happens.
    assert refused(address, sample, token=TOKEN).code() == grpc.StatusCode.UNAVAILABLE  # type: ignore[attr-defined]
    # TLS, but a server this client does not trust.
    stranger = tls_credentials(pki["stranger"].cert)
    assert refused(address, sample, credentials=stranger, token=TOKEN).code() == (  # type: ignore[attr-defined]
        grpc.StatusCode.UNAVAILABLE
    )
    for token in (None, "not-the-token"):
        error = refused(address, sample, credentials=tls, token=token)
        assert error.code() == grpc.StatusCode.UNAUTHENTICATED  # type: ignore[attr-defined]


def test_mutual_tls_needs_a_client_certificate_from_the_ca(
    mtls_gateway: RunningGateway, pki: dict[str, Pair], samples: list[tuple[bytes, int, object]]
) -> None:
    sample, label, _ = samples[1]
    address = mtls_gateway.address
    client, stranger, ca = pki["client"], pki["stranger"], pki["ca"].cert
    good = tls_credentials(ca, client.cert, client.key)
    assert predicted(address, sample, credentials=good, token=TOKEN) == label
    no_cert = tls_credentials(ca)
    assert refused(address, sample, credentials=no_cert, token=TOKEN).code() == (  # type: ignore[attr-defined]
        grpc.StatusCode.UNAVAILABLE
    )
    rogue = tls_credentials(ca, stranger.cert, stranger.key)
    assert refused(address, sample, credentials=rogue, token=TOKEN).code() == (  # type: ignore[attr-defined]
        grpc.StatusCode.UNAVAILABLE
    )


def test_defaults_keep_metrics_on_loopback_and_reflection_off() -> None:
    from service.cli import build_parser

    config = GatewayConfig()
    assert config.metrics_host == "127.0.0.1" and not config.reflection
    for command in ("serve", "gateway --model shapes"):
        args = build_parser().parse_args(command.split())
        assert args.host == args.metrics_host == "127.0.0.1"
        assert not args.reflection


def test_torchserve_refuses_calls_without_its_keys(torchserve: TorchServe) -> None:
    with grpc.insecure_channel(torchserve.grpc_address) as channel:
        stub = ts_grpc.InferenceAPIsServiceStub(channel)
        request = ts_pb.PredictionsRequest(model_name="shapes", input={"model_info": b""})
        with pytest.raises(grpc.RpcError) as err:
            stub.Predictions(request, timeout=10)
        assert err.value.code() == grpc.StatusCode.PERMISSION_DENIED  # type: ignore[attr-defined]
        key = torchserve.key("inference")
        metadata = (("authorization", f"Bearer {key}"),)
        assert stub.Predictions(request, timeout=30, metadata=metadata).prediction
    # Scaling workers (what any local process could do before) needs the management key.
    management = f"http://127.0.0.1:{torchserve.ports.management}"
    scale_down = urllib.request.Request(f"{management}/models/shapes?min_worker=0", method="PUT")
    with pytest.raises(urllib.error.HTTPError) as http:
        urllib.request.urlopen(scale_down, timeout=10)
    assert http.value.code in (400, 401, 403)
    assert torchserve.key_file.stat().st_mode & 0o077 == 0  # the keys: owner only
    assert torchserve.management("GET", "/models/shapes")[0]["minWorkers"] >= 1


def worker_sockets(torchserve: TorchServe) -> list[str]:
    """The ``--sock-name`` of each worker of ``torchserve``."""
    assert torchserve.process is not None
    names = []
    for child in psutil.Process(torchserve.process.pid).children(recursive=True):
        args = child.cmdline()
        if "--sock-name" in args:
            names.append(args[args.index("--sock-name") + 1])
    return names


def test_two_instances_keep_their_worker_sockets_apart(
    torchserve: TorchServe,
    small_torchserve: TorchServe,
    client: SaliencyClient,
    samples: list[tuple[bytes, int, object]],
) -> None:
    ours, theirs = worker_sockets(torchserve), worker_sockets(small_torchserve)
    assert len(ours) == 4 and len(theirs) == 1  # explain + forward-only pools; one worker
    for server, sockets in ((torchserve, ours), (small_torchserve, theirs)):
        private = server.run_dir / "tmp"
        assert all(Path(s).parent == private for s in sockets), sockets
        assert all(Path(s).exists() for s in sockets)
    # Both port counters start at 9000: shared /tmp names would collide. Both still serve.
    assert {Path(s).name for s in ours} & {Path(s).name for s in theirs}
    sample, label, _ = samples[2]
    assert client.predict(sample).predictions[0].index == label
    with running_gateway(
        small_torchserve.grpc_address, ["shapes"], **gateway_options(small_torchserve)
    ) as small:
        assert predicted(small.address, sample) == label
