"""CRAFT concepts through the real stack (the session's TorchServe and gateway, with the
default archive's bank): ``Explain`` with ``concepts``, ``GetConcepts``, both clients,
clear statuses for bad requests, and the CLI."""

from __future__ import annotations

import asyncio
import io
import shutil
import zipfile
from pathlib import Path

import grpc
import numpy as np
import pytest
from PIL import Image

from service.cli import main
from service.client import AsyncSaliencyClient, SaliencyClient, decode_map
from service.engine.concepts import ConceptBank
from service.models.synthetic import CLASS_NAMES, generate
from tests.integration.conftest import RunningGateway

pytestmark = pytest.mark.integration
K = 8  # the default bank's concepts per class (service/archive_concepts.py)


def png_bytes(pixels: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


HELD_OUT = generate(1, 7)  # the training set's held-out seed: never a bank image


def test_explain_returns_the_predicted_class_concepts(client: SaliencyClient) -> None:
    image = png_bytes(HELD_OUT.images[0])
    reply = client.explain(image, methods=["grad_cam"], concepts=3, seed=4, timeout=120)
    [found] = reply.concepts
    assert found.target == reply.predictions[0].index == reply.explanations[0].target
    assert found.target_label == CLASS_NAMES[found.target]
    importances = [c.importance for c in found.concepts]
    assert len(importances) == 3 and importances == sorted(importances, reverse=True)
    assert len({c.concept for c in found.concepts}) == 3
    assert all(0 <= c.concept < K for c in found.concepts)
    assert decode_map(found.concepts[0].map).shape == (128, 128)
    assert "concepts" in {t.stage for t in reply.timings}


def test_a_stream_carries_the_concepts_in_its_summary(client: SaliencyClient) -> None:
    image = png_bytes(HELD_OUT.images[0])
    parts = list(client.explain_stream(image, targets=[1], concepts=2, seed=4, timeout=120))
    assert parts[-1].WhichOneof("part") == "summary"
    [found] = parts[-1].summary.concepts
    assert found.target == 1 and len(found.concepts) == 2


def test_get_concepts_lists_every_class_with_typical_crops(client: SaliencyClient) -> None:
    reply = client.concepts()
    assert [c.target for c in reply.classes] == list(range(len(CLASS_NAMES)))
    assert reply.k == K and reply.layer == "model.features.5"
    assert "synthetic training set" in reply.source
    for item in reply.classes:
        assert len(item.concepts) == K
        with Image.open(io.BytesIO(item.concepts[0].crops[0])) as crop:
            assert crop.size == (64, 64)
    assert [c.target for c in client.concepts([3]).classes] == [3]


def test_the_async_client_asks_for_concepts(gateway: RunningGateway) -> None:
    async def calls() -> tuple[int, int]:
        async with AsyncSaliencyClient(gateway.address) as aio:
            catalog = await aio.concepts([2])
            reply = await aio.explain(
                png_bytes(HELD_OUT.images[0]), targets=[2], concepts=1, timeout=120
            )
            return len(catalog.classes[0].concepts), len(reply.concepts[0].concepts)

    assert asyncio.run(calls()) == (K, 1)


@pytest.mark.parametrize(
    ("call", "code", "message"),
    [
        (lambda c, img: c.explain(img, concepts=K + 1), "INVALID_ARGUMENT", f"at most {K}"),
        (lambda c, img: c.concepts([99]), "INVALID_ARGUMENT", "out of range"),
    ],
)
def test_bad_requests_get_clear_statuses(client, call, code: str, message: str) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(grpc.RpcError) as err:
        call(client, png_bytes(HELD_OUT.images[0]))
    assert err.value.code().name == code and message in err.value.details()


def test_the_cli_writes_concept_maps_and_crops(
    gateway: RunningGateway, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    image = tmp_path / "shape.png"
    image.write_bytes(png_bytes(HELD_OUT.images[0]))
    argv = ["explain", str(image), "--concepts", "2", "--out", str(tmp_path / "maps")]
    assert main([*argv, "--address", gateway.address]) == 0
    written = sorted(p.name for p in (tmp_path / "maps").glob("concept*.png"))
    assert len(written) == 2
    assert capsys.readouterr().out.count("importance") == 2
    argv = ["concepts", "--show", "--class", "1", "--out", str(tmp_path / "crops")]
    assert main([*argv, "--address", gateway.address]) == 0
    crops = list((tmp_path / "crops" / f"1_{CLASS_NAMES[1]}").glob("*.png"))
    assert len(crops) == K * 3


def test_the_cli_adds_a_bank_from_a_folder_to_an_archive(
    model_store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    mar = tmp_path / "copy.mar"
    shutil.copyfile(model_store / "shapes.mar", mar)
    batch = generate(20, 11)
    for label in (0, 4):
        folder = tmp_path / "images" / CLASS_NAMES[label]
        folder.mkdir(parents=True)
        for i in np.flatnonzero(batch.labels == label):
            (folder / f"{i}.png").write_bytes(png_bytes(batch.images[i]))
    argv = ["concepts", "--archive", str(mar), "--images", str(tmp_path / "images")]
    assert main([*argv, "--k", "3", "--crops", "4"]) == 0
    assert "2 classes x 3 concepts" in capsys.readouterr().out
    with zipfile.ZipFile(mar) as archive:
        archive.extractall(tmp_path / "unpacked")
        names = set(archive.namelist())
    assert {"model.json", "model.onnx", "concepts.npz", "concepts.json"} <= names
    bank = ConceptBank.read(tmp_path / "unpacked")
    assert bank is not None and sorted(bank.classes) == [0, 4] and bank.k == 3
    assert bank.source == "images: 4 images"
    # A sub-folder that is no label is refused with the labels, and the archive is kept.
    before = mar.read_bytes()
    (tmp_path / "images" / "nonsense").mkdir()
    assert main(argv) == 2
    assert "'nonsense' is not a label (circle" in capsys.readouterr().err
    assert mar.read_bytes() == before
