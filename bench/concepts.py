"""CRAFT concepts of the default model: do they find the object, and what do they look like?

The model is the one a worker serves (batch norm folded); the bank is the one the default
archive ships (``service.archive_concepts``: synthetic
training images, 8 crops each, ``k`` = 8 per class, the CAM layer). On held-out images
with ground-truth object masks, every concept of the true class is read in the image
(NNLS projection of the layer's activations) and its map thresholded at the map's top
``TOP_FRACTION`` of pixels (masks.threshold_mask at the matching percentile); the table
gives each class's best concept by mean IoU with the object mask, the IoU of the concept
that Sobol importance ranks first, and the IoU a random pixel set of the same size would
have (an analytic baseline). The gallery shows per class each concept's most typical
crops and its map on one held-out image. Writes ``bench/results/concepts.md`` and
``bench/results/concepts.png``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import cv2
import numpy as np
import torch
from PIL import Image

from bench.machine import cpu_model
from bench.quality import HELD_OUT_SEED, iou
from service.archive_concepts import (
    DEFAULT_IMAGES_PER_CLASS,
    default_concept_images,
    served_model,
)
from service.client.overlay import overlay
from service.engine.concepts import ConceptBank, build_bank, explain_concepts
from service.engine.masks import threshold_mask
from service.models.default import load_default_model
from service.models.synthetic import CLASS_NAMES, generate

RESULTS = Path(__file__).resolve().parent / "results"
TOP_FRACTION = 0.2
TILE = 64


def _decoded(png: bytes) -> np.ndarray:
    bgr = cv2.imdecode(np.frombuffer(png, np.uint8), cv2.IMREAD_COLOR)
    return cv2.cvtColor(bgr, cv2.COLOR_BGR2RGB)


def run(n_images: int, k: int) -> str:
    torch.manual_seed(0)
    model, meta = load_default_model()
    layer_name = str(meta["target_layer"])
    model = served_model(model, (3, *meta["input_size"][-2:]), layer_name)
    layer = dict(model.named_modules())[layer_name]
    start, cpu = time.perf_counter(), time.process_time()
    images = default_concept_images()
    bank = build_bank(model, layer_name, images, k=k, seed=0)
    build_s, build_cpu = time.perf_counter() - start, time.process_time() - cpu

    data = generate(n_images, HELD_OUT_SEED)
    ious: dict[int, list[np.ndarray]] = {c: [] for c in range(len(CLASS_NAMES))}
    first: dict[int, list[float]] = {c: [] for c in range(len(CLASS_NAMES))}
    chance: dict[int, list[float]] = {c: [] for c in range(len(CLASS_NAMES))}
    ceiling: dict[int, list[float]] = {c: [] for c in range(len(CLASS_NAMES))}
    importance: dict[int, list[np.ndarray]] = {c: [] for c in range(len(CLASS_NAMES))}
    shown: dict[int, tuple[np.ndarray, list[np.ndarray]]] = {}
    explain_s = 0.0
    for image, mask, label in zip(data.images, data.masks, data.labels, strict=True):
        c = int(label)
        pixels = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 255.0
        tick = time.perf_counter()
        found = explain_concepts(model, layer, pixels, c, bank.classes[c].bank, top=k, seed=0)
        explain_s += time.perf_counter() - tick
        by_concept = sorted(found, key=lambda a: a.concept)
        percentile = 100.0 * (1.0 - TOP_FRACTION)
        scores = np.array([iou(threshold_mask(a.map, percentile), mask) for a in by_concept])
        ious[c].append(scores)
        first[c].append(float(scores[found[0].concept]))
        importance[c].append(np.array([a.importance for a in by_concept]))
        f = float(mask.mean())
        chance[c].append(TOP_FRACTION * f / (TOP_FRACTION + f - TOP_FRACTION * f))
        ceiling[c].append(min(f, TOP_FRACTION) / max(f, TOP_FRACTION))
        shown.setdefault(c, (image, [a.map for a in by_concept]))
    write_gallery(bank, shown, {c: np.mean(v, axis=0) for c, v in importance.items() if v})

    lines = [
        "# CRAFT concepts of the default model",
        "",
        f"CPU: {cpu_model()}. Bank: {DEFAULT_IMAGES_PER_CLASS} synthetic training images per "
        f"class x 8 random crops (half the image side, resized to 128 px), layer "
        f"`{layer_name}` (post-ReLU, so no clamping), spatial mean per crop, NMF k={k} "
        f"(init nndsvda, seed 0). Built in **{build_s:.1f} s** wall, {build_cpu:.1f} s of CPU "
        "(what it adds to the default archive build, plus rewriting the .mar: about 1 s; "
        "the wall time depends on what else runs on the machine). Held-out: "
        f"{n_images} images (seed {HELD_OUT_SEED}); importance: Sobol total indices, 32 "
        f"designs x (k + 2) forwards; {explain_s / n_images:.2f} s per image.",
        "",
        f"IoU: a concept's map (its NNLS coefficients, upsampled bilinearly) thresholded at "
        f"its top {TOP_FRACTION:.0%} of pixels, against the object mask; mean over the "
        "class's held-out images. 'chance': a random pixel set of that size; 'ceiling': the "
        "best any map can score at that threshold (the object is smaller than 20% of the "
        "image, so a perfect map still scores its area / 20%).",
        "",
        "| class | images | best concept | its IoU | most important concept's IoU | chance | "
        "ceiling | mean importance (by concept) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for c, name in enumerate(CLASS_NAMES):
        if not ious[c]:
            continue
        mean = np.mean(ious[c], axis=0)
        best = int(np.argmax(mean))
        shares = " ".join(f"{v:.2f}" for v in np.mean(importance[c], axis=0))
        lines.append(
            f"| {name} | {len(ious[c])} | {best} | {mean[best]:.3f} | "
            f"{np.mean(first[c]):.3f} | {np.mean(chance[c]):.3f} | "
            f"{np.mean(ceiling[c]):.3f} | {shares} |"
        )
    all_best = np.mean([np.max(np.mean(v, axis=0)) for v in ious.values() if v])
    all_first = np.mean([x for v in first.values() for x in v])
    all_chance = np.mean([x for v in chance.values() for x in v])
    all_ceiling = np.mean([x for v in ceiling.values() for x in v])
    lines += [
        "",
        f"Mean over classes: best concept {all_best:.3f}, most important concept "
        f"{all_first:.3f}, chance {all_chance:.3f}, ceiling {all_ceiling:.3f}.",
        "",
        "![gallery](concepts.png): per class, a row of each concept's three most typical "
        "crops (concept 0 first), then a row of each concept's map on one held-out image, "
        "with the mean importance of the concept over the class's held-out images.",
        "",
    ]
    return "\n".join(lines)


def write_gallery(
    bank: ConceptBank,
    shown: dict[int, tuple[np.ndarray, list[np.ndarray]]],
    importance: dict[int, np.ndarray],
) -> None:
    rows = []
    for c, name in enumerate(CLASS_NAMES):
        if c not in shown:
            continue
        concepts = bank.classes[c]
        crops = [np.hstack([_decoded(p) for p in pngs]) for pngs in concepts.crops]
        maps = []
        image, concept_maps = shown[c]
        for i, saliency in enumerate(concept_maps):
            tile = cv2.resize(overlay(image, saliency), (TILE * 3, TILE * 3))
            cv2.putText(tile, f"c{i} {importance[c][i]:.2f}", (4, 18),
                        cv2.FONT_HERSHEY_SIMPLEX, 0.5, (255, 255, 255), 1)  # fmt: skip
            maps.append(tile)
        label = np.full((TILE * 3 + TILE, 90, 3), 255, np.uint8)
        cv2.putText(label, name, (4, 40), cv2.FONT_HERSHEY_SIMPLEX, 0.5, (0, 0, 0), 1)
        block = np.vstack([np.hstack(crops), np.hstack(maps)])
        rows.append(np.hstack([label, block]))
        rows.append(np.full((4, rows[-1].shape[1], 3), 255, np.uint8))
    grid = np.vstack(rows)
    # A 256-colour palette: the full-colour PNG was 5.9 MB, the palette one ~1.2 MB, and
    # the maps and crops read the same (looked at side by side).
    palette = Image.fromarray(grid).quantize(
        256, Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE
    )
    palette.save(RESULTS / "concepts.png", optimize=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=100)
    parser.add_argument("--k", type=int, default=8)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    report = run(args.images, args.k)
    (RESULTS / "concepts.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
