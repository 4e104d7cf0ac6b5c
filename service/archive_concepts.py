"""``saliency-serve concepts``: a CRAFT concept bank added to an existing ``.mar``.

The bank (:mod:`service.engine.concepts`) is built from a folder of the user's images,
one sub-folder per class label (``DIR/<label>/*.png|jpg``), with the archive's own model
and its recorded CAM layer, and written into the archive beside ``model.json``
(``concepts.npz`` + ``concepts.json``); the worker reads it when it starts. The default
archive gets a bank built from the synthetic training set (:func:`default_concept_images`).
"""

from __future__ import annotations

import os
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from pathlib import Path

import cv2
import numpy as np
import torch

from service.archive_code import ArchiveError, restored_path
from service.engine.concepts import ConceptBank, build_bank
from service.runtime.artifacts import META_FILE as META_FILE_MODEL
from service.runtime.artifacts import ModelMeta, load_gradient_model
from service.runtime.optimize import optimize_for_inference

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
DEFAULT_IMAGES_PER_CLASS = 12
"""Synthetic training images per class for the default bank: 12 x 8 crops = 96 rows per
class, about 3 s of the archive build on the 2-core reference machine."""


def images_from_folder(
    folder: Path, labels: Sequence[str], input_size: tuple[int, int, int]
) -> dict[int, np.ndarray]:
    """``DIR/<label>/<image>`` -> class index -> uint8 ``(n, H, W, 3)`` at the input size.

    Raises:
        ArchiveError: no such folder, a sub-folder that is no label, an unreadable image,
            or no image at all.
    """
    if not folder.is_dir():
        raise ArchiveError(f"--images {folder}: not a folder")
    index = {label: i for i, label in enumerate(labels)}
    _, height, width = input_size
    found: dict[int, np.ndarray] = {}
    for sub in sorted(p for p in folder.iterdir() if p.is_dir()):
        if sub.name not in index:
            known = ", ".join(labels[:10]) + (", ..." if len(labels) > 10 else "")
            raise ArchiveError(f"--images: sub-folder {sub.name!r} is not a label ({known})")
        files = sorted(p for p in sub.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
        pixels = []
        for file in files:
            bgr = cv2.imread(str(file), cv2.IMREAD_COLOR)
            if bgr is None:
                raise ArchiveError(f"--images: cannot read {file} as an image")
            rgb = cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)
            pixels.append(cv2.resize(rgb, (width, height), interpolation=cv2.INTER_AREA))
        if pixels:
            found[index[sub.name]] = np.stack(pixels)
    if not found:
        raise ArchiveError(
            f"--images {folder}: no images; put them in one sub-folder per class label"
        )
    return found


def archive_meta(mar: Path) -> ModelMeta:
    """The ``model.json`` of ``mar``."""
    with tempfile.TemporaryDirectory() as tmp, zipfile.ZipFile(mar) as archive:
        archive.extract(META_FILE_MODEL, tmp)
        return ModelMeta.read(Path(tmp))


def default_concept_images(per_class: int = DEFAULT_IMAGES_PER_CLASS) -> dict[int, np.ndarray]:
    """The first ``per_class`` images of each class of the default model's first training
    batches (the synthetic generator, seeded as training seeds it)."""
    from service.models import synthetic
    from service.models.train import TrainConfig

    classes = len(synthetic.CLASS_NAMES)
    batch = synthetic.generate(per_class * classes, TrainConfig.train_seed_base)
    return {c: batch.images[batch.labels == c] for c in range(classes)}


def add_concepts(
    mar: Path,
    images: dict[int, np.ndarray],
    *,
    k: int = 8,
    crops_per_image: int = 8,
    seed: int = 0,
    source: str = "",
    say: Callable[[str], None] | None = None,
) -> ConceptBank:
    """Build a bank with ``mar``'s model and write it into ``mar`` (replacing any bank).

    Raises:
        ArchiveError: the archive has no hookable model or no spatial CAM layer.
    """
    with tempfile.TemporaryDirectory() as tmp, restored_path():
        model_dir = Path(tmp) / "model"
        with zipfile.ZipFile(mar) as archive:
            archive.extractall(model_dir)
        meta = ModelMeta.read(model_dir)
        layer = meta.cam_layer
        if meta.eager is None or layer is None or layer.kind != "spatial":
            raise ArchiveError(
                "concepts need an archive with the model's code (not an exported program) "
                "and a spatial (N, C, h, w) CAM layer; a ViT's tokens are not supported yet"
            )
        model, _ = load_gradient_model(meta, model_dir)
        served = served_model(model, meta.input_size, layer.name)
        bank = build_bank(
            served, layer.name, images, k=k, crops_per_image=crops_per_image, seed=seed,
            source=source,
        )  # fmt: skip
    _rewrite(mar, bank.to_files())
    if say is not None:
        say(
            f"concepts: {len(bank.classes)} classes x {k} concepts of {layer.summary()} "
            f"from {sum(len(v) for v in images.values())} images written into {mar}"
        )
    return bank


def served_model(
    model: torch.nn.Module, input_size: tuple[int, int, int], layer: str
) -> torch.nn.Module:
    """``model`` as a worker serves it (batch norm folded, layouts chosen, ``layer`` kept):
    the bank then factorises the activations the worker will project, and builds about
    1.5x faster than on the eager model."""
    return optimize_for_inference(model.eval(), input_size, keep=[layer])


def _rewrite(mar: Path, files: dict[str, bytes]) -> None:
    """``mar`` with ``files`` added (or replaced), swapped in atomically."""
    partial = mar.with_name(mar.name + ".partial")
    with zipfile.ZipFile(mar) as old, zipfile.ZipFile(partial, "w") as new:
        for info in old.infolist():
            if info.filename not in files:
                new.writestr(info, old.read(info))
        for name, data in files.items():
            new.writestr(name, data, compress_type=zipfile.ZIP_STORED)  # npz is compressed
    os.replace(partial, mar)
