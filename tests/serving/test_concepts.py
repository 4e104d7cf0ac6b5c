"""Concepts in the serving layer (``Explain`` with ``concepts``, ``GetConcepts``), on a
real tiny model directory (pt2 + ONNX) with a bank built from random images.

What is checked: the concepts of each explained target come back most important first,
with maps at the client's resolution; the same request gives the same bytes; every bad
request (no bank, a count above the bank's k, a class the bank lacks, over the budget)
fails with its own status before any decode or forward, and never fails its neighbour;
``GetConcepts`` answers the stored crops and refuses bad classes.
"""

from __future__ import annotations

import dataclasses
import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from service._proto.saliency.v1 import saliency_pb2 as pb
from service.client.decode import decode_map
from service.engine.concepts import ConceptBank, build_bank
from service.protocol.errors import TargetOutOfRangeError, UnsupportedMethodError
from service.protocol.limits import Limits
from service.protocol.names import METHODS
from service.runtime.artifacts import ModelBundle, load_bundle
from service.serving.concepts import ConceptServer
from service.serving.pipeline import Explainer
from tests.serving.conftest import LABELS, SIZE

LAYER = "model.features.2"
K = 3
BANKED = (0, 1, 2)  # class 3 has no images, hence no concepts


def _png(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


PICTURE = np.random.default_rng(0).integers(0, 255, (50, 40, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def bundle(tiny_model_dir: Path) -> ModelBundle:
    return load_bundle(tiny_model_dir)


@pytest.fixture(scope="module")
def bank(bundle: ModelBundle) -> ConceptBank:
    rng = np.random.default_rng(1)
    _, height, width = SIZE
    images = {c: rng.integers(0, 255, (4, height, width, 3), dtype=np.uint8) for c in BANKED}
    assert bundle.engine.model is not None
    return build_bank(bundle.engine.model, LAYER, images, k=K, crops_per_image=4, seed=0)


class Counted:
    """The bundle's ONNX forward, counted: planning must refuse before any call."""

    def __init__(self, bundle: ModelBundle) -> None:
        self.forward = bundle.forward
        self.calls = 0

    def __call__(self, batch: np.ndarray) -> np.ndarray:
        self.calls += 1
        return self.forward(batch)  # type: ignore[no-any-return]


def explainer_with(
    bundle: ModelBundle, bank: ConceptBank | None, limits: Limits | None = None
) -> tuple[Explainer, Counted]:
    counted = Counted(bundle)
    served = dataclasses.replace(bundle, forward=counted)  # type: ignore[arg-type]
    explainer = Explainer(served, limits)
    explainer.concepts = ConceptServer(served, bank, explainer.limits)
    return explainer, counted


def request(concepts: int, **fields: object) -> pb.ExplainRequest:
    req = pb.ExplainRequest(image=pb.Image(encoded=_png(PICTURE)), concepts=concepts, **fields)  # type: ignore[arg-type]
    req.methods.append(pb.MethodRequest(method=METHODS.number("grad_cam")))
    return req


def test_each_target_gets_its_most_important_concepts(
    bundle: ModelBundle, bank: ConceptBank
) -> None:
    explainer, counted = explainer_with(bundle, bank)
    [reply] = explainer.explain_batch([request(2, target_classes=[2, 0])])
    assert not reply.error.code, reply.error.message
    assert counted.calls == 1  # the prediction; the concepts run the torch model
    assert [found.target for found in reply.concepts] == [2, 0]
    assert [found.target_label for found in reply.concepts] == [LABELS[2], LABELS[0]]
    for found in reply.concepts:
        assert len(found.concepts) == 2
        assert all(0 <= c.concept < K for c in found.concepts)
        importances = [c.importance for c in found.concepts]
        assert importances == sorted(importances, reverse=True)
        for item in found.concepts:
            assert decode_map(item.map).shape == PICTURE.shape[:2]  # the client's size
    assert "concepts" in {t.stage for t in reply.timings}
    [again] = explainer.explain_batch([request(2, target_classes=[2, 0])])
    assert [f.SerializeToString() for f in again.concepts] == [
        f.SerializeToString() for f in reply.concepts
    ]


def test_no_concepts_asked_no_concepts_returned(bundle: ModelBundle, bank: ConceptBank) -> None:
    explainer, _ = explainer_with(bundle, bank)
    [reply] = explainer.explain_batch([request(0, top_k=1)])
    assert not reply.error.code and not reply.concepts


@pytest.mark.parametrize(
    ("concepts", "targets", "with_bank", "code", "message"),
    [
        (1, [0], False, "FAILED_PRECONDITION", "no concept bank"),
        (K + 1, [0], True, "INVALID_ARGUMENT", f"at most {K}"),
        (1, [3], True, "FAILED_PRECONDITION", "no concepts for class 3"),
    ],
)
def test_bad_requests_are_refused_before_any_forward_and_alone(
    bundle: ModelBundle,
    bank: ConceptBank,
    concepts: int,
    targets: list[int],
    with_bank: bool,
    code: str,
    message: str,
) -> None:
    explainer, counted = explainer_with(bundle, bank if with_bank else None)
    [bad] = explainer.explain_batch([request(concepts, target_classes=targets)])
    assert bad.error.code == code and message in bad.error.message, bad.error
    assert counted.calls == 0
    if with_bank:  # a good neighbour in the same batch is served
        bad, good = explainer.explain_batch(
            [request(concepts, target_classes=targets), request(1, target_classes=[1])]
        )
        assert bad.error.code == code and not good.error.code
        assert len(good.concepts) == 1


def test_concepts_join_the_request_budget(bundle: ModelBundle, bank: ConceptBank) -> None:
    # grad_cam costs no forward rows; the concepts' design (32 x (k + 2) rows) does.
    explainer, counted = explainer_with(bundle, bank, Limits(max_forwards=100))
    [reply] = explainer.explain_batch([request(1, target_classes=[0])])
    assert reply.error.code == "RESOURCE_EXHAUSTED"
    assert "concepts (k=3" in reply.error.message
    assert counted.calls == 0


def test_get_concepts_answers_the_stored_crops(bundle: ModelBundle, bank: ConceptBank) -> None:
    server = ConceptServer(bundle, bank)
    reply = server.catalog(pb.GetConceptsRequest())
    assert [c.target for c in reply.classes] == list(BANKED)
    assert reply.layer == LAYER and reply.k == K and reply.model.name == "tiny"
    for item in reply.classes:
        assert [c.concept for c in item.concepts] == list(range(K))
        for concept in item.concepts:
            assert list(concept.crops) == list(bank.classes[item.target].crops[concept.concept])
            with Image.open(io.BytesIO(concept.crops[0])) as crop:
                assert crop.size == (64, 64)
    only = server.catalog(pb.GetConceptsRequest(classes=[1, 1]))
    assert [c.target for c in only.classes] == [1]


def test_get_concepts_refuses_bad_classes_and_models_without_a_bank(
    bundle: ModelBundle, bank: ConceptBank
) -> None:
    with pytest.raises(TargetOutOfRangeError, match="out of range"):
        ConceptServer(bundle, bank).catalog(pb.GetConceptsRequest(classes=[len(LABELS)]))
    with pytest.raises(UnsupportedMethodError, match="no concepts for class 3"):
        ConceptServer(bundle, bank).catalog(pb.GetConceptsRequest(classes=[3]))
    with pytest.raises(UnsupportedMethodError, match="saliency-serve concepts"):
        ConceptServer(bundle, None).catalog(pb.GetConceptsRequest())


def test_the_explainer_serves_the_bank_stored_in_the_model_folder(
    bundle: ModelBundle, bank: ConceptBank, tmp_path: Path
) -> None:
    assert Explainer(bundle, concepts_in=tmp_path).concepts.bank is None
    for name, data in bank.to_files().items():
        (tmp_path / name).write_bytes(data)
    served = Explainer(bundle, concepts_in=tmp_path).concepts.bank
    assert served is not None and served.meta() == bank.meta()
