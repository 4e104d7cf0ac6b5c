"""Explanation quality on held-out synthetic images with ground-truth object masks.

Per registered method: pointing game (the map's maximum inside the object, 15-pixel
tolerance), IoU with the ground truth of the threshold mask and of the GrabCut mask,
deletion / insertion AUC (RISE's definitions, through ONNX Runtime), and stability
(max-sensitivity and rank stability: the method re-run on perturbed copies, on a subset).
Writes ``bench/results/quality.md`` and ``bench/results/quality_grid.png``.

Run: ``python -m bench.quality [--images 200]`` (``make bench`` runs it).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
import torch

from bench.machine import cpu_model
from service.engine import masks
from service.engine.engine import Engine
from service.engine.registry import MethodSpec, list_methods
from service.engine.scores import compute_scores
from service.models.default import load_default_model
from service.models.synthetic import generate
from service.runtime.export import export_artifacts
from service.runtime.onnx_forward import OnnxForward

RESULTS = Path(__file__).resolve().parent / "results"
HELD_OUT_SEED = 20_261_122  # far from the training seeds (1_000_000 + step) and the test sets
TOLERANCE_PX = 15
CHUNK = 16


def pointing_hits(maps: np.ndarray, truth: np.ndarray, tolerance: float) -> np.ndarray:
    """Hit when the map's maximum is within ``tolerance`` pixels of the object."""
    hits = []
    for saliency, mask in zip(maps, truth, strict=True):
        distance = cv2.distanceTransform((~mask).astype(np.uint8), cv2.DIST_L2, 5)
        y, x = np.unravel_index(int(np.argmax(saliency)), saliency.shape)
        hits.append(distance[y, x] <= tolerance)
    return np.array(hits)


def iou(a: np.ndarray, b: np.ndarray) -> float:
    union = np.logical_or(a, b).sum()
    return float(np.logical_and(a, b).sum() / union) if union else 0.0


def stability(
    engine: Engine, forward: OnnxForward, spec: MethodSpec, pixels: np.ndarray,
    maps: np.ndarray, labels: np.ndarray,
) -> dict[str, np.ndarray]:  # fmt: skip
    """Both stability scores of ``maps``, the method re-run with its defaults and seed 0."""

    def method(images: np.ndarray, targets: np.ndarray) -> np.ndarray:
        batch = torch.from_numpy(images)
        return engine.explain(batch, torch.from_numpy(targets), spec.name, seed=0).maps.numpy()

    names = ["max_sensitivity", "rank_stability"]
    return compute_scores(forward, pixels, maps, labels, names, seed=0, explain=method)


def run(n_images: int, n_forward_only: int, n_stable: int, n_stable_forward_only: int) -> str:
    torch.set_num_threads(max(torch.get_num_threads(), 1))
    model, meta = load_default_model()
    input_size = tuple(meta["input_size"])
    with tempfile.TemporaryDirectory() as tmp:
        export_artifacts(model, input_size, Path(tmp))  # type: ignore[arg-type]
        forward = OnnxForward(Path(tmp) / "model.onnx")
    engine = Engine(
        model, target_layer=meta["target_layer"], input_shape=input_size, forward_numpy=forward
    )
    data = generate(n_images, seed=HELD_OUT_SEED)
    pixels = data.images.transpose(0, 3, 1, 2).astype(np.float32) / 255.0
    labels = data.labels
    predicted = forward(pixels).argmax(axis=1)
    accuracy = float((predicted == labels).mean())

    rows = []
    grid_maps: dict[str, np.ndarray] = {}
    for spec in list_methods():
        # Forward-only methods cost thousands of forwards per image: a subset keeps the
        # suite within minutes (the row says how many images it used).
        n = n_images if spec.backend == "torch" else min(n_images, n_forward_only)
        start = time.perf_counter()
        maps = np.concatenate(
            [
                engine.explain(
                    torch.from_numpy(pixels[i : min(i + CHUNK, n)]),
                    torch.from_numpy(labels[i : min(i + CHUNK, n)]),
                    spec.name,
                    seed=0,
                ).maps.numpy()
                for i in range(0, n, CHUNK)
            ]
        )
        seconds = (time.perf_counter() - start) / n
        hits = pointing_hits(maps, data.masks[:n], TOLERANCE_PX)
        threshold = [masks.threshold_mask(m) for m in maps]
        grabcut = [masks.grabcut_mask(img, m) for img, m in zip(data.images[:n], maps, strict=True)]
        scores = compute_scores(
            forward, pixels[:n], maps, labels[:n], ["deletion_auc", "insertion_auc"], chunk_size=64
        )
        # Stability re-runs the method n_perturbations times per image: a smaller subset.
        k = min(n, n_stable if spec.backend == "torch" else n_stable_forward_only)
        stable = stability(engine, forward, spec, pixels[:k], maps[:k], labels[:k])
        rows.append(
            (
                spec.name,
                n,
                hits.mean(),
                np.mean([iou(m, t) for m, t in zip(threshold, data.masks[:n], strict=True)]),
                np.mean([iou(m, t) for m, t in zip(grabcut, data.masks[:n], strict=True)]),
                scores["deletion_auc"].mean(),
                scores["insertion_auc"].mean(),
                k,
                float(np.median(stable["max_sensitivity"])),
                float(stable["rank_stability"].mean()),
                seconds * 1000,
            )
        )
        grid_maps[spec.name] = np.stack([maps[:6], *[np.stack(grabcut[:6])]])
        print(
            f"{spec.name:22s} pointing {hits.mean():.3f} rank stability "
            f"{stable['rank_stability'].mean():.3f}",
            flush=True,
        )

    write_grid(data.images[:6], data.masks[:6], grid_maps)
    lines = [
        "# Explanation quality (held-out synthetic shapes)",
        "",
        f"Model `{meta['name']}` version `{meta['version']}`, held-out accuracy on these images "
        f"{accuracy:.3f}; {n_images} images (seed {HELD_OUT_SEED}), target = true class.",
        f"Machine: {cpu_model()}, {torch.get_num_threads()} "
        f"torch threads, torch {torch.__version__}. Command: `python -m bench.quality "
        f"--images {n_images} --forward-only-images {n_forward_only} --stability-images "
        f"{n_stable} --forward-only-stability-images {n_stable_forward_only}`.",
        "",
        "Pointing game: hit when the map's maximum lies within "
        f"{TOLERANCE_PX} px of the object. IoU: mean over images of the mask against the "
        "ground-truth object mask (threshold = 95th percentile of the map; GrabCut seeded "
        "above the 0.95 and below the 0.30 quantile). Deletion (lower is better) and "
        "insertion (higher is better): AUC of the true-class probability, RISE's definitions.",
        "Stability, on the first images of the set (column 'stable'): each map's method re-run "
        "with its defaults and seed on 8 copies of the image with uniform noise of L-inf "
        "radius 0.05; max-sensitivity (lower is better) is the largest change of the map "
        "relative to its norm, shown as the median over images; rank stability (higher is "
        "better) the mean Spearman correlation with the copies' maps, averaged over images.",
        "",
        "| method | images | pointing game | threshold IoU | GrabCut IoU | deletion AUC "
        "| insertion AUC | stable | max-sensitivity | rank stability | ms / image |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, n, point, t_iou, g_iou, deletion, insertion, k, sens, rank, ms in rows:
        lines.append(
            f"| `{name}` | {n} | {point:.3f} | {t_iou:.3f} | {g_iou:.3f} | {deletion:.3f} | "
            f"{insertion:.3f} | {k} | {sens:.3f} | {rank:.3f} | {ms:.1f} |"
        )
    lines += [
        "",
        "Grid: `quality_grid.png` (rows: images; columns: image, ground truth, then per "
        "method its map and its GrabCut mask).",
    ]
    return "\n".join(lines) + "\n"


def write_grid(images: np.ndarray, truth: np.ndarray, maps: dict[str, np.ndarray]) -> None:
    rows = []
    for i, image in enumerate(images):
        tiles = [image, np.repeat(truth[i, :, :, None] * 255, 3, axis=2).astype(np.uint8)]
        for stacked in maps.values():
            saliency, grabcut = stacked[0][i], stacked[1][i]
            span = float(saliency.max() - saliency.min()) or 1.0
            scaled = ((saliency - saliency.min()) / span * 255).astype(np.uint8)
            heat = cv2.cvtColor(cv2.applyColorMap(scaled, cv2.COLORMAP_JET), cv2.COLOR_BGR2RGB)
            tiles.append(heat)
            tiles.append(np.repeat(grabcut[:, :, None] * 255, 3, axis=2).astype(np.uint8))
        rows.append(cv2.hconcat(tiles))
    header = np.full((14, rows[0].shape[1], 3), 255, np.uint8)
    x = 2 * images.shape[2]
    for name in maps:
        cv2.putText(header, name[:18], (x + 2, 11), cv2.FONT_HERSHEY_SIMPLEX, 0.35, (0, 0, 0), 1)
        x += 2 * images.shape[2]
    grid = cv2.vconcat([header, *rows])
    cv2.imwrite(str(RESULTS / "quality_grid.png"), cv2.cvtColor(grid, cv2.COLOR_RGB2BGR))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument(
        "--forward-only-images", type=int, default=40, help="images for the onnx methods"
    )
    parser.add_argument("--stability-images", type=int, default=16)
    parser.add_argument("--forward-only-stability-images", type=int, default=8)
    args = parser.parse_args()
    RESULTS.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    report = run(
        args.images,
        args.forward_only_images,
        args.stability_images,
        args.forward_only_stability_images,
    )
    report += f"\nThe run took {(time.perf_counter() - start) / 60:.0f} minutes.\n"
    (RESULTS / "quality.md").write_text(report)
    print(report)


if __name__ == "__main__":
    main()
