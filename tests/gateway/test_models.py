"""Several models behind one gateway, over the fake TorchServe: ListModels from the health
probes' ModelInfo replies, the default model for an empty name, NOT_FOUND for any other."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from typing import Any

import grpc
import pytest

from service._proto.saliency.v1 import saliency_pb2 as pb
from service._proto.saliency.v1 import saliency_pb2_grpc as pb_grpc
from service._proto.torchserve import inference_pb2 as ts_pb
from service.gateway.admission import PoolSize
from service.gateway.catalog import ModelCatalog
from service.gateway.server import DEFAULT_POOL, Gateway, GatewayConfig
from service.gateway.upstream import PREDICT_SUFFIX
from service.protocol.catalog import LISTED_NAMES, describe
from service.protocol.names import METHODS
from tests.gateway.fake_torchserve import Script
from tests.gateway.support import calls

# What each model's workers answer to model_info: different sizes, labels, layers and
# available methods, so that a listing mixing them up fails.
INFOS = {
    "alpha": pb.ModelInfo(
        model=pb.ModelRef(name="alpha", version="a1"),
        labels=["x", "y"],
        channels=3,
        height=32,
        width=32,
        methods=[
            pb.MethodInfo(method=METHODS.number("vanilla_gradient"), available=True),  # type: ignore[arg-type]
            pb.MethodInfo(method=METHODS.number("grad_cam"), available=False),  # type: ignore[arg-type]
        ],
    ),
    "beta": pb.ModelInfo(
        model=pb.ModelRef(name="beta", version="b7"),
        labels=["p", "q", "r", "s", "t"],
        channels=1,
        height=64,
        width=48,
        target_layer="model.layer4",
        methods=[
            pb.MethodInfo(method=METHODS.number("grad_cam"), available=True),  # type: ignore[arg-type]
            pb.MethodInfo(method=METHODS.number("rise"), available=True),  # type: ignore[arg-type]
        ],
    ),
}


def served(request: ts_pb.PredictionsRequest) -> str:
    return request.model_name.removesuffix(PREDICT_SUFFIX)


@pytest.fixture
def options() -> dict[str, Any]:
    return {"health_interval_s": 0.1, "default_model": "beta"}


@pytest.fixture
def script() -> Script:
    answers: dict[str, Callable[[ts_pb.PredictionsRequest], Any]] = {
        "model_info": lambda r: INFOS[served(r)].SerializeToString(),
        "predict": lambda r: pb.PredictResponse(
            model=pb.ModelRef(name=served(r))
        ).SerializeToString(),
    }
    return Script(unary=answers)


@pytest.fixture
def gateway(
    script: Script, options: dict[str, Any], tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> Any:
    from service.stack import running_gateway
    from tests.gateway.fake_torchserve import fake_torchserve

    monkeypatch.setenv("SALIENCY_CANCEL_DIR", str(tmp_path / "cancel"))
    with (
        fake_torchserve(script) as upstream,
        running_gateway(upstream, ["beta", "alpha"], **options) as started,
    ):
        yield started.gateway


def test_list_models_reports_each_model_from_its_own_model_info(
    gateway: Gateway, stub: pb_grpc.ExplainServiceStub, script: Script
) -> None:
    listed = stub.ListModels(pb.ListModelsRequest(), timeout=10).models
    assert [m.name for m in listed] == ["alpha", "beta"]  # name order, not the config's
    alpha, beta = listed
    assert (alpha.default, beta.default) == (False, True)
    assert (alpha.version, alpha.labels_count, alpha.channels, alpha.height, alpha.width) == (
        "a1",
        2,
        3,
        32,
        32,
    )
    assert (beta.version, beta.labels_count, beta.channels, beta.height, beta.width) == (
        "b7",
        5,
        1,
        64,
        48,
    )
    assert (alpha.target_layer, beta.target_layer) == ("", "model.layer4")
    # Only the methods each model can run.
    assert list(alpha.methods) == [METHODS.number("vanilla_gradient")]
    assert list(beta.methods) == [METHODS.number("grad_cam"), METHODS.number("rise")]
    assert alpha.serving and beta.serving
    # Answered from the cache: with every worker holding its calls, the listing still comes
    # back (a call to TorchServe would wait past the 2 s deadline).
    frozen = threading.Event()
    script.hold.update({pool: frozen for name in INFOS for pool in (name, name + "--predict")})
    try:
        again = stub.ListModels(pb.ListModelsRequest(), timeout=2).models
        assert [(m.name, m.version) for m in again] == [("alpha", "a1"), ("beta", "b7")]
    finally:
        frozen.set()
    assert calls(gateway, "ListModels", "OK", model="all", expect=2) == 2


def test_a_pool_that_stops_answering_is_listed_as_not_serving(
    gateway: Gateway, stub: pb_grpc.ExplainServiceStub, script: Script
) -> None:
    gateway.backend.stale_after_s = 0.5
    frozen = threading.Event()
    script.hold["alpha--predict"] = frozen
    try:
        end = time.monotonic() + 20
        while stub.ListModels(pb.ListModelsRequest(), timeout=10).models[0].serving:
            assert time.monotonic() < end, "alpha stayed serving"
            time.sleep(0.05)
        alpha, beta = stub.ListModels(pb.ListModelsRequest(), timeout=10).models
        assert not alpha.serving and beta.serving
        assert alpha.version == "a1"  # what was learnt stays known
    finally:
        frozen.set()


def test_an_empty_name_picks_the_default_and_a_name_picks_its_model(
    stub: pb_grpc.ExplainServiceStub, script: Script
) -> None:
    assert stub.Predict(pb.PredictRequest(), timeout=10).model.name == "beta"
    assert stub.Predict(pb.PredictRequest(model="alpha"), timeout=10).model.name == "alpha"
    sent = [r.model_name for r in script.received if "predict" in r.input]
    assert sent == ["beta--predict", "alpha--predict"]
    info = stub.GetModelInfo(pb.GetModelInfoRequest(model="alpha"), timeout=10)
    assert info.model.version == "a1" and list(info.labels) == ["x", "y"]
    assert stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=10).model.version == "b7"


@pytest.mark.parametrize("name", ["gamma", "BETA", "beta--predict", "x" * 5000])
def test_an_unknown_name_is_not_found_listing_the_served_ones(
    gateway: Gateway, stub: pb_grpc.ExplainServiceStub, script: Script, name: str
) -> None:
    before = [r for r in script.received if "predict" in r.input]
    with pytest.raises(grpc.RpcError) as err:
        stub.Predict(pb.PredictRequest(model=name), timeout=10)
    assert err.value.code() == grpc.StatusCode.NOT_FOUND  # type: ignore[attr-defined]
    details = err.value.details()  # type: ignore[attr-defined]
    assert repr(name)[:20] in details and "serves beta, alpha" in details
    assert len(details) < 300
    assert [r for r in script.received if "predict" in r.input] == before  # never sent
    assert calls(gateway, "Predict", "NOT_FOUND", model="unknown") == 1


def test_a_long_list_of_served_names_is_cut_in_the_message() -> None:
    names = [f"model-{i:03d}" for i in range(300)]
    catalog = ModelCatalog(names)
    with pytest.raises(Exception) as err:
        catalog.resolve("nope")
    message = str(err.value)
    assert f"model-{LISTED_NAMES - 1:03d}" in message
    assert f"model-{LISTED_NAMES:03d}" not in message
    assert f"and {300 - LISTED_NAMES} more" in message
    assert len(message) < 600


def test_the_catalog_refuses_a_default_it_does_not_serve_and_keeps_good_infos() -> None:
    with pytest.raises(ValueError, match="not served"):
        ModelCatalog(["a", "b"], default="c")
    with pytest.raises(ValueError, match="once each"):
        ModelCatalog(["a", "a"])
    catalog = ModelCatalog(["a"])
    catalog.record("a", INFOS["alpha"].SerializeToString())
    # An error reply, bytes that are no ModelInfo, and a name not served change nothing.
    catalog.record("a", pb.ModelInfo(error=pb.Error(code="INTERNAL")).SerializeToString())
    catalog.record("a", b"\xff\xff\xff")
    catalog.record("zzz", INFOS["beta"].SerializeToString())
    assert catalog.infos == {"a": INFOS["alpha"]}
    (entry,) = catalog.listing(lambda _: False).models
    assert entry.version == "a1" and entry.default and not entry.serving


def test_each_model_gets_the_bounds_its_own_pools_call_for() -> None:
    small, large = PoolSize(workers=1, batch_size=1), PoolSize(workers=2, batch_size=4)
    config = GatewayConfig(
        models=("a", "b", "c"), model_pools={"a": (small, small), "b": (large, small)}
    )
    admission = config.admission()
    assert [admission.limit("a", kind) for kind in ("explain", "predict")] == [4, 4]
    assert [admission.limit("b", kind) for kind in ("explain", "predict")] == [32, 4]
    assert admission.limit("c", "explain") == DEFAULT_POOL.bound(4)  # not listed: default
    assert admission.total(config.models) == 4 + 4 + 32 + 4 + 2 * DEFAULT_POOL.bound(4)
    explicit = GatewayConfig(models=("a", "b"), model_pools=config.model_pools)
    explicit = replace(explicit, max_in_flight={"explain": 3})
    assert [explicit.admission().limit(m, "explain") for m in ("a", "b")] == [3, 3]


@pytest.mark.parametrize(
    "options",
    [{"health_interval_s": 60.0, "model_pools": {"alpha": (PoolSize(1, 1), PoolSize(1, 1))}}],
)
def test_a_full_model_refuses_while_another_still_admits(
    gateway: Gateway, stub: pb_grpc.ExplainServiceStub, script: Script
) -> None:
    held = threading.Event()
    script.hold["alpha--predict"] = held
    with ThreadPoolExecutor(4) as pool:
        try:
            waiting = [
                pool.submit(stub.Predict, pb.PredictRequest(model="alpha"), timeout=30)
                for _ in range(4)  # alpha's bound: 1 worker x batch 1 x 4
            ]
            end = time.monotonic() + 20
            while gateway.admission.in_flight.get(("alpha", "predict"), 0) < 4:
                assert time.monotonic() < end, "the held calls were not admitted"
                time.sleep(0.01)
            with pytest.raises(grpc.RpcError) as err:
                stub.Predict(pb.PredictRequest(model="alpha"), timeout=30)
            assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED  # type: ignore[attr-defined]
            assert "model alpha" in err.value.details()  # type: ignore[attr-defined]
            assert stub.Predict(pb.PredictRequest(), timeout=30).model.name == "beta"
        finally:
            held.set()
        assert [f.result().model.name for f in waiting] == ["alpha"] * 4


def test_a_model_not_answered_yet_is_listed_by_name_and_flags_only() -> None:
    catalog = ModelCatalog(["a", "b"], default="b")
    catalog.record("a", INFOS["alpha"].SerializeToString())
    a, b = catalog.listing(lambda name: name == "a").models
    assert (b.name, b.default, b.serving, b.version, list(b.methods)) == ("b", True, False, "", [])
    assert describe(b) == "b (default): not answered yet"
    total = len(METHODS.names())
    assert describe(a) == (
        f"a: version a1, input 3x32x32, 2 labels, CAM layer none, 1 of {total} methods"
    )
