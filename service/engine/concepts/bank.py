"""Concept banks: per class, ``k`` concepts learned from random crops (Fel et al. 2023).

:func:`build_bank` follows CRAFT's recipe (sec. 3.1): random crops of a class's images,
each resized to the model input, go through the model up to a layer; the activations are
made non-negative and averaged over space (one row per crop), and NMF factorises them into
``U W``. ``W`` (``k x channels``) is the class's concept bank; the crops with the largest
coefficient of a concept are its "most typical" crops, kept as small PNGs so a client can
show what a concept looks like.

:class:`ConceptBank` is what the archive stores (``concepts.npz`` + ``concepts.json``,
:meth:`ConceptBank.to_files` / :meth:`ConceptBank.read`) and what the server loads.

Paper: https://arxiv.org/abs/2211.10154
"""

from __future__ import annotations

import io
import json
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch
from torch import nn

from service.engine.concepts.factorize import fit_concepts
from service.engine.layers import capture_activations

BANK_FILE = "concepts.npz"
META_FILE = "concepts.json"
FORMAT = 1
Check = Callable[[], None]


@dataclass(frozen=True)
class ClassConcepts:
    """One class's concepts.

    Attributes:
        bank: float32 ``(k, channels)``, the concepts ``W`` (non-negative rows).
        crops: per concept, PNGs of its most typical crops, most typical first.
    """

    bank: np.ndarray
    crops: tuple[tuple[bytes, ...], ...]


@dataclass(frozen=True)
class ConceptBank:
    """Concept banks of the classes of one model, and how they were built.

    Attributes:
        layer: module name (as in the served pixel-space model) whose activations the
            concepts factorise.
        k: concepts per class.
        crop_size: side of the square crops in the (input-sized) source images, in pixels.
        seed: seed of the crops and of NMF.
        classes: class index -> its concepts; classes without images have none.
        source: one line on the images the bank was built from.
    """

    layer: str
    k: int
    crop_size: int
    seed: int
    classes: dict[int, ClassConcepts]
    source: str = ""

    def meta(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "layer": self.layer,
            "k": self.k,
            "crop_size": self.crop_size,
            "seed": self.seed,
            "classes": sorted(self.classes),
            "typical": [len(c.crops[0]) if c.crops else 0 for _, c in sorted(self.classes.items())],
            "source": self.source,
        }

    def to_files(self) -> dict[str, bytes]:
        """``{file name: bytes}``: the banks and crops (npz) and the metadata (JSON)."""
        arrays: dict[str, np.ndarray] = {}
        for label, concepts in self.classes.items():
            arrays[f"bank_{label}"] = concepts.bank.astype(np.float32)
            for concept, pngs in enumerate(concepts.crops):
                for rank, png in enumerate(pngs):
                    arrays[f"crop_{label}_{concept}_{rank}"] = np.frombuffer(png, np.uint8)
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)  # type: ignore[arg-type]
        meta = json.dumps(self.meta(), indent=2) + "\n"
        return {BANK_FILE: buffer.getvalue(), META_FILE: meta.encode()}

    @classmethod
    def read(cls, directory: Path) -> ConceptBank | None:
        """The bank stored in ``directory``, or ``None`` when it holds none."""
        if not (directory / META_FILE).is_file():
            return None
        meta = json.loads((directory / META_FILE).read_text())
        if meta.get("format") != FORMAT:
            raise ValueError(f"{META_FILE}: unknown format {meta.get('format')!r}")
        classes: dict[int, ClassConcepts] = {}
        with np.load(directory / BANK_FILE) as arrays:
            for label, typical in zip(meta["classes"], meta["typical"], strict=True):
                bank = arrays[f"bank_{label}"].astype(np.float32)
                crops = tuple(
                    tuple(arrays[f"crop_{label}_{c}_{r}"].tobytes() for r in range(typical))
                    for c in range(bank.shape[0])
                )
                classes[int(label)] = ClassConcepts(bank, crops)
        return cls(
            meta["layer"], int(meta["k"]), int(meta["crop_size"]), int(meta["seed"]), classes,
            str(meta.get("source", "")),
        )  # fmt: skip


def random_crops(
    images: np.ndarray, per_image: int, crop_size: int, rng: np.random.Generator
) -> np.ndarray:
    """``per_image`` square crops of each image, resized back to the image size.

    Args:
        images: uint8 ``(n, H, W, 3)``.
        per_image: crops per image.
        crop_size: crop side in pixels, at most ``min(H, W)``.
        rng: the only source of randomness (corner positions).

    Returns:
        uint8 ``(n * per_image, H, W, 3)``, image-major.
    """
    n, height, width, _ = images.shape
    out = np.empty((n * per_image, height, width, 3), dtype=np.uint8)
    for i in range(n * per_image):
        top = int(rng.integers(0, height - crop_size + 1))
        left = int(rng.integers(0, width - crop_size + 1))
        crop = images[i // per_image, top : top + crop_size, left : left + crop_size]
        out[i] = cv2.resize(crop, (width, height), interpolation=cv2.INTER_LINEAR)
    return out


@torch.no_grad()
def crop_activations(
    model: nn.Module,
    layer: nn.Module,
    crops: np.ndarray,
    batch: int = 64,
    check: Check | None = None,
) -> np.ndarray:
    """Spatially averaged, non-negative activations of ``layer``: ``(n, channels)`` float64.

    Negative activations are clamped to 0 (a no-op after a ReLU, as on the default
    model's layer), since NMF needs non-negative data; the spatial mean is CRAFT's choice
    for crops, which are small enough to hold about one concept.
    """
    rows = []
    for start in range(0, crops.shape[0], batch):
        if check is not None:
            check()
        pixels = torch.from_numpy(crops[start : start + batch]).permute(0, 3, 1, 2).float() / 255.0
        with capture_activations(layer) as capture:
            model(pixels)
        rows.append(capture.single().clamp_min(0).mean(dim=(2, 3)).double().numpy())
    return np.concatenate(rows)


def _png(image: np.ndarray, side: int) -> bytes:
    small = cv2.resize(image, (side, side), interpolation=cv2.INTER_AREA)
    ok, encoded = cv2.imencode(".png", cv2.cvtColor(small, cv2.COLOR_RGB2BGR))
    assert ok, "PNG encoding of a uint8 image cannot fail"
    return encoded.tobytes()


def build_bank(
    model: nn.Module,
    layer_name: str,
    images: Mapping[int, np.ndarray],
    *,
    k: int = 8,
    crops_per_image: int = 8,
    crop_fraction: float = 0.5,
    typical: int = 3,
    thumbnail: int = 64,
    seed: int = 0,
    source: str = "",
    check: Check | None = None,
) -> ConceptBank:
    """CRAFT concept banks for the classes of ``images``.

    Args:
        model: pixel-space model (``[0, 1]`` input), eval mode.
        layer_name: a module of ``model`` whose output is an ``(N, C, h, w)`` map.
        images: class index -> uint8 ``(n, H, W, 3)`` images at the model's input size.
        k: concepts per class.
        crops_per_image: random crops per image.
        crop_fraction: crop side as a fraction of the image side.
        typical: most typical crops kept per concept.
        thumbnail: side of the kept crops' PNGs.
        seed: seeds the crop positions (per class, so a class's concepts do not depend on
            the other classes) and NMF.
        source: one line recorded with the bank.
        check: called between batches (deadline, cancellation).

    Returns:
        The :class:`ConceptBank`.
    """
    modules = dict(model.named_modules())
    if layer_name not in modules:
        raise ValueError(f"model has no layer named {layer_name!r}")
    classes: dict[int, ClassConcepts] = {}
    crop_size = 0
    for label, class_images in sorted(images.items()):
        if class_images.shape[0] == 0:
            continue
        crop_size = max(1, round(crop_fraction * min(class_images.shape[1:3])))
        rng = np.random.default_rng([seed, label])
        crops = random_crops(class_images, crops_per_image, crop_size, rng)
        activations = crop_activations(model, modules[layer_name], crops, check=check)
        u, w = fit_concepts(activations, min(k, *activations.shape), seed)
        best = np.argsort(-u, axis=0, kind="stable")[:typical]  # (typical, k)
        pngs = tuple(
            tuple(_png(crops[i], thumbnail) for i in best[:, c]) for c in range(w.shape[0])
        )
        classes[label] = ClassConcepts(w.astype(np.float32), pngs)
    return ConceptBank(layer_name, k, crop_size, seed, classes, source)
