"""Planning: a request is checked completely before any decode or model work."""

from __future__ import annotations

import numpy as np
import pytest

from service._proto.saliency.v1 import saliency_pb2 as pb
from service.client.decode import decode_mask
from service.engine.registry import MASKS, SCORES
from service.protocol.cost import MIB
from service.protocol.limits import Limits
from service.protocol.names import MASKS as MASK_ENUM
from service.protocol.names import METHODS
from service.serving import codec
from service.serving.pipeline import Explainer
from tests.serving.test_pipeline import png


def request(*methods: str, **fields: object) -> pb.ExplainRequest:
    req = pb.ExplainRequest(image=pb.Image(encoded=png()), **fields)  # type: ignore[arg-type]
    req.methods.extend(pb.MethodRequest(method=METHODS.number(m)) for m in methods)  # type: ignore[misc]
    return req


def with_params(method: str, **params: str) -> pb.ExplainRequest:
    req = request()
    req.methods.append(pb.MethodRequest(method=METHODS.number(method), params=params))  # type: ignore[arg-type]
    return req


@pytest.fixture
def no_model_work(explainer: Explainer, monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Records every decode and forward; the planning tests assert there were none."""
    calls: list[str] = []
    decode, forward = codec.decode_image, explainer.bundle.forward

    def counting_decode(*args: object, **kwargs: object) -> np.ndarray:
        calls.append("decode")
        return decode(*args, **kwargs)  # type: ignore[arg-type]

    def counting_forward(batch: np.ndarray) -> np.ndarray:
        calls.append("forward")
        return forward(batch)

    monkeypatch.setattr(codec, "decode_image", counting_decode)
    monkeypatch.setattr(explainer.bundle, "forward", counting_forward)
    return calls


@pytest.mark.parametrize(
    ("bad", "message"),
    [
        (with_params("occlusion", window="4", stride="6"), "stride 6 must not exceed window 4"),
        (with_params("occlusion", window="40"), "larger than the model's 32x32 input"),
        (with_params("rise", grid_size="33"), "exceeds the model's 32x32 input"),
        (with_params("sobol", n_designs="48"), "power of two"),
        (with_params("smoothgrad", noise_level="nan"), "finite"),
        (with_params("smoothgrad", noise_level="inf"), "finite"),  # finding 11: was OK
        (with_params("occlusion", baseline="nan"), "finite"),  # finding 11: was a NaN map
        (with_params("occlusion", baseline="1e30"), "must be >= 0 and <= 1"),
        (with_params("occlusion", stride="0"), "must be >= 1"),  # finding 12's request
        (with_params("integrated_gradients", blur_sigma="inf"), "finite"),  # finding 4
        (with_params("integrated_gradients", blur_sigma="1e308"), "<= 4096"),  # was INTERNAL
        (with_params("rise", n_masks="2147483648"), "<= 65536"),  # finding 4: 512 GB asked
        (with_params("sobol", n_designs="2147483648"), "<= 16384"),
        (with_params("sobol", grid_size="128"), "<= 32"),  # finding 4: SobolEngine's limit
        (with_params("integrated_gradients", n_steps="1e3"), "integer"),
        (request(mask=pb.MaskOptions(kind=pb.MASK_KIND_GRABCUT, background_quantile=0.99)), "<"),
    ],
)
def test_invalid_requests_fail_before_any_decode_or_forward(
    explainer: Explainer, no_model_work: list[str], bad: pb.ExplainRequest, message: str
) -> None:
    [reply] = explainer.explain_batch([bad])
    assert reply.error.code == "INVALID_ARGUMENT"
    assert message in reply.error.message
    assert no_model_work == []


def test_an_unbounded_blur_fails_alone_not_its_batch(explainer: Explainer) -> None:
    """Finding 3: ``blur_sigma`` beyond any image made the blur's kernel radius overflow in
    the shared engine call, and every request of the batch got INTERNAL."""
    hostile = with_params("integrated_gradients", baseline="blurred", blur_sigma="1e308")
    good = with_params("integrated_gradients", baseline="blurred", blur_sigma="3")
    replies = explainer.explain_batch([good, hostile, good])
    assert [r.error.code for r in replies] == ["", "INVALID_ARGUMENT", ""]
    assert replies[0].explanations[0].map.data == replies[2].explanations[0].map.data


def test_a_request_over_the_cost_budget_fails_before_any_decode_or_forward(
    explainer: Explainer, no_model_work: list[str]
) -> None:
    """Finding 5: an exhaustive Sobol held both workers for minutes; now it is refused up
    front with its cost and the budget, and the valid request batched with it is served."""
    dear = with_params("sobol", n_designs="1024", grid_size="16")
    dear.top_k = 2
    [refused, served] = explainer.explain_batch([dear, request("vanilla_gradient")])
    assert refused.error.code == "RESOURCE_EXHAUSTED"
    assert refused.error.message.startswith(
        "sobol (grid_size=16, n_designs=1024) costs 264,192 forwards x 2 = 528,384"
    )
    assert "budget is 65,536 forwards (SALIENCY_LIMIT_MAX_FORWARDS)" in refused.error.message
    assert no_model_work == ["decode", "forward"]  # the served request's only
    assert not served.error.code and len(served.explanations) == 1


def test_the_cost_message_says_what_to_change(explainer: Explainer) -> None:
    [refused] = explainer.explain_batch([with_params("sobol", n_designs="16384", grid_size="11")])
    assert refused.error.code == "RESOURCE_EXHAUSTED"
    assert refused.error.message == (
        "sobol (grid_size=11, n_designs=16384) costs 2,015,232 forwards; the per-request "
        "budget is 65,536 forwards (SALIENCY_LIMIT_MAX_FORWARDS): ask for fewer samples, "
        "steps or explanations"
    )


def test_memory_shaped_parameters_are_held_to_the_memory_budget(explainer: Explainer) -> None:
    small = Explainer(explainer.bundle, Limits(max_memory_bytes=4 * MIB))
    # 32x32 input: 64 noise samples hold 64 * 3 * 32 * 32 * 4 bytes = 0.75 MiB; 512 hold 6.
    [fits] = small.explain_batch([with_params("smoothgrad", n_samples="64")])
    [refused] = small.explain_batch([with_params("smoothgrad", n_samples="512")])
    assert not fits.error.code
    assert refused.error.code == "RESOURCE_EXHAUSTED"
    assert "holds 6 MiB at once; the per-request budget is 4 MiB" in refused.error.message


def test_a_huge_parameter_value_gets_a_short_status(explainer: Explainer) -> None:
    [reply] = explainer.explain_batch([with_params("smoothgrad", n_samples="9" * 100_000)])
    assert reply.error.code == "INVALID_ARGUMENT"
    assert "n_samples" in reply.error.message and len(reply.error.message) < 400


HUGE = "x" * 100_000


def hostile(mutate: object) -> pb.ExplainRequest:
    req = request("occlusion")
    mutate(req)  # type: ignore[operator]
    return req


@pytest.mark.parametrize(
    "bad",
    [
        hostile(lambda r: r.methods[0].params.update({HUGE: "1"})),
        hostile(lambda r: r.methods[0].params.update({"window": HUGE})),
        hostile(lambda r: r.methods[0].params.update({"baseline": "9" * 100_000})),
        hostile(lambda r: r.mask.params.update({HUGE: HUGE})),
        hostile(lambda r: r.mask.params.update({"percentile": HUGE})),
        hostile(lambda r: r.target_classes.extend([2**31 - 1] * 10_000)),
        hostile(lambda r: r.methods.add(method=2**31 - 1)),
        hostile(lambda r: r.scores.append(2**31 - 1)),
        hostile(lambda r: setattr(r, "map_encoding", 2**31 - 1)),
        hostile(lambda r: r.image.CopyFrom(pb.Image(tensor=pb.Tensor(shape=[9] * 50_000)))),
        hostile(lambda r: r.image.CopyFrom(pb.Image(encoded=HUGE.encode()))),
    ],
)
def test_every_message_is_short_and_free_of_internals(
    explainer: Explainer, bad: pb.ExplainRequest
) -> None:
    """Finding 10: a 100,000-character value made the status exceed the metadata limit.
    Messages echo at most ~100 characters of any input and no Python internals."""
    [reply] = explainer.explain_batch([bad])
    assert reply.error.code in ("INVALID_ARGUMENT", "RESOURCE_EXHAUSTED"), reply.error
    assert len(reply.error.message) < 400, reply.error.message
    for internal in ("object at 0x", "Traceback", "Error:", "<class"):
        assert internal not in reply.error.message


def mask_of(explainer: Explainer, options: pb.MaskOptions) -> np.ndarray:
    [reply] = explainer.explain_batch([request("vanilla_gradient", mask=options)])
    assert not reply.error.code, reply.error.message
    return decode_mask(reply.explanations[0].mask)


def test_legacy_mask_fields_and_params_mean_the_same(explainer: Explainer) -> None:
    legacy = mask_of(explainer, pb.MaskOptions(kind=pb.MASK_KIND_THRESHOLD, percentile=80))
    new = mask_of(
        explainer, pb.MaskOptions(kind=pb.MASK_KIND_THRESHOLD, params={"percentile": "80"})
    )
    default = mask_of(explainer, pb.MaskOptions())
    np.testing.assert_array_equal(legacy, new)
    # 50 x 40 pixels: the 80th percentile keeps ~400, the default 95th ~100.
    assert 350 <= legacy.sum() <= 410 and 80 <= default.sum() <= 110


def test_a_mask_parameter_set_twice_is_refused(explainer: Explainer) -> None:
    options = pb.MaskOptions(percentile=80, params={"percentile": "90"})
    [reply] = explainer.explain_batch([request(mask=options)])
    assert reply.error.code == "INVALID_ARGUMENT" and "set twice" in reply.error.message


def test_legacy_fields_of_another_mask_are_ignored(explainer: Explainer) -> None:
    # Old clients may fill every MaskOptions field; only the chosen mask's count (150 would
    # be refused as the threshold's percentile).
    options = pb.MaskOptions(kind=pb.MASK_KIND_GRABCUT, percentile=150)
    np.testing.assert_array_equal(
        mask_of(explainer, options), mask_of(explainer, pb.MaskOptions(kind=pb.MASK_KIND_GRABCUT))
    )


def test_mask_none_sends_no_mask_and_no_box(explainer: Explainer) -> None:
    [reply] = explainer.explain_batch([request(mask=pb.MaskOptions(kind=pb.MASK_KIND_NONE))])
    [item] = reply.explanations
    assert not item.HasField("mask") and not item.HasField("box")


def test_model_info_lists_masks_and_scores_with_their_parameters(explainer: Explainer) -> None:
    info = explainer.model_info()
    assert [m.name for m in info.masks] == MASKS.names()
    assert [s.name for s in info.scores] == SCORES.names()
    assert all(m.kind == MASK_ENUM.number(m.name) for m in info.masks)
    grabcut = next(m for m in info.masks if m.name == "grabcut")
    quantile = next(p for p in grabcut.params if p.name == "foreground_quantile")
    assert (quantile.type, quantile.default, quantile.maximum) == ("float", "0.95", 1.0)
    assert quantile.minimum_exclusive and not quantile.maximum_exclusive and quantile.doc
    deletion = next(s for s in info.scores if s.name == "deletion_auc")
    assert not deletion.higher_is_better
    sobol = next(m for m in info.methods if m.name == "sobol")
    assert {p.name: p.default for p in sobol.params} == dict(sobol.defaults)
    perturbation = next(p for p in sobol.params if p.name == "perturbation")
    assert list(perturbation.choices) == ["inpainting", "blurring"]
    assert not perturbation.HasField("minimum")


def test_echoed_params_are_the_typed_values(explainer: Explainer) -> None:
    [reply] = explainer.explain_batch([with_params("smoothgrad", n_samples=" 004 ")])
    assert reply.explanations[0].params == {"n_samples": "4", "noise_level": "0.15"}
