"""The request pipeline on a real (tiny) model bundle: ONNX Runtime forward, torch gradients."""

import io
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from service._proto.saliency.v1 import saliency_pb2 as pb
from service.client.decode import decode_map, decode_mask
from service.engine.registry import list_methods
from service.engine.scores import compute_scores
from service.protocol.names import METHODS
from service.serving import codec
from service.serving.pipeline import Explainer
from tests.serving.conftest import LABELS, SIZE
from tests.serving.tiny_net import TinyNet

RNG = np.random.default_rng(0)
PICTURE = RNG.integers(0, 255, (50, 40, 3), dtype=np.uint8)
FLOAT32_EPS = float(np.finfo(np.float32).eps)


def png(array: np.ndarray = PICTURE) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return buffer.getvalue()


def request(*methods: str, **fields: object) -> pb.ExplainRequest:
    req = pb.ExplainRequest(image=pb.Image(encoded=png()), **fields)  # type: ignore[arg-type]
    req.methods.extend(pb.MethodRequest(method=METHODS.number(m)) for m in methods)
    return req


METHODS_BY_NAME = {spec.name: spec for spec in list_methods()}


def test_model_info_lists_every_registered_method(explainer: Explainer) -> None:
    info = explainer.model_info()
    assert [m.name for m in info.methods] == [s.name for s in list_methods()]
    assert list(info.labels) == ["alpha", "beta", "gamma", "delta"]
    assert (info.channels, info.height, info.width) == (3, 32, 32)
    # A CNN runs every method but those that read attention, and says why not those.
    for method in info.methods:
        attention = METHODS_BY_NAME[method.name].needs_attention
        assert method.available == (not attention) and bool(method.reason) == attention
        assert not attention or "no attention layers" in method.reason
    assert info.cam_layer.name == info.target_layer == "model.features.2"
    assert (info.cam_layer.kind, info.cam_layer.chosen) == ("spatial", "given")


def test_explain_returns_maps_masks_and_boxes_at_image_resolution(explainer: Explainer) -> None:
    [reply] = explainer.explain_batch([request("vanilla_gradient", "grad_cam", top_k=2)])
    assert not reply.error.code
    assert len(reply.predictions) == 4  # at least 5 asked, 4 labels
    probabilities = [p.probability for p in reply.predictions]
    assert probabilities == sorted(probabilities, reverse=True)
    assert abs(sum(probabilities) - 1) < 1e-5
    assert len(reply.explanations) == 4  # 2 methods x top-2
    assert {e.target for e in reply.explanations} == {p.index for p in reply.predictions[:2]}
    for item in reply.explanations:
        assert (item.map.height, item.map.width) == (50, 40)
        assert (item.mask.height, item.mask.width) == (50, 40)
        mask = decode_mask(item.mask)
        assert 0 < mask.sum() <= 0.1 * mask.size  # 95th percentile mask
        assert item.HasField("box")
        assert item.box.x_max < 40 and item.box.y_max < 50
    stages = {t.stage for t in reply.timings}
    assert {"decode", "forward", "explain", "mask", "encode", "total"} <= stages


def test_integrated_gradients_reports_its_completeness_error(
    explainer: Explainer, tiny_model_dir: Path
) -> None:
    """The reported error is |sum(attr) - (f(x) - f(0))|, recomputed here in float64.

    The reference is Integrated Gradients written from the paper on a float64 copy of the
    served network, at the request's model input, with the same 8 Gauss-Legendre nodes.
    """
    req = request()
    req.methods.append(
        pb.MethodRequest(method=METHODS.number("integrated_gradients"), params={"n_steps": "8"})
    )
    [reply] = explainer.explain_batch([req])
    [item] = reply.explanations
    assert item.HasField("completeness_error")

    net = TinyNet(len(LABELS)).double().eval()
    net.load_state_dict(torch.load(tiny_model_dir / "weights.pt", weights_only=True))
    net.requires_grad_(False)

    def logit(pixels: torch.Tensor) -> torch.Tensor:  # the bundle's mean 0.5, std 0.25
        return net((pixels - 0.5) / 0.25)[:, item.target]

    x = torch.from_numpy(codec.to_model_input(PICTURE, *SIZE[1:]))[None]
    nodes, weights = np.polynomial.legendre.leggauss(8)
    # Path points formed in float32 as the method forms them, then widened.
    alphas = torch.tensor((nodes + 1) / 2, dtype=torch.float32).view(-1, 1, 1, 1)
    path = (alphas * x).double()
    _check_no_relu_input_near_zero(net, torch.cat([path, x.double(), 0 * path[:1]]))
    path.requires_grad_(True)
    (grads,) = torch.autograd.grad(logit(path).sum(), path)
    attribution = (torch.from_numpy(weights / 2).view(-1, 1, 1, 1) * grads).sum(0) * x.double()
    with torch.no_grad():
        gap = logit(x.double()) - logit(torch.zeros_like(x).double())
    expected = abs(float(attribution.sum() - gap))
    # Both sides round in float32 only (gradients and the two end logits): a few dozen ulps
    # of what is summed bounds their difference. The error is ~1e-3 of the gap here, so a
    # wrong definition (other ends, other target, the resized map) lands far outside.
    scale = float(attribution.abs().sum() + logit(x.double()).abs().sum())
    assert 1e-5 * abs(float(gap)) < expected < 0.1 * abs(float(gap))  # a quadrature error
    assert abs(item.completeness_error - expected) <= 64 * FLOAT32_EPS * scale


def _check_no_relu_input_near_zero(net: TinyNet, points: torch.Tensor) -> None:
    """Float32 and float64 take the same linear piece of the ReLU network at ``points``.

    A pre-activation within rounding of 0 could switch its unit in float32 and not in
    float64; 1e-5 is ~100x the float32 rounding of these few-dozen-term sums.
    """
    h = (points - 0.5) / 0.25
    with torch.no_grad():
        for layer in net.features:
            if isinstance(layer, torch.nn.ReLU):
                assert float(h.abs().min()) > 1e-5, "pick another picture or node count"
            h = layer(h)


def test_explicit_targets_and_params(explainer: Explainer) -> None:
    req = request(target_classes=[3, 1])
    req.methods.append(
        pb.MethodRequest(method=METHODS.number("smoothgrad"), params={"n_samples": "4"})
    )
    [reply] = explainer.explain_batch([req])
    assert [e.target for e in reply.explanations] == [3, 1]
    assert reply.explanations[0].params["n_samples"] == "4"
    assert reply.explanations[0].target_label == "delta"


@pytest.mark.parametrize(
    ("mutate", "code", "message"),
    [
        (lambda r: r.target_classes.append(4), "INVALID_ARGUMENT", "out of range"),
        (
            lambda r: r.methods.append(pb.MethodRequest(method=999)),
            "INVALID_ARGUMENT",
            "unknown method",
        ),  # type: ignore[arg-type]
        (lambda r: r.methods.append(pb.MethodRequest()), "INVALID_ARGUMENT", "unset"),
        (
            lambda r: r.methods.append(
                pb.MethodRequest(method=METHODS.number("smoothgrad"), params={"bogus": "1"})
            ),
            "INVALID_ARGUMENT",
            "bogus",
        ),
        (
            lambda r: r.methods.append(
                pb.MethodRequest(method=METHODS.number("smoothgrad"), params={"n_samples": "many"})
            ),
            "INVALID_ARGUMENT",
            "n_samples",
        ),
        (lambda r: setattr(r, "top_k", 9), "INVALID_ARGUMENT", "top_k"),
        (lambda r: r.scores.append(77), "INVALID_ARGUMENT", "score"),  # type: ignore[arg-type]
        (lambda r: r.image.ClearField("encoded"), "INVALID_ARGUMENT", "empty"),
        (
            lambda r: r.mask.CopyFrom(pb.MaskOptions(percentile=150)),
            "INVALID_ARGUMENT",
            "percentile",
        ),
    ],
)
def test_bad_requests_fail_alone(explainer: Explainer, mutate, code: str, message: str) -> None:  # type: ignore[no-untyped-def]
    bad = request()
    mutate(bad)
    good = request("vanilla_gradient")
    bad_reply, good_reply = explainer.explain_batch([bad, good])
    assert bad_reply.error.code == code
    assert message in bad_reply.error.message
    assert not good_reply.error.code
    [alone] = explainer.explain_batch([good])
    assert good_reply.explanations[0].map.data == alone.explanations[0].map.data


def test_too_many_explanations_is_resource_exhausted(explainer: Explainer) -> None:
    req = request(*(["vanilla_gradient"] * 9), top_k=4)  # 36 > 32
    [reply] = explainer.explain_batch([req])
    assert reply.error.code == "RESOURCE_EXHAUSTED"


def test_passed_deadline_is_deadline_exceeded(explainer: Explainer) -> None:
    [reply] = explainer.explain_batch([request("smoothgrad")], [time.monotonic() - 1])
    assert reply.error.code == "DEADLINE_EXCEEDED"


@pytest.mark.parametrize("method", ["vanilla_gradient", "grad_cam", "smoothgrad", "rise"])
def test_a_request_gets_the_same_answer_alone_or_batched(explainer: Explainer, method: str) -> None:
    # Raw float16 maps: an 8-bit PNG could put two float32 values an ulp apart (batches of
    # another size may round differently) on two sides of a quantisation level.
    fields: dict[str, object] = {"seed": 7, "map_encoding": pb.MAP_ENCODING_FLOAT16}
    mine = request(method, **fields)
    others = [request(method, target_classes=[2], **fields), request(method, top_k=3, **fields)]
    [alone] = explainer.explain_batch([mine])
    batched = explainer.explain_batch([*others, mine])[-1]
    assert alone.explanations[0].map.encoding == pb.MAP_ENCODING_FLOAT16
    want = decode_map(alone.explanations[0].map)
    # Values within float32 rounding of each other round to the same or to adjacent float16
    # values: at most 2^-10 apart relative, 2^-24 in the subnormal range.
    atol = max(1e-6 * float(np.abs(want).max()), 2.0**-24)
    np.testing.assert_allclose(
        decode_map(batched.explanations[0].map), want, rtol=2.0**-10, atol=atol
    )


def test_stream_events_come_prediction_first_then_maps_then_scores(explainer: Explainer) -> None:
    req = request("vanilla_gradient", "grad_cam", scores=[pb.SCORE_DELETION_AUC])
    kinds = [event.kind for event in explainer.run(explainer.jobs([req]))]
    assert kinds == ["prediction", "explanation", "scores", "explanation", "scores", "done"]


def test_scores_are_those_of_the_explanations_own_map(explainer: Explainer) -> None:
    """The attached scores are the engine's scores of this map, target and model input.

    (What the scores mean is checked against references in tests/engine/test_scores.py;
    here, that the pipeline scores the right map, at model resolution, for the right class.)
    """
    req = request("vanilla_gradient", scores=[pb.SCORE_DELETION_AUC, pb.SCORE_INSERTION_AUC])
    [reply] = explainer.explain_batch([req])
    [item] = reply.explanations
    values = {pb.Score.Name(s.score): s.value for s in item.scores}
    assert set(values) == {"SCORE_DELETION_AUC", "SCORE_INSERTION_AUC"}
    x = codec.to_model_input(PICTURE, *SIZE[1:])[None]
    engine = explainer.bundle.engine
    saliency = engine.explain(torch.from_numpy(x), [item.target], "vanilla_gradient").maps
    expected = compute_scores(
        explainer.bundle.forward,
        x,
        saliency.numpy(),
        np.array([item.target]),
        ["deletion_auc", "insertion_auc"],
    )
    # float32 on the wire
    assert values["SCORE_DELETION_AUC"] == pytest.approx(expected["deletion_auc"][0], rel=1e-6)
    assert values["SCORE_INSERTION_AUC"] == pytest.approx(expected["insertion_auc"][0], rel=1e-6)
    assert values["SCORE_DELETION_AUC"] != values["SCORE_INSERTION_AUC"]


def test_predict_batch(explainer: Explainer) -> None:
    replies = explainer.predict_batch(
        [pb.PredictRequest(image=pb.Image(encoded=png()), top_k=2), pb.PredictRequest()]
    )
    assert len(replies[0].predictions) == 2
    assert replies[1].error.code == "INVALID_ARGUMENT"


def test_cancelled_request_stops_and_its_group_mates_finish(explainer: Explainer) -> None:
    from service.serving.pipeline import Job

    gone = Job(request=request("smoothgrad", seed=1), cancelled=lambda: True)
    staying = Job(request=request("smoothgrad", seed=1))
    done = {id(e.job): e.message for e in explainer.run([gone, staying]) if e.kind == "done"}
    assert done[id(gone)].error.code == "CANCELLED"  # type: ignore[union-attr]
    assert not done[id(staying)].error.code  # type: ignore[union-attr]
    assert len(done[id(staying)].explanations) == 1  # type: ignore[union-attr]


def test_work_stops_once_every_request_of_a_group_is_cancelled(explainer: Explainer) -> None:
    from service.serving.pipeline import Job

    polls = []

    def cancelled_after_first_poll() -> bool:
        polls.append(1)
        return len(polls) > 3

    job = Job(request=request("rise", seed=1), cancelled=cancelled_after_first_poll)
    [done] = [e.message for e in explainer.run([job]) if e.kind == "done"]
    assert done.error.code == "CANCELLED"  # type: ignore[union-attr]


def test_an_exported_program_alone_serves_gradient_methods(tiny_model_dir, tmp_path) -> None:  # type: ignore[no-untyped-def]
    """An archive from a .pt2 (no eager module): gradients work, CAM is reported unavailable."""
    import json
    import shutil

    from service.runtime.artifacts import load_bundle

    for name in ("model.pt2", "model.onnx", "model.json"):
        shutil.copy(tiny_model_dir / name, tmp_path / name)
    meta = json.loads((tmp_path / "model.json").read_text())
    meta["eager"] = None
    (tmp_path / "model.json").write_text(json.dumps(meta))
    exported = Explainer(load_bundle(tmp_path))
    assert exported.bundle.gradient_source == "pt2"
    [reply] = exported.explain_batch([request("vanilla_gradient", "integrated_gradients")])
    assert not reply.error.code and len(reply.explanations) == 2
    [cam] = exported.explain_batch([request("grad_cam")])
    assert cam.error.code == "FAILED_PRECONDITION"
    available = {m.name: m.available for m in exported.model_info().methods}
    assert available["vanilla_gradient"] and not available["grad_cam"]


def test_a_photo_stored_sideways_is_explained_upright(explainer: Explainer) -> None:
    """Finding 9: EXIF orientation 6 (a phone's portrait photo) was explained sideways.

    The explanation of the tagged JPEG equals that of the upright picture sent losslessly
    (maps, masks and boxes in the frame the user sees)."""
    stored_buffer = io.BytesIO()
    Image.fromarray(PICTURE).save(stored_buffer, format="JPEG", quality=95)
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to view
    tagged_buffer = io.BytesIO()
    Image.fromarray(PICTURE).save(tagged_buffer, format="JPEG", quality=95, exif=exif.tobytes())
    as_stored = np.asarray(Image.open(stored_buffer).convert("RGB"))
    upright = np.ascontiguousarray(np.rot90(as_stored, -1))  # what a viewer shows
    methods = ("vanilla_gradient", "grad_cam")
    tagged = request(*methods, top_k=2)
    tagged.image.encoded = tagged_buffer.getvalue()
    plain = request(*methods, top_k=2)
    plain.image.encoded = png(upright)
    [a, b] = explainer.explain_batch([tagged, plain])
    assert not a.error.code and not b.error.code
    assert [p.index for p in a.predictions] == [p.index for p in b.predictions]
    for x, y in zip(a.explanations, b.explanations, strict=True):
        assert (x.map.height, x.map.width) == (40, 50)  # PICTURE is 50 x 40, stored
        assert x.map == y.map and x.mask == y.mask and x.box == y.box
